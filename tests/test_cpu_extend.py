"""cpu_mode's blocked extend attention equals SGLang's stock torch-native extend on the new rows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

from lmcache_sgl.sglang import cpu_mode  # noqa: E402

STOCK = TorchNativeAttnBackend._run_sdpa_forward_extend
BLOCK = 16  # lowered from EXTEND_BLOCK so that small sequences cross block edges

# (prefix, extend) per sequence: no prefix, prefix, a single new token, extends that
# cross one and several block edges with and without a prefix, an empty extend.
SEQS = [(0, 5), (0, 37), (12, 7), (20, 40), (3, 1), (0, 16), (31, 33), (7, 0), (0, 1), (50, 16)]


def _stand_in_self():
    return object.__new__(TorchNativeAttnBackend)  # the stock method needs no state here


def _inputs(seqs, q_heads, kv_heads, dim, dtype, cache_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    total = sum(p + e for p, e in seqs)
    pool = total + 64
    k_cache = torch.randn(pool, kv_heads, dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(pool, kv_heads, dim, generator=gen).to(cache_dtype)
    max_reqs, max_ctx = len(seqs) + 3, max(p + e for p, e in seqs) + 8
    req_to_token = torch.zeros(max_reqs, max_ctx, dtype=torch.int32)
    slots = torch.randperm(pool - 1, generator=gen)[:total] + 1  # slot 0 is padding
    rows = torch.randperm(max_reqs, generator=gen)[: len(seqs)]
    used = 0
    for row, (p, e) in zip(rows.tolist(), seqs):
        req_to_token[row, : p + e] = slots[used : used + p + e].to(torch.int32)
        used += p + e
    n_new = sum(e for _, e in seqs)
    query = torch.randn(n_new, q_heads, dim, generator=gen).to(dtype)
    return dict(
        query=query, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
        req_pool_indices=rows.to(torch.int64),
        seq_lens=torch.tensor([p + e for p, e in seqs], dtype=torch.int64),
        extend_prefix_lens=torch.tensor([p for p, _ in seqs], dtype=torch.int64),
        extend_seq_lens=torch.tensor([e for _, e in seqs], dtype=torch.int64),
    )


def _run(fn, inp, v_dim=None, **kw):
    q = inp["query"]
    out = torch.full((q.shape[0], q.shape[1], v_dim or q.shape[2]), float("nan"), dtype=q.dtype)
    args = (inp["query"], out, inp["k_cache"], inp["v_cache"], inp["req_to_token"],
            inp["req_pool_indices"], inp["seq_lens"], inp["extend_prefix_lens"],
            inp["extend_seq_lens"])
    ret = fn(_stand_in_self(), *args, **kw)
    assert ret is out
    return out


def _blocked(block=BLOCK):
    def fn(self, *args, **kw):
        return cpu_mode.extend_attention(self, *args, _stock=STOCK, block=block, **kw)
    return fn


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("scaling", [None, 0.37])
def test_equals_stock_float32(q_heads, kv_heads, scaling):
    inp = _inputs(SEQS, q_heads, kv_heads, 16, torch.float32)
    kw = dict(scaling=scaling, enable_gqa=q_heads != kv_heads, causal=True)
    want = _run(STOCK, inp, **kw)
    got = _run(_blocked(), inp, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block", [1, 7, 16, 1024])
def test_block_sizes(block):
    inp = _inputs(SEQS, 6, 3, 8, torch.float32, seed=block)
    kw = dict(scaling=0.5, enable_gqa=True, causal=True)
    torch.testing.assert_close(_run(_blocked(block), inp, **kw), _run(STOCK, inp, **kw))


def test_equals_stock_bf16():
    inp = _inputs(SEQS, 8, 2, 32, torch.bfloat16, seed=1)
    kw = dict(scaling=32 ** -0.5, enable_gqa=True, causal=True)
    want = _run(STOCK, inp, **kw)
    got = _run(_blocked(), inp, **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_cache_dtype_cast():
    """K/V cache in bf16, query in float32: both cast the cache to the query dtype."""
    inp = _inputs(SEQS, 4, 2, 16, torch.float32, cache_dtype=torch.bfloat16, seed=2)
    kw = dict(enable_gqa=True, causal=True)
    torch.testing.assert_close(_run(_blocked(), inp, **kw), _run(STOCK, inp, **kw))


def test_mla_shaped_heads():
    """MLA's absorbed layout: one KV head shared by all query heads, and V is a
    narrower view of the same buffer as K (kv_lora_rank of kv_lora_rank + rope_dim)."""
    inp = _inputs([(0, 9), (17, 20), (0, 40)], 4, 1, 24, torch.float32, seed=3)
    inp["v_cache"] = inp["k_cache"][..., :16]
    kw = dict(scaling=0.2, enable_gqa=True, causal=True)
    torch.testing.assert_close(_run(_blocked(), inp, v_dim=16, **kw), _run(STOCK, inp, v_dim=16, **kw))


@pytest.mark.parametrize("kw", [
    dict(causal=False),
    dict(causal=True, sliding_window_size=8),
    dict(causal=True, is_cross_attn=True),
])
def test_uncovered_cases_fall_back_to_stock(kw):
    calls = []

    def stock(*args, **kwargs):
        calls.append(kwargs)
        return STOCK(*args, **kwargs)

    inp = _inputs([(0, 5), (4, 6)], 2, 2, 8, torch.float32)
    kw = dict(kw, enable_gqa=False)
    fn = lambda self, *a, **k: cpu_mode.extend_attention(self, *a, _stock=stock, block=4, **k)  # noqa: E731
    torch.testing.assert_close(_run(fn, inp, **kw), _run(STOCK, inp, **kw))
    assert len(calls) == 1


@pytest.fixture
def clean_hooks(monkeypatch):
    """Run a test against SGLang's real HookRegistry, then undo every patch it applied."""
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved_attrs = [(TorchNativeAttnBackend, "_run_sdpa_forward_extend"),
                   (AttentionBackendRegistry, "get_handler")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in saved_attrs]
    saved_hooks = {k: list(v) for k, v in HookRegistry._hooks.items()}
    saved_patched = set(HookRegistry._patched)
    monkeypatch.setattr(cpu_mode, "_installed", False)
    monkeypatch.setattr(cpu_mode, "EXTEND_BLOCK", BLOCK)
    monkeypatch.setenv(cpu_mode.ENV_MODE, "1")
    try:
        yield
    finally:
        for cls, name, value in saved:
            setattr(cls, name, value)
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved_hooks)
        HookRegistry._patched.clear()
        HookRegistry._patched.update(saved_patched)


