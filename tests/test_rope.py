"""RoPE re-rotation of cached K: ops.rope_angles / ops.rerotate_ and sglang.rope.rope_spec.

The compiled kernels must equal the torch reference bit for bit (NaN payloads aside); the
rotation composes; and on SGLang's own rotary embeddings, K rotated at p then re-rotated by
delta matches K rotated at p + delta to within the bf16 rounding both sides carry.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl import ops

base = pytest.importorskip("sglang.srt.layers.rotary_embedding.base")
from sglang.srt.layers.rotary_embedding import get_rope  # noqa: E402
from sglang.srt.layers.utils.common import PPMissingLayer  # noqa: E402

from lmcache_sgl.models import PRESETS  # noqa: E402
from lmcache_sgl.sglang.rope import RopeSpec, rope_spec, rope_spec_of  # noqa: E402

needs_ext = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled kernels not built (make setup)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def inv_freq_of(theta: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Values over a wide range of magnitudes (subnormal to overflowing in fp16), with some
    zeros, infinities and NaNs."""
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-24, 20, shape, generator=gen).float())
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, 65504.0, 70000.0])
    pick = torch.rand(shape, generator=gen) < 0.03
    x[pick] = specials[torch.randint(0, len(specials), (int(pick.sum()),), generator=gen)]
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bits, except that a NaN need only be a NaN on both sides."""
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(bits(torch.where(nan, 0, a)), bits(torch.where(nan, 0, b)))


def both_ways(k: torch.Tensor, cos, sin, rotary_dim: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel result, reference result) of rotating copies of k."""
    mine, ref = k.clone(), k.clone()
    ops.rerotate_(mine, cos, sin, rotary_dim, neox)
    ops._rerotate_reference(ref, cos, sin, rotary_dim, neox)
    return mine, ref


