"""At the reported length (16376-token prompts, 256-token chunks, a context of 16384): a
revisit of a prompt whose prefix SGLang evicted gets from the tiers exactly the prefix a
device hit gives (the prompt less its last token, through the stored partial chunk),
with the same KV bits, and decodes over the same KV as after a device hit: there SGLang's
checkpoint points the recomputed last prompt token at the tree's KV, here the stored KV
replaces the recomputed one. SGLang's real tree, pool, allocator and Req lifecycle
(chunked prefill checkpoints, decode, release)."""


import pytest
import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.runtime_context import get_context
from test_radix_cache import admit as admit_request

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import CacheEngine
from lmcache_sgl.sglang.pools import pool_view
from lmcache_sgl.sglang.radix_cache import LMCacheRadixCache

CONTEXT, POOL, PREFILL_CHUNK = 16384, 20000, 4096
NEW_TOKENS = 6  # SGLang clips max_new_tokens to context - 1 - 16376 - 1


@pytest.fixture
def sglang_config():
    with get_context().override_server_args():
        yield


def make_cache(**config) -> LMCacheRadixCache:
    pool = MHATokenToKVPool(POOL, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=ReqToTokenPool(4, CONTEXT, "cpu", False),
        token_to_kv_pool_allocator=TokenToKVPoolAllocator(POOL, torch.bfloat16, "cpu", pool, need_sort=False),
        page_size=1, tree_components=(ComponentType.FULL,), tree_core_backend="python",
    )
    cfg = LMCacheConfig(**{"chunk_size": 256, "max_local_cpu_size": 0.05, "local_disk": None, **config}).validated(1)
    engine = CacheEngine(cfg, pool_view(pool), b"m" * 16)
    for buf in engine.pool.buffers:
        buf.normal_()
    return LMCacheRadixCache(params, engine)


def kv_of(cache, slots):
    return torch.stack([b[slots] for b in cache.engine.pool.buffers]).view(torch.uint8).clone()


def admit(cache, tokens, rid):
    """Match and load back as SGLang's scheduler does; (req, its prefix's KV)."""
    req = admit_request(cache, tokens, rid, max_new_tokens=NEW_TOKENS)
    return req, kv_of(cache, cache.prefix_device_indices(req).to(torch.int64))


def run(cache, req, output_ids):
    """Prefill the rest of the prompt in chunks of PREFILL_CHUNK (a checkpoint after each;
    the KV computed is new random bits, as a recompute may round otherwise), decode
    `output_ids`, finish and release into the tree. Returns the prompt's KV as decode
    reads it (through the request's row after the last prefill checkpoint)."""
    prompt, prefix = len(req.origin_input_ids), req.prefix_len
    total = prompt + len(output_ids) - 1  # the last output token has no KV yet
    new = cache.token_to_kv_pool_allocator.alloc(total - prefix).to(torch.int64)
    for buf in cache.engine.pool.buffers:
        buf[new] = torch.randn(buf[new].shape).to(buf.dtype)
    slots = torch.cat([cache.prefix_device_indices(req).to(torch.int64), new])
    cache.req_to_token_pool.alloc([req])
    row = req.kv.req_pool_idx
    cache.req_to_token_pool.write((row, slice(0, total)), slots.to(torch.int32))
    for end in [*range(prefix + PREFILL_CHUNK, prompt, PREFILL_CHUNK), prompt]:
        req.kv.kv_allocated_len = req.kv.kv_committed_len = req.extend_end = end
        checkpoint_kv_cache(req, cache)
    decode_kv = kv_of(cache, cache.req_to_token_pool.req_to_token[row, :prompt].to(torch.int64))
    req.output_ids.extend(output_ids)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = total
    req.finished_reason = FINISH_LENGTH(length=len(output_ids))
    release_kv_cache(req, cache, checkpoint=True)
    return decode_kv


@pytest.mark.parametrize("prompt_len", [16376, 16000])
@pytest.mark.parametrize("save_on_checkpoint", [True, False])
def test_a_revisit_loads_and_decodes_over_what_a_device_hit_does(sglang_config, prompt_len, save_on_checkpoint):
    tokens = [(i * 7919 + 13) % 8000 + 10 for i in range(prompt_len)]
    outputs = [101, 102, 103, 104, 105, 106]

    on_device = make_cache(save_on_checkpoint=save_on_checkpoint)
    cold_kv = run(on_device, admit(on_device, tokens, "cold")[0], outputs)
    device, _ = admit(on_device, tokens, "device-hit")
    assert device.host_hit_length == 0
    device_hit = device.prefix_len
    assert torch.equal(run(on_device, device, outputs), cold_kv)  # SGLang's own checkpoint

    # Another server, no device hit in between: a device hit splits the tree at its
    # length, and the spill of that node alone would store a chunk ending there.
    cache = make_cache(save_on_checkpoint=save_on_checkpoint)
    cold_kv = run(cache, admit(cache, tokens, "cold")[0], outputs)
    cache.evict(EvictParams(num_tokens=POOL))
    assert cache.evictable_size() == 0
    loaded, loaded_kv = admit(cache, tokens, "tier-hit")
    assert loaded.host_hit_length == loaded.prefix_len == device_hit == prompt_len - 1
    assert torch.equal(loaded_kv, cold_kv[:, :device_hit])
    assert torch.equal(run(cache, loaded, outputs), cold_kv)
