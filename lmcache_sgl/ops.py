"""Row gather/scatter between SGLang's KV pool and a chunk buffer, byte-plane shuffle, and
RoPE re-rotation of cached K.

The compiled kernels (src/kernels/, a plain C ABI loaded with ctypes) run when built; a torch
reference with identical output bits runs otherwise. Pool `buffers` are SGLang's per-layer
buffers, each contiguous [S, ...] (MHA k/v [S, kv_heads, head_dim], MLA [S, 1, dim]), all of
one dtype, shape and device; a row is one slot of one buffer. A chunk buffer is contiguous, of
any dtype, and holds [B, N, row] bytes. Every op writes its output in place and returns None;
on CUDA it is enqueued on the current stream. All but rerotate_() move raw bytes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger("lmcache_sgl")
_DIR = Path(__file__).resolve().parent
_P, _I = ctypes.c_void_p, ctypes.c_int64
_CPU_ERRORS = {1: "invalid argument", 2: "out of memory"}


def _load(name: str, prefix: str, extra: list) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_DIR / f"{name}.so"))
    for fn, args in (
        ("gather_rows", [_P, _I, _I, _P, _I, _P]),
        ("scatter_rows", [_P, _I, _I, _P, _I, _P]),
        ("shuffle_bytes", [_P, _P, _I, _I]),
        ("unshuffle_bytes", [_P, _P, _I, _I]),
        ("rope_rotate", [_P, _I, _I, _I, _I, _P, _P, _I]),
    ):
        f = getattr(lib, prefix + fn)
        f.argtypes, f.restype = args + extra, ctypes.c_int
    return lib


try:
    _cpu_lib = _load("_kernels_cpu", "lmcsgl_", [])
    _cpu_lib.lmcsgl_scatter_rows_batch.argtypes = [_P, _I, _I, _P, _P, _I, _P, _P]
    _cpu_lib.lmcsgl_scatter_rows_batch.restype = ctypes.c_int
    _CPU: ctypes.CDLL | None = _cpu_lib
except (OSError, AttributeError) as e:
    _CPU = None
    logger.warning(
        "compiled kernels unavailable (%s); using the slower torch reference ops. Build them with `make setup`.",
        str(e).splitlines()[0],
    )
HAVE_EXTENSION: bool = _CPU is not None


def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled CPU kernels library (for lmcache_sgl.native's frame reader); None when absent."""
    return _CPU


@functools.cache
def _cuda_lib() -> ctypes.CDLL | None:
    """The CUDA library, loaded on first use with a CUDA tensor; None when absent."""
    try:
        lib = _load("_kernels_cuda", "lmcsgl_cuda_", [_P])
        lib.lmcsgl_cuda_error_string.argtypes = [ctypes.c_int]
        lib.lmcsgl_cuda_error_string.restype = ctypes.c_char_p
        rc = lib.lmcsgl_cuda_check()  # an old driver or a GPU arch not compiled for
        if rc != 0:
            raise OSError(lib.lmcsgl_cuda_error_string(rc).decode())
        return lib
    except (OSError, AttributeError) as e:
        logger.warning("CUDA kernels unavailable (%s); using torch reference ops.", e)
        return None


def _lib(t: torch.Tensor) -> ctypes.CDLL | None:
    return _cuda_lib() if t.is_cuda else _CPU if t.device.type == "cpu" else None


