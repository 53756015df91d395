"""LMCacheRadixCache on SGLang's real tree, pool and allocator (CPU): KV that SGLang
evicts is spilled to the tiers and, when the prefix comes back, loaded into new slots
bit for bit; namespaces never share; failed loads fall back to recompute; a streaming
session's row is never extended from the tiers; nothing the engine raises reaches the
scheduler or leaks slots or protections."""

from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ReqKvInfo
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.runtime_context import get_context
from sglang.srt.sampling.sampling_params import SamplingParams

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import CacheEngine
from lmcache_sgl.sglang.pools import pool_view
from lmcache_sgl.sglang.radix_cache import LMCacheRadixCache

POOL_TOKENS = 1024


def make_cache(tmp_path, page_size=1, mla=False, tp=None, tp_rank=0, **config):
    if mla:
        pool = MLATokenToKVPool(POOL_TOKENS, page_size=page_size, dtype=torch.bfloat16, kv_lora_rank=32,
                                qk_rope_head_dim=16, layer_num=2, device="cpu", enable_memory_saver=False)
    else:
        pool = MHATokenToKVPool(POOL_TOKENS, page_size=page_size, dtype=torch.bfloat16, head_num=2, head_dim=16,
                                layer_num=2, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(POOL_TOKENS, torch.bfloat16, "cpu", pool, need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(POOL_TOKENS, page_size, torch.bfloat16, "cpu", pool, need_sort=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=ReqToTokenPool(8, 4096, "cpu", False), token_to_kv_pool_allocator=alloc,
        page_size=page_size, tree_components=(ComponentType.FULL,), tree_core_backend="python",
    )
    defaults = dict(chunk_size=16 * page_size, max_local_cpu_size=0.01, local_disk=str(tmp_path / "disk"),
                    max_local_disk_size=0.01)
    tp_size = 1 if tp is None else tp.size
    engine = CacheEngine(LMCacheConfig(**{**defaults, **config}).validated(page_size), pool_view(pool), b"m" * 16,
                         tp_rank=tp_rank, tp_size=tp_size)
    for buf in engine.pool.buffers:
        buf.normal_()
    return LMCacheRadixCache(params, engine, tp)


def insert(cache, tokens, extra_key=None, salt=None):
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.insert(InsertParams(key=RadixKey(array("q", tokens), extra_key, cache_salt=salt), value=slots))
    return slots


def kv_of(cache, slots):
    return torch.stack([b[slots] for b in cache.engine.pool.buffers]).view(torch.uint8).clone()


def request(rid):
    return SimpleNamespace(rid=rid, session=None, kv=ReqKvInfo())


def stored_tokens(cache, tokens):
    """Leading tokens of `tokens` the tiers hold."""
    engine = cache.engine
    return engine.hit_length(engine.chunks(engine.seed(), tokens))


def protections(cache):
    """Chunk pins and protections the tiers hold, once queued disk writes (which pin
    their CPU copies) are done."""
    stack = cache.engine.stack
    assert stack.flush(30)
    hot = sum(e.pins for e in stack.hot._entries.values()) if stack.hot is not None else 0
    return hot + sum(sum(tier._protected.values()) for tier in stack.cold)


@pytest.fixture
def sglang_config():
    """A published (default) SGLang config, which real requests read when released."""
    with get_context().override_server_args():
        yield


def admit(cache, tokens, rid, *, max_new_tokens=1, session=None) -> Req:
    """A real Req matched, loaded back and locked as SGLang's scheduler admits it."""
    req = Req(rid=rid, origin_input_text="", origin_input_ids=array("q", tokens),
              sampling_params=SamplingParams(max_new_tokens=max_new_tokens))
    req.session = session
    req.init_next_round_input(cache)
    if req.host_hit_length > 0:
        params = InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
        loaded, req.last_node = cache.init_load_back(params)
        req.prefix_len += loaded
    req.lock = cache.lock(req.last_node)
    return req


def serve(cache, tokens, rid, session=None):
    """A real Req through what SGLang's scheduler does with it: admission, row allocation
    (handed to its streaming session, if any), checkpoint, finish, release. Returns how
    many of its tokens came from the cache."""
    req = admit(cache, tokens, rid, session=session)
    reused = req.prefix_len
    prefix = cache.prefix_device_indices(req).to(torch.int64)
    cache.req_to_token_pool.alloc([req])
    new = cache.token_to_kv_pool_allocator.alloc(len(tokens) - req.prefix_len).to(torch.int64)
    cache.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, len(tokens))), torch.cat([prefix, new]).to(torch.int32))
    req.kv.kv_allocated_len = req.kv.kv_committed_len = req.extend_end = len(tokens)
    cache.maybe_hand_to_session(req)
    checkpoint_kv_cache(req, cache)
    req.finished_reason = FINISH_LENGTH(length=0)
    release_kv_cache(req, cache, checkpoint=True)
    return reused


