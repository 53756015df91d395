"""What names the KV of a served model: every byte of its weights, buffers and KV scales;
the logical KV dtype; a LoRA adapter's weights; and the tiers pause from a weight change
until the cache flush that follows it."""

import json
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import Chunk
from lmcache_sgl.sglang import identity, plugin, pools


class _Config:
    def to_dict(self):
        return {"layers": 1, "_name_or_path": "/m"}


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)).to(torch.bfloat16)
    model.register_buffer("inv_freq", torch.arange(8, dtype=torch.float32))
    model[0].k_scale_float = 1.0  # as RadixAttention holds fp8 KV scales
    return model


def _identity(model):
    return identity.model_identity(_Config(), model)


def _flip_every_byte(tensor, model, base):
    raw = tensor.data.view(-1).view(torch.uint8)
    for i in range(raw.numel()):
        raw[i] ^= 0x01
        assert _identity(model) != base, f"byte {i} of a {tuple(tensor.shape)} tensor is not in the identity"
        raw[i] ^= 0x01
    assert _identity(model) == base


def test_flipping_any_byte_of_any_parameter_changes_the_identity():
    model = _model()
    base = _identity(model)
    for _, param in model.named_parameters():
        _flip_every_byte(param, model, base)


def test_flipping_any_byte_of_a_buffer_changes_the_identity():
    model = _model()
    _flip_every_byte(model.inv_freq, model, _identity(model))


def test_kv_scales_are_in_the_identity():
    model = _model()
    base = _identity(model)
    model[0].k_scale_float = 0.5
    assert _identity(model) != base
    model[0].k_scale_float = 1.0
    model[0].v_scale = torch.tensor(2.0)  # a plain tensor, as load_kv_cache_scales may set
    assert _identity(model) != base


def test_same_bytes_in_another_dtype_or_shape_are_another_model():
    a = [("w", torch.zeros(4, 4, dtype=torch.int16))]
    assert identity.tensors_digest(a) != identity.tensors_digest([("w", torch.zeros(2, 8, dtype=torch.int16))])
    assert identity.tensors_digest(a) != identity.tensors_digest([("w", torch.zeros(4, 4, dtype=torch.bfloat16))])
    assert identity.tensors_digest(a) != identity.tensors_digest([("v", torch.zeros(4, 4, dtype=torch.int16))])


def test_non_contiguous_and_large_tensors_hash_their_values():
    t = torch.arange(64, dtype=torch.float32).view(8, 8)
    assert identity.tensors_digest([("w", t.t())]) == identity.tensors_digest([("w", t.t().contiguous())])
    big = torch.zeros(identity._SLICE_BYTES // 4 + 3, dtype=torch.float32)
    base = identity.tensors_digest([("w", big)])
    big[-1] = 1
    assert identity.tensors_digest([("w", big)]) != base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_hash_like_cpu_tensors():
    torch.manual_seed(0)
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(identity._SLICE_BYTES // 2 + 7, dtype=torch.bfloat16))]
    on_gpu = [(n, t.cuda()) for n, t in named]
    assert identity.tensors_digest(on_gpu) == identity.tensors_digest(named)


# ---- the engine build_cache makes ------------------------------------------------------
def _ctx(kvcache, kv_cache_dtype="auto", lora_manager=None, model=None):
    runner = SimpleNamespace(model=model or _model(), lora_manager=lora_manager)
    return SimpleNamespace(
        tp_worker=SimpleNamespace(model_runner=runner), model_config=SimpleNamespace(hf_config=_Config()),
        tp_rank=0, tp_size=1, server_args=SimpleNamespace(kv_cache_dtype=kv_cache_dtype),
    )


def _pool(dtype=torch.bfloat16):
    return MHATokenToKVPool(64, page_size=1, dtype=dtype, head_num=2, head_dim=8, layer_num=2, device="cpu",
                            enable_memory_saver=False)


def _engine(tmp_path, kvcache, **ctx):
    config = LMCacheConfig(chunk_size=4, max_local_cpu_size=0.001, local_disk=None).validated(1)
    return plugin.served_engine(_ctx(kvcache, **ctx), config, kvcache, pools.pool_view(kvcache))


def test_fp8_formats_stored_alike_have_different_namespaces(tmp_path):
    e4m3, e5m2 = _pool(torch.float8_e4m3fn), _pool(torch.float8_e5m2)
    assert e4m3.store_dtype == e5m2.store_dtype == torch.uint8
    a = _engine(tmp_path, e4m3, kv_cache_dtype="fp8_e4m3")
    b = _engine(tmp_path, e5m2, kv_cache_dtype="fp8_e5m2")
    assert a.seed() != b.seed()


def _adapter(tmp_path, scale):
    """A real SGLang LoRAAdapter (rank 4 on q_proj and v_proj of 2 layers), weights all `scale`."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig
    from transformers import LlamaConfig

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    base = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=100)
    adapter = LoRAAdapter("id", LoRAConfig(str(tmp_path), base_vocab_size=100), base, LoadConfig(), None)
    adapter.initialize_weights_from_tensors({
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": torch.full((4, 64) if ab == "A" else (64, 4), scale)
        for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"
    })
    return adapter


def test_a_lora_namespace_is_the_adapter_weights_not_its_id(tmp_path):
    lora_id = "0123456789abcdef0123456789abcdef"
    manager = SimpleNamespace(loras={lora_id: _adapter(tmp_path, 0.5)})
    engine = _engine(tmp_path, _pool(), lora_manager=manager)
    before = engine.seed(lora_id)
    manager.loras[lora_id] = _adapter(tmp_path, 0.25)  # same id (e.g. --lora-paths), other weights
    assert engine.seed(lora_id) != before
    manager.loras = {"f" * 32: _adapter(tmp_path, 0.5)}  # another id, the first weights
    assert engine.seed("f" * 32) == before
    assert engine.seed("tenant" + "f" * 32) != before  # SGLang prefixes the request's extra_key
    assert engine.seed(None) != before


# ---- weight changes ------------------------------------------------------------------
def _scheduler(engine, model):
    runner = SimpleNamespace(model=model, model_config=SimpleNamespace(hf_config=_Config()))
    return SimpleNamespace(tree_cache=SimpleNamespace(engine=engine), tp_worker=SimpleNamespace(model_runner=runner))


def test_tiers_pause_from_a_weight_change_to_the_next_flush(tmp_path):
    model = _model()
    engine = _engine(tmp_path, _pool(), model=model)
    scheduler = _scheduler(engine, model)
    old_seed = engine.seed()
    chunks = engine.chunks(old_seed, list(range(8)))
    slots = torch.arange(1, 9)
    assert engine.store(chunks, slots) == 2 and engine.hit_length(chunks) == 8

    plugin._before_weight_change(SimpleNamespace(scheduler=scheduler))
    with torch.no_grad():
        model[0].weight[3, 3] += 1
    assert engine.hit_length(chunks) == 0
    assert engine.store([Chunk(b"k" * 16, 0, 4)], slots) == 0
    plugin._after_flush_cache(False, scheduler)  # refused: requests still hold old KV
    assert engine.hit_length(chunks) == 0 and engine.seed() == old_seed

    plugin._after_flush_cache(True, scheduler)
    assert not engine.paused
    assert engine.seed() != old_seed
    assert engine.seed() == _engine(tmp_path, _pool(), model=model).seed()
    assert engine.hit_length(chunks) == 8  # the old keys are still there, but no request makes them again