def _call(lib: ctypes.CDLL, fn: str, cuda_device: torch.device | None, *args: object) -> None:
    if cuda_device is None:
        rc = getattr(lib, "lmcsgl_" + fn)(*args)
    else:
        rc = getattr(lib, "lmcsgl_cuda_" + fn)(*args, torch.cuda.current_stream(cuda_device).cuda_stream)
    if rc != 0:
        cuda = cuda_device is not None
        why = lib.lmcsgl_cuda_error_string(rc).decode() if cuda else _CPU_ERRORS.get(rc, "?")
        raise RuntimeError(f"lmcache_sgl kernel {fn} failed: {why} (code {rc})")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_pool(buffers: Sequence[torch.Tensor]) -> int:
    """Validates the pool buffers; returns row_bytes."""
    if len(buffers) == 0 or buffers[0].dim() < 1:
        raise ValueError("need at least one pool buffer with a slot dimension")
    b0 = buffers[0]
    for b in buffers:
        if b.dtype != b0.dtype or b.shape != b0.shape or b.device != b0.device:
            raise ValueError(
                f"pool buffers differ: {b.dtype}{tuple(b.shape)}@{b.device} vs {b0.dtype}{tuple(b0.shape)}@{b0.device}"
            )
        if not b.is_contiguous():
            raise ValueError("pool buffers must be contiguous")
    return math.prod(b0.shape[1:]) * b0.element_size()


