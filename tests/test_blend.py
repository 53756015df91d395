"""The blend's pieces that need no model: its attention, its token pick, its overrides."""

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.sglang import blend
from lmcache_sgl.sglang.blend import Blender, Strategy

ATTN = types.SimpleNamespace(num_heads=4, head_dim=8, scaling=0.3)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 300), st.booleans())
def test_attention_equals_one_dense_masked_call(data, context, from_zero):
    """Any ascending query positions (a contiguous run from 0, or any subset) give what
    one dense call with the causal mask gives."""
    if from_zero:
        positions = torch.arange(context)
    else:
        chosen = data.draw(st.sets(st.integers(0, context - 1), min_size=1))
        positions = torch.tensor(sorted(chosen))
    generator = torch.Generator().manual_seed(context)
    k_buf, v_buf = torch.randn(400, 2, 8, generator=generator), torch.randn(400, 2, 8, generator=generator)
    slots = torch.randperm(400, generator=generator)
    q = torch.randn(len(positions), 32, generator=generator)
    original, blend.QUERY_BLOCK = blend.QUERY_BLOCK, 16  # several blocks
    try:
        out = Blender._attend(ATTN, q, positions, k_buf, v_buf, slots)
    finally:
        blend.QUERY_BLOCK = original
    keys = int(positions[-1]) + 1
    k, v = k_buf[slots[:keys]].transpose(0, 1), v_buf[slots[:keys]].transpose(0, 1)
    mask = torch.arange(keys)[None, :] <= positions[:, None]
    query = q.view(-1, 4, 8).transpose(0, 1)
    expected = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(-1, 32), rtol=1e-5, atol=1e-5)


def test_the_pick_keeps_the_gaps_and_the_most_deviating_reused_tokens():
    reused = torch.tensor([True, True, False, True, True, True])
    deviation = torch.tensor([5.0, 1.0, 0.0, 9.0, 2.0, 3.0])
    keep = Blender._picked(0.4, deviation, reused, ~reused)  # ceil(0.4 * 5) = 2 of the reused
    assert keep.tolist() == [True, False, True, True, False, False]
    assert Blender._picked(1.0, deviation, reused, ~reused).all()
    assert Blender._picked(0.0, deviation, reused, ~reused).tolist() == (~reused).tolist()


def test_overrides_replace_the_configured_strategy():
    base = Strategy.from_config(LMCacheConfig(blend_check_layers=(2, 1)))
    assert base == Strategy("cacheblend", 0.15, (1, 2), 16)
    assert base.overridden({"strategy": "boundary", "boundary_tokens": 4}) == Strategy("boundary", 0.15, (1, 2), 4)
    assert base.overridden({"recompute_ratio": 1, "check_layers": [3, 0]}) == Strategy("cacheblend", 1.0, (0, 3), 16)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"strategy": "all"}, "strategy"),
        ({"recompute_ratio": 1.5}, "recompute_ratio"),
        ({"recompute_ratio": True}, "recompute_ratio"),
        ({"check_layers": []}, "check_layers"),
        ({"check_layers": [1.0]}, "check_layers"),
        ({"check_layers": 1}, "check_layers"),
        ({"boundary_tokens": -1}, "boundary_tokens"),
        ({"ratio": 0.1}, "unknown keys"),
    ],
)
def test_a_bad_override_is_refused_naming_it(values, named):
    with pytest.raises(ValueError, match=named):
        Strategy("cacheblend", 0.15).overridden(values)
