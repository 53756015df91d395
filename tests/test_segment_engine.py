"""CacheEngine's segments: stored once, found anywhere, loaded at a new position with K
re-rotated; a stream of novel queries does not evict the documents they reuse."""

import random

import numpy as np
import pytest
import torch

from lmcache_sgl import ops
from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import CacheEngine, KVPoolView
from lmcache_sgl.sglang.rope import RopeSpec

SEP = [1, 1]
CHUNK = 16
ROPE = RopeSpec(1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)), 8, True)


def engine_for(separator, **config) -> CacheEngine:
    buffers = tuple(torch.randn(512, 2, 8).to(torch.bfloat16) for _ in range(2))  # one layer: K, V
    engine = CacheEngine(LMCacheConfig(chunk_size=CHUNK, blend_min_tokens=4, **config), KVPoolView("mha", buffers), b"m")
    engine.start_segments(separator)
    return engine


@pytest.mark.parametrize("separator", [SEP, None], ids=["separator", "rolling_hash"])
def test_a_segment_loads_at_a_new_position_with_its_keys_rotated(separator):
    engine = engine_for(separator, max_local_cpu_size=0.001)
    rng = np.random.default_rng(0)
    doc = rng.integers(5, 500, size=2 * CHUNK).tolist()
    first = np.array([7] * 16 + SEP + doc + SEP + [9, 9], dtype=np.int64)  # doc at 18..50
    seed = engine.seed()
    assert engine.store_segments(seed, first, torch.arange(len(first))) > 0
    second = np.array([8] * 5 + SEP + doc + SEP + [3], dtype=np.int64)  # doc at 7..39
    found = engine.find_segments(seed, second, 0, len(second))
    slots = torch.arange(300, 300 + sum(c.end - c.start for c in found))
    shifts = engine.load_segments(found, slots, ROPE)
    assert found and shifts == [7 - 18] * len(found)  # the document moved from 18 to 7
    assert all(np.array_equal(second[c.start : c.end], first[c.start + 11 : c.end + 11]) for c in found)
    k, v = engine.pool.buffers
    source = torch.cat([torch.arange(c.start - shifts[i], c.end - shifts[i]) for i, c in enumerate(found)])
    expected = k[source].clone()
    ops.rerotate_(expected, *ops.rope_angles(shifts[0], ROPE.inv_freq), ROPE.rotary_dim, ROPE.neox)
    assert torch.equal(k[slots], expected)
    assert torch.equal(v[slots], v[source])


def test_a_missing_segment_fails_the_load():
    engine = engine_for(SEP, max_local_cpu_size=0.001)
    prompt = np.array(list(range(5, 40)) + SEP + [3], dtype=np.int64)
    engine.store_segments(engine.seed(), prompt, torch.arange(len(prompt)))
    found = engine.find_segments(engine.seed(), prompt, 0, len(prompt))
    engine.clear()
    assert engine.load_segments(found, torch.arange(100, 135), ROPE) is None
    assert engine.stats()["failed_loads_total"] == {"miss": 1}


def reuse_rates(engine: CacheEngine, separator, queries: int = 100) -> list[float]:
    """Per query (4 of 8 fixed documents, shuffled, after a novel preamble): the share of
    document tokens found stored and loaded; each query then stores its prefix chunks (novel, never
    read again) and the segments it computed."""
    rng = random.Random(3)
    docs = [[rng.randrange(5, 500) for _ in range(24)] for _ in range(8)]
    seed, rates = engine.seed(), []
    for _ in range(queries):
        tokens = [rng.randrange(600, 900) for _ in range(12)]
        for d in rng.sample(range(8), 4):
            tokens += (SEP or []) + docs[d]
        tokens = np.array(tokens + (SEP or []) + [rng.randrange(600, 900) for _ in range(8)], dtype=np.int64)
        found = engine.find_segments(seed, tokens, 0, len(tokens))
        slots = torch.arange(len(tokens))
        if found and engine.load_segments(found, torch.cat([slots[c.start : c.end] for c in found]), ROPE) is None:
            found = []
        rates.append(sum(c.end - c.start for c in found) / (4 * 24))
        engine.store(engine.chunks(seed, tokens), slots)
        engine.store_segments(seed, tokens, slots, skip=found)
    return rates


def test_novel_queries_do_not_evict_the_documents():
    """The 8 documents' pieces fit the segment share; the prefix chunks of 100 novel
    queries overflow the CPU tier many times over."""
    cpu_gb = 48 * KVPoolView("mha", engine_for(SEP).pool.buffers).layout(CHUNK).nbytes / 2**30  # 48 slabs
    rates = reuse_rates(engine_for(SEP, max_local_cpu_size=cpu_gb, enable_blending=True), SEP)
    assert sum(rates[-20:]) >= sum(rates[:20])
    assert rates[-20:] == [1.0] * 20
    one_lru = reuse_rates(engine_for(SEP, max_local_cpu_size=cpu_gb), SEP)  # no segment share
    assert min(one_lru[-20:]) < 1.0, "the prefix stores do not press on the documents: the test shows nothing"
