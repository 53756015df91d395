"""The SGLang plugin entry point: registration, version check, pool views, model identity."""

import logging

import pytest
import torch
from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import FP4MXBlock16KVCacheMethod
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.registry import get_radix_cache_factory

from lmcache_sgl.sglang import identity, plugin, pools


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "lmcache_sgl"]
    assert eps and eps[0].value == "lmcache_sgl.sglang.plugin:register"


def test_register_adds_the_backend():
    plugin.register()
    plugin.register()  # idempotent: SGLang may load plugins more than once
    assert get_radix_cache_factory(plugin.BACKEND) is plugin.build_cache


def test_other_sglang_version_is_refused_with_a_clear_message(monkeypatch, caplog):
    monkeypatch.setattr(plugin.importlib.metadata, "version", lambda name: "0.9.0")
    with caplog.at_level(logging.ERROR, logger="lmcache_sgl"):
        plugin.register()
    assert "needs sglang==0.5.23 but sglang 0.9.0 is installed" in caplog.text


def test_pool_views_of_sglang_pools():
    mha = MHATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=3,
                           device="cpu", enable_memory_saver=False)
    view = pools.pool_view(mha)
    assert view.kind == "mha" and len(view.buffers) == 6 and view.layout(4).shape == (2, 3, 4, 2, 8)
    mla = MLATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
                           layer_num=3, device="cpu", enable_memory_saver=False)
    view = pools.pool_view(mla)
    assert view.kind == "mla" and len(view.buffers) == 3 and view.layout(4).shape == (3, 4, 1, 24)
    with pytest.raises(ValueError, match="does not support"):
        pools.pool_view(object())


MHA = dict(page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=32, layer_num=2, device="cpu", enable_memory_saver=False)
MLA = dict(page_size=1, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8, layer_num=2, device="cpu",
           enable_memory_saver=False)


# Pools whose KV lives in more than the per-slot K/V (or latent) rows the kernels move, and
# the setting each refusal names.
REFUSED_POOLS = {
    "fp4 scales": (lambda mp: mp.MHATokenToKVPoolFP4(64, **MHA), "--kv-cache-dtype"),
    "mxfp8 scales": (lambda mp: mp.MHATokenToKVPoolMXFP8(64, **{**MHA, "dtype": torch.float8_e4m3fn}), "--kv-cache-dtype"),
    "fp4 quant method": (lambda mp: mp.MHATokenToKVPool(64, **MHA, quant_method=FP4MXBlock16KVCacheMethod()), "--kv-cache-dtype"),
    "mla fp4 scales": (lambda mp: mp.MLATokenToKVPoolFP4(64, **MLA), "--kv-cache-dtype"),
    "dsa index keys": (lambda mp: mp.DSATokenToKVPool(
        64, page_size=64, kv_lora_rank=16, dtype=torch.bfloat16, qk_rope_head_dim=8, layer_num=2, device="cpu",
        index_head_dim=128, enable_memory_saver=False, kv_cache_dim=24, index_buf_size=64), "without --enable-lmcache"),
    "mla with dsa": (lambda mp: mp.MLATokenToKVPool(64, **MLA, use_dsa=True), "without --enable-lmcache"),
    "page layout label": (lambda mp: mp.MHATokenToKVPool(64, **MHA, kv_cache_layout="page_major"), "without --enable-lmcache"),
    "k and v head dims differ": (lambda mp: mp.MHATokenToKVPool(64, **MHA, v_head_dim=16), "without --enable-lmcache"),
    "k only": (lambda mp: mp.MHATokenToKOnlyPool(64, **MHA), "without --enable-lmcache"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_POOLS))
def test_pools_with_kv_outside_the_moved_rows_are_refused_naming_the_setting(kind):
    from sglang.srt.mem_cache import memory_pool

    make, setting = REFUSED_POOLS[kind]
    with pytest.raises(ValueError, match=setting):
        pools.pool_view(make(memory_pool))


def test_hnd_layout_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    with pytest.raises(ValueError, match="unset SGLANG_USE_HND_KVCACHE"):
        pools.pool_view(MHATokenToKVPool(64, **MHA))


class _Config:
    def __init__(self, **values):
        self.values = values

    def to_dict(self):
        return dict(self.values)


def test_model_identity_depends_on_config_shapes_and_values_not_path():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    base = identity.model_identity(_Config(layers=2, _name_or_path="/a"), model)
    assert base == identity.model_identity(_Config(layers=2, _name_or_path="/b"), model)
    assert base != identity.model_identity(_Config(layers=3, _name_or_path="/a"), model)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert base != identity.model_identity(_Config(layers=2, _name_or_path="/a"), model)
    assert base != identity.model_identity(_Config(layers=2), torch.nn.Linear(4, 5))
