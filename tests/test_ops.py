"""lmcache_sgl.ops: the compiled kernels must equal the torch reference bit for bit."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl import ops

needs_ext = pytest.mark.skipif(
    not ops.HAVE_EXTENSION, reason="compiled kernels not built (make setup): reference only"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]


def random_bytes(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of `dtype` with random bits (NaN patterns included: compare as bytes)."""
    esize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * esize), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(as_bytes(a), as_bytes(b))


@st.composite
def pools(draw: st.DrawFn, max_slots: int = 40):
    """(buffers, slots): MHA [S, H, D] or MLA [S, 1, D] layers, slots with repeats and 0,
    shuffled or sorted (runs of consecutive slots, which the kernels copy as one segment)."""
    dtype = draw(st.sampled_from(DTYPES))
    layers = draw(st.integers(1, 4))
    mla = draw(st.booleans())
    heads = 1 if mla else draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([1, 3, 8, 64, 128, 576]))
    size = draw(st.integers(1, 64))
    slots = draw(st.lists(st.integers(0, size - 1), max_size=max_slots))
    if draw(st.booleans()):
        slots = slots + [0] * draw(st.integers(1, 3))  # SGLang's padding slot
    slots = sorted(slots) if draw(st.booleans()) else draw(st.permutations(slots))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    buffers = [random_bytes((size, heads, head_dim), dtype, gen) for _ in range(2 * layers)]
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return buffers, torch.tensor(slots, dtype=index_dtype), gen