def _check_slots(slots: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Validates slots against the pool; returns them as int64 on the pool's device."""
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be 1-D int32/int64, got {slots.dtype}{tuple(slots.shape)}")
    slots = slots.to(device=pool.device, dtype=torch.int64).contiguous()
    if slots.numel():
        lo, hi = torch.stack(torch.aminmax(slots)).tolist()
        if lo < 0 or hi >= pool.shape[0]:
            raise IndexError(f"slots must lie in [0, {pool.shape[0]}), got min {lo} max {hi}")
    return slots


def _check_flat(flat: torch.Tensor, buffers: Sequence[torch.Tensor], num_slots: int, row_bytes: int) -> None:
    if flat.device != buffers[0].device or not flat.is_contiguous():
        raise ValueError(f"the chunk buffer must be contiguous and on {buffers[0].device}")
    need = len(buffers) * num_slots * row_bytes
    if _nbytes(flat) != need:
        raise ValueError(
            f"the chunk buffer has {_nbytes(flat)} bytes, expected {need} = {len(buffers)} "
            f"buffers x {num_slots} slots x {row_bytes} bytes per row"
        )


def _check_rows(buffers: Sequence[torch.Tensor], slots: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Validates a gather/scatter; returns (int64 slots on the pool's device, row_bytes)."""
    row_bytes = _check_pool(buffers)
    slots = _check_slots(slots, buffers[0])
    _check_flat(flat, buffers, slots.numel(), row_bytes)
    return slots, row_bytes


def _last_occurrences(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distinct slots, index of the last occurrence of each), or (slots, None) if distinct."""
    uniq, inverse = torch.unique(slots, return_inverse=True)
    if uniq.numel() == slots.numel():
        return slots, None
    order = torch.arange(slots.numel(), device=slots.device)
    return uniq, torch.zeros_like(uniq).scatter_reduce_(0, inverse, order, "amax", include_self=False)


@functools.lru_cache(maxsize=16)
def _device_ptrs(device: torch.device, ptrs: tuple[int, ...]) -> torch.Tensor:
    arr = torch.tensor(ptrs, dtype=torch.int64).to(device)
    torch.cuda.current_stream(device).synchronize()  # then usable from any stream
    return arr


def _rows(fn: str, buffers: Sequence[torch.Tensor], slots: torch.Tensor, flat: torch.Tensor) -> bool:
    """Runs gather_rows/scatter_rows compiled; False when no library serves flat's device."""
    lib = _lib(flat)
    if lib is None:
        return False
    slots, row_bytes = _check_rows(buffers, slots, flat)
    if not (slots.numel() and row_bytes):
        return True
    ptrs = tuple(b.data_ptr() for b in buffers)
    if not flat.is_cuda:
        _call(
            lib,
            fn,
            None,
            (_P * len(ptrs))(*ptrs),
            len(ptrs),
            row_bytes,
            slots.data_ptr(),
            slots.numel(),
            flat.data_ptr(),
        )
        return True
    if fn == "scatter_rows":  # the CUDA kernel wants distinct slots: keep each one's last row
        slots, last = _last_occurrences(slots)
        if last is not None:
            flat = _bytes(flat).view(len(buffers), -1, row_bytes)[:, last].contiguous()
    arr = _device_ptrs(flat.device, ptrs)
    arr.record_stream(torch.cuda.current_stream(flat.device))
    _call(lib, fn, flat.device, arr.data_ptr(), len(ptrs), row_bytes, slots.data_ptr(), slots.numel(), flat.data_ptr())
    return True


def reference_gather(buffers: Sequence[torch.Tensor], slots: torch.Tensor, out: torch.Tensor) -> None:
    """Torch reference of gather()."""
    slots, row_bytes = _check_rows(buffers, slots, out)
    if slots.numel() and row_bytes:
        flat = _bytes(out).view(len(buffers), slots.numel(), row_bytes)
        for b, buf in enumerate(buffers):
            torch.index_select(_bytes(buf).view(-1, row_bytes), 0, slots, out=flat[b])


def reference_scatter(buffers: Sequence[torch.Tensor], slots: torch.Tensor, src: torch.Tensor) -> None:
    """Torch reference of scatter(): sequential assignment in slot order."""
    slots, row_bytes = _check_rows(buffers, slots, src)
    if slots.numel() and row_bytes:
        flat = _bytes(src).view(len(buffers), slots.numel(), row_bytes)
        slots, last = _last_occurrences(slots)
        for b, buf in enumerate(buffers):
            rows = flat[b] if last is None else flat[b, last]
            _bytes(buf).view(-1, row_bytes).index_copy_(0, slots, rows)


def gather(buffers: Sequence[torch.Tensor], slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, n] = buffers[b][slots[n]], as bytes. Slots may repeat.

    Raises ValueError for mismatched buffers or sizes, IndexError for a slot outside [0, S).
    """
    if not _rows("gather_rows", buffers, slots, out):
        reference_gather(buffers, slots, out)


def scatter(buffers: Sequence[torch.Tensor], slots: torch.Tensor, src: torch.Tensor) -> None:
    """buffers[b][slots[n]] = src[b, n], as bytes. A repeated slot gets its last row.

    Raises as gather() does.
    """
    if not _rows("scatter_rows", buffers, slots, src):
        reference_scatter(buffers, slots, src)


def scatter_many(buffers: Sequence[torch.Tensor], slots: torch.Tensor, srcs: Sequence[torch.Tensor]) -> None:
    """scatter() of several chunk buffers in one call: srcs[p] ([B, n_p, row] bytes) goes to
    the next n_p slots. A piece is contiguous, or a [B, n_p, r] view whose rows of each
    buffer are contiguous (a slice along n of a chunk's bytes, copied from where it lies).
    Slots must be distinct (ValueError otherwise). On the CPU the pieces share the kernel's
    threads; elsewhere they are scattered one by one."""
    row_bytes = _check_pool(buffers)
    slots = _check_slots(slots, buffers[0])
    rows = [_piece_rows(src, buffers, row_bytes) for src in srcs]  # (n_p, rows between buffers)
    if sum(n for n, _ in rows) != slots.numel():
        raise ValueError(f"{len(srcs)} chunk buffers hold {sum(n for n, _ in rows)} slots, expected {slots.numel()}")
    offsets = [0]
    for n, _ in rows:
        offsets.append(offsets[-1] + n)
    distinct = "scatter_many needs distinct slots"
    if _CPU is None or buffers[0].device.type != "cpu" or not (slots.numel() and row_bytes):
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError(distinct)
        for p, src in enumerate(srcs):
            scatter(buffers, slots[offsets[p] : offsets[p + 1]], src.contiguous())
        return
    ptrs = tuple(b.data_ptr() for b in buffers)
    rc = _CPU.lmcsgl_scatter_rows_batch(
        (_P * len(ptrs))(*ptrs),
        len(ptrs),
        row_bytes,
        slots.data_ptr(),
        (_I * len(offsets))(*offsets),
        len(srcs),
        (_P * len(srcs))(*(src.data_ptr() for src in srcs)),
        (_I * len(srcs))(*(stride for _, stride in rows)),
    )
    if rc == 1:  # the kernel checks distinctness (every other argument was checked here)
        raise ValueError(distinct)
    if rc != 0:
        raise RuntimeError(f"lmcache_sgl kernel scatter_rows_batch failed: {_CPU_ERRORS.get(rc, '?')} (code {rc})")


def _piece_rows(src: torch.Tensor, buffers: Sequence[torch.Tensor], row_bytes: int) -> tuple[int, int]:
    """(slots, rows between buffers) of one scatter_many piece; ValueError if it is neither
    a flat chunk buffer nor a [B, n, r] view with each buffer's rows contiguous."""
    per_slot = len(buffers) * row_bytes
    if src.is_contiguous():
        n = _nbytes(src) // per_slot if per_slot else 0
        _check_flat(src, buffers, n, row_bytes)
        return n, n
    size = src.element_size()
    if (
        src.dim() != 3
        or src.device != buffers[0].device
        or src.shape[0] != len(buffers)
        or src.shape[2] * size != row_bytes
        or src.stride(2) != 1
        or src.stride(1) != src.shape[2]
        or src.stride(0) % src.shape[2]
        or src.stride(0) // src.shape[2] < src.shape[1]
    ):
        raise ValueError(
            f"a chunk buffer piece must be contiguous, or [{len(buffers)}, n, {row_bytes} bytes] with "
            f"each buffer's rows contiguous, on {buffers[0].device}; got {tuple(src.shape)} strides {src.stride()}"
        )
    return src.shape[1], src.stride(0) // src.shape[2]


def _check_shuffle(src: torch.Tensor, out: torch.Tensor, elem_size: int) -> int:
    if elem_size < 1:
        raise ValueError(f"elem_size must be >= 1, got {elem_size}")
    if not (src.is_contiguous() and out.is_contiguous()) or src.device != out.device:
        raise ValueError("src and out must be contiguous and on one device")
    n = _nbytes(src)
    if _nbytes(out) != n or n % elem_size:
        raise ValueError(
            f"src has {n} bytes and out {_nbytes(out)}: they must be equal and a multiple of elem_size {elem_size}"
        )
    return n


def reference_shuffle_bytes(src: torch.Tensor, out: torch.Tensor, elem_size: int) -> None:
    """Torch reference of shuffle_bytes()."""
    n = _check_shuffle(src, out, elem_size)
    _bytes(out).view(elem_size, n // elem_size).copy_(_bytes(src).view(-1, elem_size).t())


def reference_unshuffle_bytes(src: torch.Tensor, out: torch.Tensor, elem_size: int) -> None:
    """Torch reference of unshuffle_bytes()."""
    n = _check_shuffle(src, out, elem_size)
    _bytes(out).view(n // elem_size, elem_size).copy_(_bytes(src).view(elem_size, -1).t())


def _shuffle(fn: str, src: torch.Tensor, out: torch.Tensor, elem_size: int) -> bool:
    lib = _lib(src)
    if lib is None:
        return False
    n = _check_shuffle(src, out, elem_size)
    _call(lib, fn, src.device if src.is_cuda else None, src.data_ptr(), out.data_ptr(), n, elem_size)
    return True


def shuffle_bytes(src: torch.Tensor, out: torch.Tensor, elem_size: int) -> None:
    """Byte planes: out[j * n + i] = src[i * elem_size + j], with n = nbytes // elem_size.

    src and out: contiguous, not overlapping, of equal byte size that is a multiple of
    elem_size (else ValueError); any dtypes.
    """
    if not _shuffle("shuffle_bytes", src, out, elem_size):
        reference_shuffle_bytes(src, out, elem_size)


def unshuffle_bytes(src: torch.Tensor, out: torch.Tensor, elem_size: int) -> None:
    """Inverse of shuffle_bytes(): out[i * elem_size + j] = src[j * n + i]."""
    if not _shuffle("unshuffle_bytes", src, out, elem_size):
        reference_unshuffle_bytes(src, out, elem_size)


# The LMCSGL_DTYPE_* codes of lmcsgl.h.
_ROPE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def rope_angles(delta: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angles delta * inv_freq, as fp32 CPU tensors shaped like inv_freq
    ([rotary_dim / 2]): the rotation that moves RoPE-rotated K by delta positions (any sign).

    The product and its cosine and sine are taken in float64 with Python's math (the C
    library, not torch's CPU-dependent vector code), then rounded to fp32: a large |delta|
    keeps its accuracy, and the result does not depend on inv_freq's device.
    """
    freqs = inv_freq.detach().to("cpu", torch.float64).reshape(-1).tolist()
    angles = [delta * f for f in freqs]
    cos = torch.tensor([math.cos(a) for a in angles], dtype=torch.float64)
    sin = torch.tensor([math.sin(a) for a in angles], dtype=torch.float64)
    return cos.float().reshape(inv_freq.shape), sin.float().reshape(inv_freq.shape)


def _check_rope(
    k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a rerotate_(); returns cos and sin on k's device."""
    if k.dtype not in _ROPE_DTYPES or k.dim() < 1 or not k.is_contiguous():
        raise ValueError(f"k must be a contiguous bf16, fp16 or fp32 tensor, got {k.dtype}{tuple(k.shape)}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > k.shape[-1]:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim {k.shape[-1]}], got {rotary_dim}")
    for t in (cos, sin):
        if t.dtype != torch.float32 or tuple(t.shape) != (rotary_dim // 2,):
            raise ValueError(f"cos and sin must be fp32 [{rotary_dim // 2}], got {t.dtype}{tuple(t.shape)}")
    return cos.to(k.device).contiguous(), sin.to(k.device).contiguous()


def _rerotate_reference(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, neox: bool) -> None:
    """Torch reference of rerotate_(): the same fp32 ops, one rounding each, so the same bits
    (NaN payloads aside)."""
    cos, sin = _check_rope(k, cos, sin, rotary_dim)
    rot = k.view(-1, k.shape[-1])[:, :rotary_dim]
    half = rotary_dim // 2
    x1, x2 = (rot[:, :half], rot[:, half:]) if neox else (rot[:, 0::2], rot[:, 1::2])
    a, b = x1.float(), x2.float()  # for fp32 k these alias x1 and x2: both outputs first
    out1 = a * cos - b * sin
    out2 = b * cos + a * sin
    x1.copy_(out1)  # rounds to k's dtype to nearest even
    x2.copy_(out2)


def rerotate_(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, neox: bool) -> None:
    """Rotates RoPE-rotated K in place by the angles whose cos and sin are given, e.g.
    rope_angles(delta, inv_freq): K computed at positions p.. becomes K at p + delta...

    k: contiguous bf16, fp16 or fp32, any leading dims, last dim head_dim, on the CPU or CUDA.
    cos, sin: fp32 [rotary_dim / 2] on any device. rotary_dim: even, 2 <= rotary_dim <= head_dim;
    the first rotary_dim elements of each head_dim vector are rotated, the rest are untouched.
    neox: pairs (x[i], x[i + rotary_dim / 2]), else (x[2i], x[2i + 1]). The math is
    lmcsgl_rope_rotate's (src/kernels/lmcsgl.h): fp32, every operation rounded on its own, the
    result rounded to k's dtype to nearest even. Raises ValueError for arguments outside these.
    """
    cos, sin = _check_rope(k, cos, sin, rotary_dim)
    lib = _lib(k)
    if lib is None:
        _rerotate_reference(k, cos, sin, rotary_dim, neox)
        return
    head_dim = k.shape[-1]
    _call(
        lib,
        "rope_rotate",
        k.device if k.is_cuda else None,
        k.data_ptr(),
        _ROPE_DTYPES[k.dtype],
        k.numel() // head_dim,
        head_dim,
        rotary_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        int(neox),
    )