@st.composite
def rope_cases(draw: st.DrawFn):
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    head_dim = draw(st.sampled_from([2, 3, 8, 64, 80, 96, 128, 256]))
    rotary_dim = 2 * draw(st.integers(1, head_dim // 2))
    delta = draw(st.one_of(st.integers(-64, 64), st.integers(-(10**7), 10**7), st.sampled_from([-(2**31), 2**31])))
    return dict(
        shape=(*lead, head_dim),
        dtype=draw(st.sampled_from(DTYPES)),
        rotary_dim=rotary_dim,
        neox=draw(st.booleans()),
        delta=delta,
        theta=draw(st.sampled_from([100.0, 10000.0, 500000.0, 1e6])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_ext
@settings(max_examples=200, deadline=None)
@given(rope_cases())
def test_kernel_matches_reference(case) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    k = values(case["shape"], case["dtype"], gen)
    cos, sin = ops.rope_angles(case["delta"], inv_freq_of(case["theta"], case["rotary_dim"]))
    mine, ref = both_ways(k, cos, sin, case["rotary_dim"], case["neox"])
    assert_same_bits(mine, ref)
    assert torch.equal(bits(mine[..., case["rotary_dim"] :]), bits(k[..., case["rotary_dim"] :]))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_precision_pattern(dtype: torch.dtype) -> None:
    """All 65536 bit patterns, each as the first and as the second element of a pair, at
    angles with cos = 1 and sin = 0 exactly and at others: the conversions and the rounding."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(0)
    k = torch.stack((patterns, patterns[torch.randperm(len(patterns), generator=gen)]), dim=-1)
    for delta in (0, 1, -1, 2, 3, 1000, -123456, 2**30):
        cos, sin = ops.rope_angles(delta, torch.tensor([1.0]))
        mine, ref = both_ways(k, cos, sin, 2, True)
        assert_same_bits(mine, ref)


@needs_ext
def test_fp32_bit_patterns_and_threads() -> None:
    """Random fp32 bit patterns; and a 16 MiB bf16 call (over 8 MiB: the threaded path)."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randint(-(2**31), 2**31, (1 << 18, 4), dtype=torch.int64, generator=gen).to(torch.int32)
    cos, sin = ops.rope_angles(-77, inv_freq_of(10000.0, 4))
    assert_same_bits(*both_ways(k.view(torch.float32), cos, sin, 4, False))
    big = values((8192, 8, 128), torch.bfloat16, gen)
    cos, sin = ops.rope_angles(4096, inv_freq_of(500000.0, 128))
    assert_same_bits(*both_ways(big, cos, sin, 128, True))


def rotated(k: torch.Tensor, inv_freq: torch.Tensor, deltas: list[int], neox: bool) -> torch.Tensor:
    out = k.clone()
    for delta in deltas:
        ops.rerotate_(out, *ops.rope_angles(delta, inv_freq), 2 * len(inv_freq), neox)
    return out


# fp32 composition: each rotation rounds every element once or twice and every cos/sin once,
# so two rotations and one differ by a few fp32 ulps: bound 2^-19 * max|k| (measured < 2^-22).
FP32_COMPOSE_TOL = 2.0**-19


@settings(max_examples=100, deadline=None)
@given(
    a=st.integers(-(10**6), 10**6),
    b=st.integers(-(10**6), 10**6),
    theta=st.sampled_from([10000.0, 500000.0]),
    neox=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotations_compose(a: int, b: int, theta: float, neox: bool, seed: int) -> None:
    k = torch.randn(7, 2, 64, generator=torch.Generator().manual_seed(seed))
    inv = inv_freq_of(theta, 64)
    tol = FP32_COMPOSE_TOL * k.abs().max().item()
    assert (rotated(k, inv, [a, b], neox) - rotated(k, inv, [a + b], neox)).abs().max().item() <= tol
    assert (rotated(k, inv, [a, -a], neox) - k).abs().max().item() <= tol
    assert torch.equal(rotated(k, inv, [0], neox), k)  # cos 1, sin 0: exact


def test_rope_angles() -> None:
    inv = inv_freq_of(10000.0, 128)
    for delta in (0, 5, -5, 123456789, -(2**40)):
        cos, sin = ops.rope_angles(delta, inv)
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == inv.shape
        exact = delta * inv.double()
        assert (cos.double() - exact.cos()).abs().max() <= 2.0**-24  # fp32 rounding of float64 values
        assert (sin.double() - exact.sin()).abs().max() <= 2.0**-24
    assert torch.equal(ops.rope_angles(0, inv)[0], torch.ones(64))
    assert torch.equal(ops.rope_angles(0, inv)[1], torch.zeros(64))


@pytest.fixture
def cpu_rope(monkeypatch: pytest.MonkeyPatch):
    """get_rope as SGLang's CPU engine builds it (SGLANG_USE_CPU_ENGINE=1 sets base._is_cpu;
    without it the constructor looks for vllm's CUDA kernels). On the CPU its cos/sin cache
    is kept in the model dtype (bf16 here), as SGLang does."""
    monkeypatch.setattr(base, "_is_cpu", True)

    def make(head_dim=64, rotary_dim=64, max_position=40000, theta=10000, neox=True, scaling=None, **kw):
        return get_rope(head_dim, rotary_dim, max_position, theta, neox, scaling, torch.bfloat16, **kw)

    return make


def bf16_ulp(magnitude: float) -> float:
    """The spacing of bf16 values at `magnitude` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(magnitude)) - 7)


# Real ropes: SGLang's forward_native rotates bf16 K with a bf16 cos/sin cache and bf16 ops
# (each rounded), and the re-rotation rounds once more, so the two paths differ by bf16
# rounding: bound 4 bf16 ulps at max|k| (measured: at most 2).
REAL_ROPE_TOL_ULPS = 4


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("kind", ["default", "llama3", "linear"])
def test_matches_sglang_rotary_embedding(cpu_rope, kind: str, neox: bool) -> None:
    scaling = {"default": None, "llama3": LLAMA3, "linear": {"rope_type": "linear", "factor": 2.0}}[kind]
    theta = 500000 if kind == "llama3" else 10000
    rope = cpu_rope(theta=theta, neox=neox, scaling=scaling)
    spec = rope_spec_of(rope)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for p, n, delta in ((0, 64, 100), (500, 128, -400), (3000, 64, 20000), (30000, 32, -29000), (100, 16, 7)):
        k = (torch.randn(n, 4, 64, generator=gen) * 3).to(torch.bfloat16)
        q = torch.zeros_like(k)
        positions = torch.arange(p, p + n)
        _, at_p = rope.forward_native(positions, q.clone(), k.clone())
        _, at_moved = rope.forward_native(positions + delta, q.clone(), k.clone())
        moved = at_p.contiguous().clone()
        ops.rerotate_(moved, *ops.rope_angles(delta, spec.inv_freq), spec.rotary_dim, spec.neox)
        err = (moved.float() - at_moved.float()).abs().max().item()
        worst = max(worst, err / bf16_ulp(k.float().abs().max().item()))
    assert worst <= REAL_ROPE_TOL_ULPS


class _Attn(torch.nn.Module):
    def __init__(self, rope: torch.nn.Module) -> None:
        super().__init__()
        self.rotary_emb = rope


class _Layer(torch.nn.Module):
    def __init__(self, rope: torch.nn.Module) -> None:
        super().__init__()
        self.self_attn = _Attn(rope)


class _Model(torch.nn.Module):
    """SGLang's Llama layout: model.model.layers[i].self_attn.rotary_emb."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layers)


def test_rope_spec_of_a_llama_layout(cpu_rope) -> None:
    """The ropes SGLang's LlamaAttention builds for the tiny preset (get_rope(head_dim,
    head_dim, max_position_embeddings, rope_theta 10000)), one per layer."""
    tiny = PRESETS["tiny"]
    head_dim = tiny["hidden_size"] // tiny["num_attention_heads"]
    rope = cpu_rope(head_dim, head_dim, tiny["max_position_embeddings"], 10000)
    layers = [_Layer(rope) for _ in range(tiny["num_hidden_layers"])]
    spec = rope_spec(_Model([PPMissingLayer(), *layers[1:]]))  # another pipeline rank's layer is skipped
    assert isinstance(spec, RopeSpec) and spec.rotary_dim == head_dim and spec.neox
    assert spec.inv_freq.dtype == torch.float32 and spec.inv_freq.device.type == "cpu"
    assert torch.equal(spec.inv_freq, inv_freq_of(10000, head_dim))
    whole = rope_spec(_Model(layers))
    assert (whole.rotary_dim, whole.neox) == (head_dim, True) and torch.equal(whole.inv_freq, spec.inv_freq)

    partial = rope_spec_of(cpu_rope(128, 128, 4096, 10000, neox=False, partial_rotary_factor=0.5))
    assert (partial.rotary_dim, partial.neox) == (64, False)
    assert torch.equal(partial.inv_freq, inv_freq_of(10000, 64))
    llama3 = cpu_rope(theta=500000, scaling=LLAMA3)
    assert torch.equal(rope_spec_of(llama3).inv_freq, llama3._compute_inv_freq(500000).float())
    assert not torch.equal(rope_spec_of(llama3).inv_freq, inv_freq_of(500000, 64))  # the bands are rescaled
    linear = rope_spec_of(cpu_rope(scaling={"rope_type": "linear", "factor": 4.0}))
    assert torch.equal(linear.inv_freq, (inv_freq_of(10000, 64).double() / 4).float())

    other = cpu_rope(theta=20000)
    with pytest.raises(ValueError, match="layers 0 and 2"):
        rope_spec(_Model([_Layer(rope), _Layer(rope), _Layer(other)]))
    with pytest.raises(ValueError, match="no model.layers"):
        rope_spec(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer 1 has no self_attn.rotary_emb"):
        rope_spec(_Model([_Layer(rope), torch.nn.Linear(2, 2)]))


@pytest.mark.parametrize(
    "scaling, name",
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "YaRNScalingRotaryEmbedding"),
        ({"rope_type": "default", "mrope_section": [16, 8, 8]}, "MRotaryEmbedding"),
        ({"rope_type": "dynamic", "factor": 2.0}, "DynamicNTKScalingRotaryEmbedding"),
        ({"rope_type": "linear", "factor": [1.0, 2.0]}, "LinearScalingRotaryEmbedding with scaling factors"),
    ],
)
def test_rope_spec_refuses(cpu_rope, scaling: dict, name: str) -> None:
    rope = cpu_rope(max_position=4096, scaling=scaling)
    with pytest.raises(ValueError, match=name):
        rope_spec_of(rope)
    with pytest.raises(ValueError, match=name):
        rope_spec(_Model([_Layer(rope)]))


def test_errors() -> None:
    k = torch.zeros(3, 8, dtype=torch.bfloat16)
    cos, sin = ops.rope_angles(3, inv_freq_of(10000.0, 8))
    for fn in (ops.rerotate_, ops._rerotate_reference):
        for rotary_dim in (0, 7, 10):
            with pytest.raises(ValueError, match="rotary_dim"):
                fn(k, cos, sin, rotary_dim, True)
        with pytest.raises(ValueError, match="contiguous"):
            fn(torch.zeros(8, 3, dtype=torch.bfloat16).t(), cos, sin, 8, True)
        with pytest.raises(ValueError, match="bf16"):
            fn(torch.zeros(3, 8, dtype=torch.int16), cos, sin, 8, True)
        with pytest.raises(ValueError, match="fp32"):
            fn(k, cos.double(), sin, 8, True)
        with pytest.raises(ValueError, match="fp32"):
            fn(k, cos[:2], sin[:2], 8, True)
    assert not k.any()


@needs_ext
def test_c_abi_rejects_bad_arguments() -> None:
    k = torch.zeros(2, 8)
    cos, sin = torch.ones(4), torch.zeros(4)
    call = ops._CPU.lmcsgl_rope_rotate
    assert call(k.data_ptr(), 0, 2, 8, 8, cos.data_ptr(), sin.data_ptr(), 1) == 0
    assert call(k.data_ptr(), 3, 2, 8, 8, cos.data_ptr(), sin.data_ptr(), 1) == 1  # unknown dtype
    assert call(k.data_ptr(), 0, 2, 8, 7, cos.data_ptr(), sin.data_ptr(), 1) == 1  # odd rotary_dim
    assert call(k.data_ptr(), 0, 2, 8, 10, cos.data_ptr(), sin.data_ptr(), 1) == 1  # > head_dim
    assert call(k.data_ptr(), 0, -1, 8, 8, cos.data_ptr(), sin.data_ptr(), 1) == 1
    assert call(None, 0, 2, 8, 8, None, None, 1) == 1
    assert call(None, 0, 0, 8, 8, None, None, 1) == 0  # nothing to do


def test_cuda_library_rejects_bad_arguments_without_a_gpu() -> None:
    if not (Path(ops.__file__).parent / "_kernels_cuda.so").exists():
        pytest.skip("CUDA kernels not built (no nvcc at build time)")
    lib = ops._load("_kernels_cuda", "lmcsgl_cuda_", [ctypes.c_void_p])
    assert lib.lmcsgl_cuda_rope_rotate(None, 2, 0, 64, 64, None, None, 1, None) == 0  # nothing to launch
    assert lib.lmcsgl_cuda_rope_rotate(None, 2, 4, 64, 63, None, None, 1, None) == 1  # cudaErrorInvalidValue
    assert lib.lmcsgl_cuda_rope_rotate(None, 9, 4, 64, 64, None, None, 1, None) == 1


@needs_cuda
@settings(max_examples=100, deadline=None)
@given(rope_cases())
def test_cuda_matches_reference(case) -> None:
    if ops._cuda_lib() is None:
        pytest.skip("CUDA kernels not built")
    gen = torch.Generator().manual_seed(case["seed"])
    k = values(case["shape"], case["dtype"], gen)
    cos, sin = ops.rope_angles(case["delta"], inv_freq_of(case["theta"], case["rotary_dim"]))
    on_gpu, ref_gpu, ref = k.cuda(), k.cuda(), k.clone()
    ops.rerotate_(on_gpu, cos, sin, case["rotary_dim"], case["neox"])  # the CUDA kernel; CPU cos/sin are moved
    ops._rerotate_reference(ref_gpu, cos, sin, case["rotary_dim"], case["neox"])  # torch's CUDA ops
    ops._rerotate_reference(ref, cos, sin, case["rotary_dim"], case["neox"])
    assert_same_bits(on_gpu.cpu(), ref)
    assert_same_bits(ref_gpu.cpu(), ref)