def flat_for(buffers: list[torch.Tensor], n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    nbytes = len(buffers) * n * buffers[0][0].numel() * buffers[0].element_size()
    return torch.full((nbytes // torch.empty((), dtype=dtype).element_size(),), 7, dtype=dtype)


@needs_ext
@settings(max_examples=150, deadline=None)
@given(pools())
def test_gather_matches_reference(case) -> None:
    buffers, slots, _ = case
    out, ref = flat_for(buffers, len(slots)), flat_for(buffers, len(slots))
    ops.gather(buffers, slots, out)
    ops.reference_gather(buffers, slots, ref)
    assert_same_bits(out, ref)
    row_bytes = out.numel() // max(1, len(buffers) * len(slots))
    if len(slots):  # and the reference itself is right
        rows = as_bytes(out).view(len(buffers), len(slots), row_bytes)
        b, n = len(buffers) - 1, len(slots) - 1
        assert torch.equal(rows[b, n], as_bytes(buffers[b][int(slots[n])]))


@needs_ext
@settings(max_examples=150, deadline=None)
@given(pools())
def test_scatter_matches_reference(case) -> None:
    buffers, slots, gen = case
    src = random_bytes((len(buffers), len(slots), buffers[0][0].numel()), buffers[0].dtype, gen)
    mine = [b.clone() for b in buffers]
    ref = [b.clone() for b in buffers]
    ops.scatter(mine, slots, src)
    ops.reference_scatter(ref, slots, src)
    for a, b in zip(mine, ref):
        assert_same_bits(a, b)
    # Repeated slots: sequential assignment, the last occurrence wins.
    for n, s in enumerate(slots.tolist()):
        if n == max(i for i, t in enumerate(slots.tolist()) if t == s):
            assert_same_bits(ref[0][s], src[0, n])


@settings(max_examples=100, deadline=None)
@given(pools())
def test_scatter_of_gather_restores_rows(case) -> None:
    buffers, slots, _ = case
    slots = torch.unique(slots)  # distinct, so every gathered row has one home
    out = flat_for(buffers, len(slots), buffers[0].dtype)
    ops.gather(buffers, slots, out)
    restored = [torch.zeros_like(b) for b in buffers]
    ops.scatter(restored, slots, out)
    for orig, back in zip(buffers, restored):
        assert_same_bits(back[slots.long()], orig[slots.long()])
        mask = torch.ones(orig.shape[0], dtype=torch.bool)
        mask[slots.long()] = False
        assert not as_bytes(back[mask]).any()


@needs_ext
@pytest.mark.parametrize("pattern", ["random+repeats", "runs", "runs+repeats", "mixed runs"])
def test_large_calls_match(pattern: str) -> None:
    """> 4 MiB: the threaded, non-temporal-store paths, with merged runs of slots or not;
    mixed runs: 2 to 8 rows of 1 KiB, segments on both sides of the kernels' long-segment size."""
    gen = torch.Generator().manual_seed(1)
    buffers = [random_bytes((1024, 8, 64), torch.bfloat16, gen) for _ in range(7)]  # odd: threads split a buffer
    if pattern == "random+repeats":
        slots = torch.randint(0, 1024, (700,), generator=gen)
        slots[::7] = 0
    elif pattern == "mixed runs":
        lengths = torch.randint(2, 9, (128,), generator=gen)
        starts = torch.randperm(1024 // 8, generator=gen) * 8
        slots = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())])
    else:  # shuffled runs of consecutive slots, as a paged allocator hands them out
        runs = torch.randperm(1024 // 16, generator=gen)[:44]
        slots = (runs[:, None] * 16 + torch.arange(16)).flatten()[:700]
        if pattern == "runs+repeats":
            slots[100:110] = slots[300:310]
    out, ref = flat_for(buffers, len(slots)), flat_for(buffers, len(slots))
    ops.gather(buffers, slots, out)
    ops.reference_gather(buffers, slots, ref)
    assert_same_bits(out, ref)
    src = random_bytes((7, len(slots), 512), torch.bfloat16, gen)
    mine, theirs = [b.clone() for b in buffers], [b.clone() for b in buffers]
    ops.scatter(mine, slots, src)
    ops.reference_scatter(theirs, slots, src)
    for a, b in zip(mine, theirs):
        assert_same_bits(a, b)


def split_scatter_case(buffers, slots, gen, cuts):
    """Distinct slots, random chunk buffers, and their split into pieces at `cuts`."""
    slots = slots[torch.randperm(len(slots), generator=gen)]
    bounds = sorted({0, len(slots), *(c % (len(slots) + 1) for c in cuts)})
    row = buffers[0][0].numel()
    srcs = [random_bytes((len(buffers), hi - lo, row), buffers[0].dtype, gen) for lo, hi in zip(bounds, bounds[1:])]
    return slots, bounds, srcs


def assert_scatter_many_matches(buffers, slots, bounds, srcs) -> None:
    """scatter_many equals the reference scattering the pieces one by one."""
    mine, ref = [b.clone() for b in buffers], [b.clone() for b in buffers]
    ops.scatter_many(mine, slots, srcs)
    for lo, hi, src in zip(bounds, bounds[1:], srcs):
        ops.reference_scatter(ref, slots[lo:hi], src.contiguous())
    for a, b in zip(mine, ref):
        assert_same_bits(a, b)


@settings(max_examples=150, deadline=None)
@given(pools(), st.lists(st.integers(0, 100), max_size=6))
def test_scatter_many_equals_scatters_one_by_one(case, cuts) -> None:
    buffers, slots, gen = case
    assert_scatter_many_matches(buffers, *split_scatter_case(buffers, torch.unique(slots), gen, cuts))


def as_slices(srcs, gen, margin: int):
    """Each piece as the same rows in a slice of a longer buffer (random rows around it)."""
    out = []
    for src in srcs:
        before, after = (int(x) for x in torch.randint(0, margin + 1, (2,), generator=gen))
        longer = random_bytes((src.shape[0], before + src.shape[1] + after, src.shape[2]), src.dtype, gen)
        longer[:, before : before + src.shape[1]] = src
        out.append(longer[:, before : before + src.shape[1]])
    return out


@settings(max_examples=100, deadline=None)
@given(pools(), st.lists(st.integers(0, 100), max_size=6), st.integers(0, 40))
def test_scatter_many_copies_slices_of_longer_buffers(case, cuts, margin) -> None:
    """A piece that is a slice along n of a longer chunk (a load's partial last chunk) is
    read from where it lies, each buffer's rows from their own offset."""
    buffers, slots, gen = case
    slots, bounds, srcs = split_scatter_case(buffers, torch.unique(slots), gen, cuts)
    assert_scatter_many_matches(buffers, slots, bounds, as_slices(srcs, gen, margin))


@pytest.mark.parametrize("cuts", [[256 * k for k in range(1, 8)], [1, 2, 1000, 1001, 1500]])
def test_scatter_many_large_threaded(cuts) -> None:
    """Over 8 MiB: pieces shared among threads, a thread's range starting mid-piece."""
    gen = torch.Generator().manual_seed(3)
    buffers = [random_bytes((4096, 4, 64), torch.bfloat16, gen) for _ in range(16)]
    assert_scatter_many_matches(buffers, *split_scatter_case(buffers, torch.randperm(4096, generator=gen)[:2047], gen, cuts))


def test_scatter_many_refuses_bad_input() -> None:
    buffers = [torch.zeros(8, 2, 4, dtype=torch.bfloat16) for _ in range(2)]
    src = torch.zeros(2, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="distinct"):
        ops.scatter_many(buffers, torch.tensor([3, 3]), [src])
    with pytest.raises(ValueError, match="hold 2 slots, expected 3"):
        ops.scatter_many(buffers, torch.tensor([1, 2, 3]), [src])
    with pytest.raises(IndexError):
        ops.scatter_many(buffers, torch.tensor([1, 8]), [src])
    rows = torch.zeros(2, 4, 16, dtype=torch.uint8)
    for bad in (rows[:, :2, :8], rows[:, ::2], rows.transpose(0, 1)[:2, :2], torch.zeros(3, 4, 16, dtype=torch.uint8)[:, :2]):
        with pytest.raises(ValueError, match="each buffer's rows contiguous"):
            ops.scatter_many(buffers, torch.tensor([1, 2]), [bad])
    assert not any(b.any() for b in buffers)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 5000),
    elem_size=st.sampled_from([1, 2, 3, 4, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shuffle_roundtrip_and_reference(n: int, elem_size: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (n * elem_size,), dtype=torch.uint8, generator=gen)
    shuffled, back = torch.empty_like(src), torch.empty_like(src)
    ops.shuffle_bytes(src, shuffled, elem_size)
    ops.unshuffle_bytes(shuffled, back, elem_size)
    assert torch.equal(back, src)
    ref = torch.empty_like(src)
    ops.reference_shuffle_bytes(src, ref, elem_size)
    assert torch.equal(shuffled, ref)
    if n:
        assert torch.equal(shuffled[: n], src.view(n, elem_size)[:, 0])
    ops.reference_unshuffle_bytes(ref, back, elem_size)
    assert torch.equal(back, src)


@pytest.mark.parametrize("elem_size", [2, 4])
def test_shuffle_large_bf16(elem_size: int) -> None:
    """A multi-MiB KV-like buffer (threaded path) viewed in its own dtype."""
    src = random_bytes((3 << 20,), torch.bfloat16, torch.Generator().manual_seed(2))
    shuffled, back, ref = (torch.empty_like(src) for _ in range(3))
    ops.shuffle_bytes(src, shuffled, elem_size)
    ops.reference_shuffle_bytes(src, ref, elem_size)
    assert_same_bits(shuffled, ref)
    ops.unshuffle_bytes(shuffled, back, elem_size)
    assert_same_bits(back, src)


@pytest.mark.parametrize("mla", [False, True])
def test_sglang_pool(mla: bool) -> None:
    memory_pool = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    common = dict(size=300, page_size=1, dtype=torch.bfloat16, layer_num=3, device="cpu",
                  enable_memory_saver=False)
    if mla:
        pool = memory_pool.MLATokenToKVPool(kv_lora_rank=64, qk_rope_head_dim=16, **common)
        buffers = list(pool.kv_buffer)
    else:
        pool = memory_pool.MHATokenToKVPool(head_num=4, head_dim=32, **common)
        buffers = list(pool.k_buffer) + list(pool.v_buffer)
    gen = torch.Generator().manual_seed(3)
    for b in buffers:
        b.copy_(random_bytes(tuple(b.shape), b.dtype, gen))
    slots = torch.randperm(pool.size + 1, generator=gen)[:256]
    slots[-3:] = 0
    out, ref = flat_for(buffers, 256, torch.bfloat16), flat_for(buffers, 256, torch.bfloat16)
    ops.gather(buffers, slots, out)
    ops.reference_gather(buffers, slots, ref)
    assert_same_bits(out, ref)
    saved = [b.clone() for b in buffers]
    for b in buffers:
        b.zero_()
    ops.scatter(buffers, slots, out)
    for b, s in zip(buffers, saved):
        assert_same_bits(b[slots], s[slots])


def test_errors() -> None:
    buffers = [torch.zeros(10, 2, 4, dtype=torch.float16) for _ in range(2)]
    slots = torch.tensor([1, 2, 3])
    good = torch.empty(2 * 3 * 16, dtype=torch.uint8)
    for fn in (ops.gather, ops.scatter, ops.reference_gather, ops.reference_scatter):
        with pytest.raises(ValueError, match="bytes"):
            fn(buffers, slots, torch.empty(good.numel() - 1, dtype=torch.uint8))
        for bad in ([-1], [10], [0, 11]):
            with pytest.raises(IndexError):
                fn(buffers, torch.tensor(bad), torch.empty(2 * len(bad) * 16, dtype=torch.uint8))
        with pytest.raises(ValueError):
            fn(buffers, slots.float(), good)
        with pytest.raises(ValueError):
            fn([buffers[0], torch.zeros(10, 2, 4)], slots, good)
        with pytest.raises(ValueError):
            fn([], slots, good)
    src = torch.zeros(10, dtype=torch.uint8)
    for fn in (ops.shuffle_bytes, ops.unshuffle_bytes, ops.reference_shuffle_bytes,
               ops.reference_unshuffle_bytes):
        with pytest.raises(ValueError):
            fn(src, torch.zeros(10, dtype=torch.uint8), 3)
        with pytest.raises(ValueError):
            fn(src, torch.zeros(12, dtype=torch.uint8), 2)
        with pytest.raises(ValueError):
            fn(src, torch.zeros(10, dtype=torch.uint8), 0)


@needs_ext
def test_c_abi_rejects_bad_sizes() -> None:
    src = torch.zeros(10, dtype=torch.uint8)
    assert ops._CPU.lmcsgl_shuffle_bytes(src.data_ptr(), src.data_ptr(), 10, 3) == 1
    assert ops._CPU.lmcsgl_unshuffle_bytes(src.data_ptr(), src.data_ptr(), 10, 0) == 1
    assert ops._CPU.lmcsgl_gather_rows(None, -1, 4, None, 1, None) == 1


def test_cuda_library_loads_without_a_gpu() -> None:
    """The CUDA library links cudart statically: loading it needs no driver or device."""
    if not (Path(ops.__file__).parent / "_kernels_cuda.so").exists():
        pytest.skip("CUDA kernels not built (no nvcc at build time)")
    lib = ops._load("_kernels_cuda", "lmcsgl_cuda_", [ctypes.c_void_p])
    if not Path("/dev/nvidiactl").exists():  # no driver: the kernels cannot run
        assert lib.lmcsgl_cuda_check() != 0
    assert lib.lmcsgl_cuda_shuffle_bytes(None, None, 0, 2, None) == 0  # nothing to launch
    assert lib.lmcsgl_cuda_shuffle_bytes(None, None, 3, 2, None) == 1  # cudaErrorInvalidValue
    assert lib.lmcsgl_cuda_gather_rows(None, -1, 16, None, 1, None, None) == 1


@needs_cuda
@settings(max_examples=60, deadline=None)
@given(pools(), st.sampled_from([1, 2, 3, 4, 8]))
def test_cuda_matches_reference(case, elem_size: int) -> None:
    if ops._cuda_lib() is None:
        pytest.skip("CUDA kernels not built")
    buffers, slots, gen = case
    dev = [b.cuda() for b in buffers]
    out, ref = flat_for(buffers, len(slots)).cuda(), flat_for(buffers, len(slots))
    ops.gather(dev, slots.cuda(), out)
    ops.reference_gather(buffers, slots, ref)
    assert_same_bits(out.cpu(), ref)
    src = random_bytes((len(buffers), len(slots), buffers[0][0].numel()), buffers[0].dtype, gen)
    ops.scatter(dev, slots, src.cuda())  # CPU slots are moved to the pool's device
    ops.reference_scatter(buffers, slots, src)
    for a, b in zip(dev, buffers):
        assert_same_bits(a.cpu(), b)
    count = int(torch.randint(0, 3000, (1,), generator=gen))
    data = torch.randint(0, 256, (elem_size * count,), dtype=torch.uint8, generator=gen)
    shuffled, ref_shuffled = torch.empty_like(data).cuda(), torch.empty_like(data)
    ops.shuffle_bytes(data.cuda(), shuffled, elem_size)
    ops.reference_shuffle_bytes(data, ref_shuffled, elem_size)
    assert torch.equal(shuffled.cpu(), ref_shuffled)
    back = torch.empty_like(shuffled)
    ops.unshuffle_bytes(shuffled, back, elem_size)
    assert torch.equal(back.cpu(), data)
