"""Which SGLang KV pools the engine can copy, and the engine's view of them.

The gather/scatter kernels move per-layer [slot, heads, dim] rows. A pool whose KV lives
anywhere else too (scale buffers, sparse-attention index keys, page-indexed layouts, K
and V rows of different shapes) would be stored incompletely, so it is refused at start
with a message naming the setting to change.
"""

from __future__ import annotations

from ..engine import KVPoolView

_SCALE_BUFFERS = (
    "k_scale_buffer",
    "v_scale_buffer",
    "native_k_scale_buffer",
    "native_v_scale_buffer",
    "dq_k_buffer",
    "dq_v_buffer",
)
_KV_DTYPE_FIX = "set --kv-cache-dtype to auto, bf16, fp8_e4m3 or fp8_e5m2"
_REFUSED_POOLS = {
    "MHATokenToKVPoolFP4": f"keeps per-block scales beside K and V: {_KV_DTYPE_FIX}",
    "MHATokenToKVPoolMXFP8": f"keeps per-block scales beside K and V: {_KV_DTYPE_FIX}",
    "MLATokenToKVPoolFP4": f"keeps per-block scales beside the latent KV: {_KV_DTYPE_FIX}",
    "DSATokenToKVPool": "keeps DeepSeek sparse-attention (DSA/NSA) index keys in buffers of their own: "
    "serve this model without --enable-lmcache",
    "UnifiedMHATokenToKVPool": "indexes page-major per-layer views: drop --enable-unified-memory",
    "UnifiedMLATokenToKVPool": "indexes page-major per-layer views: drop --enable-unified-memory",
}


_LAYOUT_FIX = {"hnd": "unset SGLANG_USE_HND_KVCACHE", "vectorized_5d": "set SGLANG_AITER_KV_CACHE_LAYOUT=nhd"}


def pool_view(kvcache) -> KVPoolView:
    """The engine's view of SGLang's KV pool. Accepted are exactly SGLang's plain MHA and
    MLA pools whose KV lives only in per-layer [slot, heads, dim] buffers of one shape
    (what the gather/scatter kernels move); anything else raises ValueError naming the
    setting to change."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    name = type(kvcache).__name__
    if type(kvcache) is MHATokenToKVPool:
        _check_mha(kvcache)
        view = KVPoolView("mha", (*kvcache.k_buffer, *kvcache.v_buffer))
        row = (kvcache.head_num, kvcache.head_dim)
    elif type(kvcache) is MLATokenToKVPool:
        if kvcache.use_dsa or kvcache.kv_scale_buffer is not None:
            raise ValueError(
                f"lmcache-sgl does not support the KV pool {name} with DSA index keys or KV scales: "
                "serve this model without --enable-lmcache"
            )
        view = KVPoolView("mla", tuple(kvcache.kv_buffer))
        row = (1, kvcache.kv_lora_rank + kvcache.qk_rope_head_dim)
    else:
        why = _REFUSED_POOLS.get(name, "is not a plain MHA or MLA pool: serve this model without --enable-lmcache")
        raise ValueError(f"lmcache-sgl does not support the KV pool {name}: it {why}")
    for buf in view.buffers:
        if (
            tuple(buf.shape[1:]) != row
            or buf.shape[0] < kvcache.size + kvcache.page_size
            or buf.dtype != kvcache.store_dtype
            or not buf.is_contiguous()
        ):
            raise ValueError(
                f"lmcache-sgl does not support the KV pool {name}: a buffer is {buf.dtype}{tuple(buf.shape)}, not "
                f"contiguous {kvcache.store_dtype}[slots, {', '.join(map(str, row))}]: "
                "serve this model without --enable-lmcache"
            )
    return view


def _check_mha(kvcache) -> None:
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import UnquantizedKVCacheMethod

    name = type(kvcache).__name__
    if type(kvcache.quant_method) is not UnquantizedKVCacheMethod or any(
        getattr(kvcache, a, None) is not None for a in _SCALE_BUFFERS
    ):
        raise ValueError(
            f"lmcache-sgl does not support the KV pool {name} with the KV quantization method "
            f"{kvcache.quant_method.name!r} (packed KV, scale buffers): {_KV_DTYPE_FIX}"
        )
    if kvcache.kv_cache_layout != "nhd":
        fix = _LAYOUT_FIX.get(kvcache.kv_cache_layout, "serve this model without --enable-lmcache")
        raise ValueError(
            f"lmcache-sgl does not support the KV pool {name} in the {kvcache.kv_cache_layout!r} layout, "
            f"which does not index token slots: {fix}"
        )
    if kvcache.v_head_dim != kvcache.head_dim:
        raise ValueError(
            f"lmcache-sgl does not support the KV pool {name} with K head dim {kvcache.head_dim} and V head dim "
            f"{kvcache.v_head_dim} (K and V rows differ): serve this model without --enable-lmcache"
        )


def kv_dtype_name(kvcache, server_args) -> str:
    """The logical KV dtype: the pool's dtype as resolved from --kv-cache-dtype (every fp8
    format is stored as uint8), with the flag's own value."""
    return f"{str(kvcache.dtype).removeprefix('torch.')}/{server_args.kv_cache_dtype}"