def _via_method(self, *a, **k):
    return self._run_sdpa_forward_extend(*a, **k)


def test_install_extend_hook_through_hook_registry(clean_hooks):
    name = "_run_sdpa_forward_extend"
    original = TorchNativeAttnBackend.__dict__[name]
    assert cpu_mode.install_extend_hook() is True
    assert cpu_mode.install_extend_hook() is False  # idempotent
    patched = TorchNativeAttnBackend.__dict__[name]
    assert patched is not original and patched.__wrapped__ is original
    inp = _inputs(SEQS, 4, 2, 16, torch.float32, seed=4)
    kw = dict(scaling=0.25, enable_gqa=True, causal=True)
    torch.testing.assert_close(_run(_via_method, inp, **kw), _run(original, inp, **kw))
    # an uncovered case reaches the stock method through the hook
    inp2 = _inputs([(0, 5), (4, 6)], 2, 2, 8, torch.float32)
    kw2 = dict(causal=True, sliding_window_size=3)
    torch.testing.assert_close(_run(_via_method, inp2, **kw2), _run(original, inp2, **kw2))


def test_stock_extend_switch(clean_hooks, monkeypatch):
    original = TorchNativeAttnBackend.__dict__["_run_sdpa_forward_extend"]
    monkeypatch.setenv(cpu_mode.ENV_EXTEND, "0")
    assert cpu_mode.install_extend_hook() is True  # the MLA dispatch fix still goes in
    assert TorchNativeAttnBackend.__dict__["_run_sdpa_forward_extend"] is original


def test_mla_dispatch_for_torch_native(clean_hooks):
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry,
        _dispatch_mla_subtype,
    )

    triton = AttentionBackendRegistry.get_handler("triton")
    assert AttentionBackendRegistry.get_handler("torch_native") is triton  # stock fallback
    cpu_mode.install_extend_hook()
    assert AttentionBackendRegistry.get_handler("torch_native") is _dispatch_mla_subtype
    assert AttentionBackendRegistry.get_handler("triton") is triton
    assert AttentionBackendRegistry.get_handler("fa3") is AttentionBackendRegistry._handlers["fa3"]


def test_not_installed_without_cpu_mode(monkeypatch):
    monkeypatch.setattr(cpu_mode, "_installed", False)
    monkeypatch.setenv(cpu_mode.ENV_MODE, "0")
    assert cpu_mode.wanted() is False
    assert cpu_mode.install_extend_hook() is False
