"""LMCacheRadixCache on SGLang's real tree, pool and allocator (CPU): KV that SGLang
evicts is spilled to the tiers and, when the prefix comes back, loaded into new slots
bit for bit; namespaces never share; failed loads fall back to recompute."""

from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import CacheEngine
from lmcache_sgl.sglang.plugin import pool_view
from lmcache_sgl.sglang.radix_cache import LMCacheRadixCache

POOL_TOKENS = 1024


def make_cache(tmp_path, page_size=1, mla=False, **config):
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
    engine = CacheEngine(LMCacheConfig(**{**defaults, **config}).validated(page_size), pool_view(pool), b"m" * 16)
    for buf in engine.pool.buffers:
        buf.normal_()
    return LMCacheRadixCache(params, engine)


def insert(cache, tokens, extra_key=None, salt=None):
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.insert(InsertParams(key=RadixKey(array("q", tokens), extra_key, cache_salt=salt), value=slots))
    return slots


def kv_of(cache, slots):
    return torch.stack([b[slots] for b in cache.engine.pool.buffers]).view(torch.uint8).clone()


def request(rid):
    return SimpleNamespace(rid=rid, session=None)


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
    cache.engine.stack.flush()
    disk = cache.engine.stack.disk
    victim = tmp_path / "disk" / (disk.keys()[0].hex() + ".lmsg")
    data = bytearray(victim.read_bytes())
    data[-40] ^= 1
    victim.write_bytes(bytes(data))
    free_before = cache.token_to_kv_pool_allocator.available_size()
    req, match, _ = revisit(cache, tokens)
    assert match.host_hit_length > 0 and req.prefix_len == 0  # promised, then declined: recompute
    assert cache.failed_loads == 1 and disk.stats.corrupt == 1
    assert cache.token_to_kv_pool_allocator.available_size() == free_before  # slots given back


def test_flush_keeps_the_tiers_and_clear_empties_them(tmp_path):
    cache = make_cache(tmp_path)
    tokens = list(range(300, 400))
    insert(cache, tokens)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    req = request("pending")
    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), limit=99), req=req))
    cache.reset()  # /flush_cache: drops the promise and its pins, keeps the data
    cache.engine.stack.flush()  # (the disk writer borrows CPU entries while it encodes them)
    assert all(e.pins == 0 for e in cache.engine.stack.cpu._entries.values())
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
    assert cache.engine.stored_chunks == 0 and match.device_prefix_len == 64
    cache.dec_lock_ref(match.last_device_node, lock.to_dec_params() if hasattr(lock, "to_dec_params") else lock)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert cache.engine.stored_chunks == 4


@pytest.mark.parametrize("save_unfull_chunk, expected", [(True, 99), (False, 96)])
def test_trailing_partial_chunk(tmp_path, save_unfull_chunk, expected):
    cache = make_cache(tmp_path, save_unfull_chunk=save_unfull_chunk)
    tokens = list(range(2000, 2100))
    insert(cache, tokens)
    cache.evict(EvictParams(num_tokens=POOL_TOKENS))
    assert revisit(cache, tokens)[0].prefix_len == expected