def revisit(cache, tokens, rid="r", extra_key=None, salt=None):
    """What SGLang does for a new request: match, admit (load), allocate its row."""
    req = request(rid)
    key = RadixKey(array("q", tokens), extra_key, limit=len(tokens) - 1, cache_salt=salt)
    match = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    loaded, _ = cache.init_load_back(
        InitLoadBackParams(best_match_node=match.best_match_node, host_hit_length=match.host_hit_length, req=req)
    )
    assert loaded in (0, match.host_hit_length)
    req.last_node, req.prefix_len = match.last_device_node, match.device_prefix_len + loaded
    return req, match, cache.prefix_device_indices(req)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(2, 200), page_size=st.sampled_from([1, 4]), mla=st.booleans(), seed=st.integers(0, 99))
def test_evicted_kv_comes_back_bit_identical(tmp_path_factory, length, page_size, mla, seed):
    cache = make_cache(tmp_path_factory.mktemp("c"), page_size=page_size, mla=mla)
    tokens = [(seed * 7919 + i * 104729) % 32000 for i in range(length)]
    length -= length % page_size
    tokens = tokens[:length] or tokens[:page_size]
    slots = insert(cache, tokens)
    before = kv_of(cache, slots)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert cache.evictable_size() == 0
    req, match, indices = revisit(cache, tokens)
    expected = (len(tokens) - 1) // page_size * page_size  # SGLang keeps the last token to compute
    assert match.device_prefix_len == 0 and req.prefix_len == expected
    assert torch.equal(kv_of(cache, indices), before[:, :expected])


def test_device_hit_is_extended_from_the_tiers(tmp_path):
    cache = make_cache(tmp_path)
    tokens = list(range(1000, 1100))
    slots = insert(cache, tokens)
    before = kv_of(cache, slots)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    insert(cache, tokens[:40])  # the first 40 tokens are back on the device (other slots)
    req, match, indices = revisit(cache, tokens)
    assert match.device_prefix_len == 40 and req.prefix_len == 99
    assert torch.equal(kv_of(cache, indices)[:, 40:], before[:, 40:99])


def test_namespaces_never_share(tmp_path):
    cache = make_cache(tmp_path)
    tokens = list(range(50, 150))
    insert(cache, tokens, salt="tenant-a")
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    for extra_key, salt in ((None, None), (None, "tenant-b"), ("lora-1", "tenant-a")):
        _, match, _ = revisit(cache, tokens, extra_key=extra_key, salt=salt)
        assert match.host_hit_length == 0
    req, match, _ = revisit(cache, tokens, salt="tenant-a")
    assert req.prefix_len == 99


def test_a_corrupt_chunk_falls_back_to_recompute(tmp_path):
    cache = make_cache(tmp_path, local_cpu=False)  # disk only, so the file is what gets read
    tokens = list(range(7, 107))
    insert(cache, tokens)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert cache.engine.stack.flush(30)
    disk = cache.engine.stack.cold[0]
    victim = tmp_path / "disk" / (disk.keys()[0].hex() + ".lmsg")
    data = bytearray(victim.read_bytes())
    data[-40] ^= 1
    victim.write_bytes(bytes(data))
    free_before = cache.token_to_kv_pool_allocator.available_size()
    req, match, _ = revisit(cache, tokens)
    assert match.host_hit_length > 0 and req.prefix_len == 0  # promised, then declined: recompute
    assert cache.failed_loads == 1 and cache.engine.metrics.snapshot()["corrupt_frames_total"] == {"disk": 1}
    assert cache.token_to_kv_pool_allocator.available_size() == free_before  # slots given back


def test_flush_keeps_the_tiers_and_clear_empties_them(tmp_path):
    cache = make_cache(tmp_path)
    tokens = list(range(300, 400))
    insert(cache, tokens)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    req = request("pending")
    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), limit=99), req=req))
    cache.reset()  # /flush_cache: drops the promise and its pins, keeps the data
    assert protections(cache) == 0
    assert revisit(cache, tokens)[0].prefix_len == 99
    assert cache.clear_storage_backend()
    cache.reset()
    assert revisit(cache, tokens, rid="again")[0].prefix_len == 0


