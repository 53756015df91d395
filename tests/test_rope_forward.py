"""RoPE re-rotation on a real forward: the K a Llama model (the built-in `tiny`, through
transformers) caches for a segment at positions p.. and re-rotated by d equals, at every
layer, the K it caches for the same segment at positions p + d.. (RoPE attention depends
on relative positions only, so the hidden states agree and only the rotation differs)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmcache_sgl import ops
from lmcache_sgl.models import make_model

SHIFT = 3000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


def cached_keys(model, ids: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Every layer's cached K, [tokens, kv_heads, head_dim], for `ids` at positions start.."""
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=torch.arange(start, start + len(ids))[None], use_cache=True)
    return [layer.keys[0].transpose(0, 1).contiguous() for layer in out.past_key_values.layers]


@pytest.mark.parametrize(
    "dtype, ulps",
    [(torch.float32, None), (torch.bfloat16, 4)],  # bf16: within 4 ulps of the largest |K|; fp32: 1e-3 of it
)
def test_rerotated_keys_equal_keys_computed_at_the_new_position(tiny, dtype, ulps):
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=dtype).eval()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    inv_freq = (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    ids = torch.randint(10, 2000, (200,), generator=torch.Generator().manual_seed(0))
    before, after = cached_keys(model, ids, 37), cached_keys(model, ids, 37 + SHIFT)
    cos, sin = ops.rope_angles(SHIFT, inv_freq)
    for layer, (k, expected) in enumerate(zip(before, after, strict=True)):
        ops.rerotate_(k, cos, sin, head_dim, True)
        scale = expected.abs().max().item()
        bound = 1e-3 * scale if ulps is None else ulps * 2.0 ** (math.floor(math.log2(scale)) - 7)
        assert (k - expected).abs().max().item() <= bound, f"layer {layer}"
