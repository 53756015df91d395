"""TP ranks agree on every tier decision. Two processes, each a TP rank with its own real
LMCacheRadixCache, engine and tiers, joined by a gloo group on 127.0.0.1 (SGLang 0.5.23's
CPU engine cannot start with --tp 2 here), are fed the same calls while one rank's tier
is damaged: both must promise the same hit and take the same load decision."""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import traceback
from array import array

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from lmcache_sgl.sglang.radix_cache import TPGroup
from test_radix_cache import POOL_TOKENS, insert, kv_of, make_cache, request, revisit

TOKENS = list(range(5000, 5100))  # 100 tokens: chunks of 16, SGLang matches at most 99


class CountingTPGroup(TPGroup):
    def __init__(self, group):
        super().__init__(group)
        self.calls = 0

    def min(self, value: int) -> int:
        self.calls += 1
        return super().min(value)


def _undamaged(cache):
    pass


def _keep_three_chunks(cache):
    """Only the first 48 tokens stay in this rank's tiers."""
    engine = cache.engine
    kept = engine.protect(engine.chunks(engine.seed(), TOKENS)[:3])
    engine.clear()
    engine.unprotect(kept)


def _corrupt_one_file(cache):
    """A frame on disk goes bad: found by the lookup, refused by the load."""
    disk = cache.engine.stack.cold[0]
    path = disk._file(disk.keys()[3])
    with open(path, "r+b") as f:
        f.seek(-40, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))


SCENARIOS = {  # name: (tier config, what rank 1 does to its tiers before the revisit)
    "undamaged": (dict(local_disk=None, max_local_disk_size=0.0), _undamaged),
    "missing_chunks_on_one_rank": (dict(local_disk=None, max_local_disk_size=0.0), _keep_three_chunks),
    "corrupt_chunk_on_one_rank": (dict(local_cpu=False), _corrupt_one_file),
}


def _scenario(tmp, rank, config, damage):
    tp = CountingTPGroup(dist.group.WORLD)
    cache = make_cache(tmp, tp=tp, tp_rank=rank, **config)
    before = kv_of(cache, insert(cache, TOKENS))
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    cache.engine.stack.flush(30)
    if rank == 1:
        damage(cache)
    free = cache.token_to_kv_pool_allocator.available_size()
    # the scheduler matches a waiting request more than once (priority, then admission)
    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", TOKENS)), req=request("r")))
    req, match, indices = revisit(cache, TOKENS)
    return {
        "host_hit_length": match.host_hit_length, "prefix_len": req.prefix_len,
        "kv_identical": bool(torch.equal(kv_of(cache, indices), before[:, : req.prefix_len])),
        "failed_loads": cache.failed_loads, "collectives": tp.calls,
        "slots_held": free - cache.token_to_kv_pool_allocator.available_size(),  # by the loaded prefix
    }


def _rank_main(rank, port, tmp, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=120))
        out = {}
        for name, (config, damage) in SCENARIOS.items():
            out[name] = _scenario(pathlib.Path(tmp, name), rank, config, damage)
        results.put((rank, out))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{scenario: (rank 0's result, rank 1's result)}"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = str(tmp_path_factory.mktemp("tp"))
    procs = [ctx.Process(target=_rank_main, args=(rank, port, tmp, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    for rank, out in got.items():
        assert isinstance(out, dict), f"rank {rank} failed:\n{out}"
    return {name: (got[0][name], got[1][name]) for name in SCENARIOS}


def test_undamaged_ranks_load_the_whole_prefix(ranks):
    for r in ranks["undamaged"]:
        assert r["host_hit_length"] == 99 and r["prefix_len"] == 99 and r["kv_identical"]
        assert r["collectives"] == 2  # one for the hit (later matches reuse it), one for the load


def test_ranks_agree_on_the_shortest_hit(ranks):
    for r in ranks["missing_chunks_on_one_rank"]:  # rank 0 holds 99 tokens, rank 1 only 48
        assert r["host_hit_length"] == 48 and r["prefix_len"] == 48 and r["kv_identical"] and r["slots_held"] == 48


def test_a_load_failing_on_one_rank_is_declined_on_all(ranks):
    for r in ranks["corrupt_chunk_on_one_rank"]:
        assert r["host_hit_length"] == 99  # both found it
        assert r["prefix_len"] == 0 and r["failed_loads"] == 1 and r["slots_held"] == 0  # both recompute


def test_one_rank_exchanges_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("a collective with one rank"))
    cache = make_cache(tmp_path)  # SGLang's tp_cache_group: None here, a one-rank group in a server
    insert(cache, TOKENS)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert cache.tp.size == 1 and revisit(cache, TOKENS)[0].prefix_len == 99