def test_locked_nodes_are_not_spilled_or_evicted(tmp_path):
    cache = make_cache(tmp_path)
    tokens = list(range(500, 564))
    insert(cache, tokens)
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    lock = cache.inc_lock_ref(match.last_device_node)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert stored_tokens(cache, tokens) == 0 and match.device_prefix_len == 64
    cache.dec_lock_ref(match.last_device_node, lock.to_dec_params() if hasattr(lock, "to_dec_params") else lock)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert stored_tokens(cache, tokens) == 64


@pytest.mark.parametrize("save_unfull_chunk, expected", [(True, 99), (False, 96)])
def test_trailing_partial_chunk(tmp_path, save_unfull_chunk, expected):
    cache = make_cache(tmp_path, save_unfull_chunk=save_unfull_chunk)
    tokens = list(range(2000, 2100))
    insert(cache, tokens)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert revisit(cache, tokens)[0].prefix_len == expected


def test_a_session_row_is_never_extended_from_the_tiers(tmp_path, sglang_config):
    cache = make_cache(tmp_path)
    tokens = list(range(3000, 3100))
    session = SimpleNamespace(session_id="s", streaming=True, finish_req=lambda req: None)
    serve(cache, tokens[:20], "turn-1", session=session)  # the session keeps its 20-token row
    serve(cache, tokens, "other")  # stores all 100 tokens
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert stored_tokens(cache, tokens) == 100
    turn = Req(rid="turn-2", origin_input_text="", origin_input_ids=array("q", tokens),
               sampling_params=SamplingParams(max_new_tokens=1))
    turn.session = session
    turn.init_next_round_input(cache)
    assert turn.kv.holds_kv and turn.prefix_len == 20  # the lent row
    assert turn.host_hit_length == 0 and protections(cache) == 0


def _raise(*args, **kwargs):
    raise RuntimeError("injected")


# (object, method, failure kinds it must cause, tokens the revisit reuses)
FAULTS = [
    ("engine", "seed", {"lookup", "store"}, 0),
    ("engine", "chunks", {"lookup", "store"}, 0),
    ("engine", "hit_length", {"lookup"}, 0),
    ("engine", "protect", {"lookup"}, 0),
    ("engine", "load", {"load_attempt", "load"}, 0),
    ("stack", "get_many", {"load"}, 0),
    ("stack", "scatter", {"load"}, 0),
    ("engine", "store", {"store", "spill"}, 99),
    ("engine", "unprotect", {"unprotect"}, 99),
    ("allocator", "alloc", {"load_attempt", "load"}, 0),
]


@pytest.mark.parametrize("where, method, kinds, reused", FAULTS, ids=[f"{w}.{m}" for w, m, *_ in FAULTS])
def test_failures_never_reach_the_scheduler(tmp_path, sglang_config, monkeypatch, where, method, kinds, reused):
    """Whatever the engine (or the allocator, for a load's slots) raises, the scheduler's
    calls return; the revisit recomputes what could not be loaded; every slot goes back
    to the allocator and no chunk stays protected."""
    cache = make_cache(tmp_path)
    tokens = list(range(4000, 4100))
    serve(cache, tokens, "first")
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    allocator = cache.token_to_kv_pool_allocator
    free = allocator.available_size()
    assert free == POOL_TOKENS
    if where == "stack" and method == "scatter":
        target, method = cache.engine, "_scatter"
    else:
        target = {"engine": cache.engine, "stack": cache.engine.stack, "allocator": allocator}[where]
    if where == "allocator":  # only the load's allocation fails; the request's own row allocates
        real, calls = allocator.alloc, []
        monkeypatch.setattr(allocator, "alloc", lambda n: calls.append(n) or (_raise() if len(calls) == 1 else real(n)))
    else:
        monkeypatch.setattr(target, method, _raise)
    got = serve(cache, tokens, "again")
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    monkeypatch.undo()
    assert got == reused
    assert kinds <= set(cache.failures), cache.failures
    assert allocator.available_size() == free
    if method != "unprotect":  # (a tier that fails to unprotect keeps its protection)
        assert protections(cache) == 0


def test_repeated_failures_are_counted_but_logged_once(tmp_path, monkeypatch, caplog):
    cache = make_cache(tmp_path)
    for i in range(5):
        insert(cache, list(range(6000 + 200 * i, 6100 + 200 * i)))  # five separate leaves
    monkeypatch.setattr(cache.engine, "store", _raise)
    with caplog.at_level("WARNING", logger="lmcache_sgl"):
        cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert cache.evictable_size() == 0 and cache.failures["spill"] == 5
    assert sum("spill failed" in r.getMessage() for r in caplog.records) == 1
