"""xxh3-64, one-shot zstd decompression, memmove and the kernels' frame-block reader called
through ctypes, which releases the GIL, so that the codec's per-block work runs on every
core at once.

The xxhash module holds the GIL while it hashes (measured: two threads hash no faster
than one), zstandard's stream reader pays per-call object overhead, and torch's copy_
starts a team of threads, which from inside a worker thread oversubscribes the cores.
XXH3_64bits (its dispatching entry where there is one) comes from the installed xxhash
module's own shared object, which its import has loaded and which exports it;
ZSTD_decompressDCtx from the system's libzstd (Debian's libzstd1, which dpkg itself needs;
every zstd 1.x decodes every 1.x frame). Where either is missing, the xxhash and
zstandard modules' Python APIs are used instead, with the same results;
`HAVE_NATIVE_HASH` and `HAVE_NATIVE_ZSTD` say which path runs.

Contracts: `xxh3_64(buf)` equals `xxhash.xxh3_64_intdigest(buf)`. `zstd_decompress_into(src,
dst)` decodes the zstd frame(s) `src` into `dst`, which they must fill exactly: a corrupt
frame, or one that decodes to more or fewer bytes, raises ZstdError (and leaves `dst`
unspecified). `copy_into(dst, src)` copies bytes between buffers of one size. Buffers are
contiguous objects with the buffer protocol (bytes, memoryview, numpy arrays; a torch
tensor's .numpy()); every function is thread-safe.

`FrameBlocks(...).read(lo, hi, ...)` reads, verifies and decodes a frame file's blocks in
one call of the compiled kernels (src/kernels/: lmcsgl_read_blocks), lent the bound XXH3
and ZSTD_decompressDCtx; `HAVE_NATIVE_READ` says whether it can run (kernels built, both
functions bound).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence

import numpy as np
import xxhash
import zstandard

from .ops import cpu_kernels

ZstdError = zstandard.ZstdError
_P, _SIZE, _I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64


def _bind(path: str | None, name: str, args: list, restype):
    """`name` from the shared object at `path`, typed; None if there is none or it does
    not export it."""
    try:
        fn = getattr(ctypes.CDLL(path), name) if path else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = args, restype
    return fn


_XXHASH_SO = getattr(getattr(xxhash, "_xxhash", None), "__file__", None)
# The dispatching entry (x86 builds) picks the widest vector unit, as the module's own calls do.
_XXH3 = _bind(_XXHASH_SO, "XXH3_64bits_dispatch", [_P, _SIZE], ctypes.c_uint64) or _bind(
    _XXHASH_SO, "XXH3_64bits", [_P, _SIZE], ctypes.c_uint64
)
_LIBZSTD = ctypes.util.find_library("zstd")
_CREATE_DCTX = _bind(_LIBZSTD, "ZSTD_createDCtx", [], _P)
_DECOMPRESS = _bind(_LIBZSTD, "ZSTD_decompressDCtx", [_P, _P, _SIZE, _P, _SIZE], _SIZE)
HAVE_NATIVE_HASH = _XXH3 is not None
HAVE_NATIVE_ZSTD = _CREATE_DCTX is not None and _DECOMPRESS is not None
_local = threading.local()


class _FrameBlocksArgs(ctypes.Structure):
    """lmcsgl_frame_blocks (src/kernels/lmcsgl.h)."""

    _fields_ = [
        ("fd", _I64),
        ("block_bytes", _I64),
        ("raw_bytes", _I64),
        ("offsets", _P),
        ("sizes", _P),
        ("digests", _P),
        ("hash_reset", _P),
        ("hash_update", _P),
        ("hash_digest", _P),
        ("decode", _P),
        ("elem_size", _I64),
    ]


# XXH3-64's streaming functions (the block reader's digest), the dispatching entries where
# there are (as for _XXH3).
_XXH3_CREATE = _bind(_XXHASH_SO, "XXH3_createState", [], _P)
_XXH3_STREAM = (
    _bind(_XXHASH_SO, "XXH3_64bits_reset", [_P], ctypes.c_int),
    _bind(_XXHASH_SO, "XXH3_64bits_update_dispatch", [_P, _P, _SIZE], ctypes.c_int)
    or _bind(_XXHASH_SO, "XXH3_64bits_update", [_P, _P, _SIZE], ctypes.c_int),
    _bind(_XXHASH_SO, "XXH3_64bits_digest", [_P], ctypes.c_uint64),
)


def _bind_read_blocks():
    kernels = cpu_kernels()
    if kernels is None or _XXH3_CREATE is None or None in _XXH3_STREAM or not HAVE_NATIVE_ZSTD:
        return None
    fn = kernels.lmcsgl_read_blocks
    fn.argtypes = [ctypes.POINTER(_FrameBlocksArgs), _I64, _I64, _P, _P, _P, _P, _P, ctypes.POINTER(_I64)]
    fn.restype = ctypes.c_int
    return fn


_READ_BLOCKS = _bind_read_blocks()
HAVE_NATIVE_READ = _READ_BLOCKS is not None
# The addresses every FrameBlocks lends the kernels: XXH3's reset, update, digest; zstd's decoder.
_LENT_HASH = tuple(ctypes.cast(fn, _P) for fn in _XXH3_STREAM) if HAVE_NATIVE_READ else ()
_LENT_DECODE = ctypes.cast(_DECOMPRESS, _P) if HAVE_NATIVE_READ else None
# lmcsgl_read_blocks' codes (lmcsgl.h): IO is an OSError; the rest, BlockError reasons.
_ERR_IO = 3
_BLOCK_ERRORS = {1: "invalid", 4: "short", 5: "digest", 6: "decode"}


class BlockError(Exception):
    """A frame block that must not be used; `reason`: short (the file ends inside it),
    digest (its bytes differ from its digest), decode (it does not decode to its size) or
    invalid (sizes that contradict the frame's layout); `block`: its index."""

    def __init__(self, reason: str, block: int) -> None:
        super().__init__(f"block {block}: {reason}")
        self.reason, self.block = reason, block


class FrameBlocks:
    """The blocks of one frame in an open file (block i: sizes[i] stored bytes at offsets[i],
    digest digests[i], chunk bytes [i * block_bytes, ...) of raw_bytes). `elem_size` 0: raw
    blocks; else zstd blocks of byte planes of that element size. Requires HAVE_NATIVE_READ."""

    def __init__(
        self,
        fd: int,
        block_bytes: int,
        raw_bytes: int,
        offsets: Sequence[int],
        sizes: Sequence[int],
        digests: Sequence[int],
        elem_size: int,
    ) -> None:
        count = len(offsets)
        self._sizes = list(sizes)
        self._arrays = ((_I64 * count)(*offsets), (_I64 * count)(*sizes), (ctypes.c_uint64 * count)(*digests))
        self._zstd = elem_size > 0
        self._args = _FrameBlocksArgs(
            fd,
            block_bytes,
            raw_bytes,
            *(ctypes.cast(a, _P) for a in self._arrays),
            *_LENT_HASH,
            _LENT_DECODE if self._zstd else None,
            elem_size,
        )

    def read(self, lo: int, hi: int, out: np.ndarray, stored: np.ndarray | None, plain: np.ndarray | None) -> None:
        """Blocks [lo, hi) into `out` (the writable chunk buffer, raw_bytes), on this thread
        without the GIL; zstd blocks through `stored` (>= their largest stored size) and
        `plain` (>= block_bytes), which raw blocks do not use. Raises OSError on a read
        error, BlockError on a bad block."""
        if _READ_BLOCKS is None or not out.flags.writeable:
            raise ValueError("the native frame reader is unavailable, or `out` is read-only")
        detail = _I64(0)
        ctx = stored_at = plain_at = None
        if self._zstd:
            if (
                stored is None
                or plain is None
                or stored.size < max(self._sizes[max(lo, 0) : hi], default=0)
                or plain.size < self._args.block_bytes
            ):
                raise ValueError("the buffers are smaller than the blocks they must hold")
            ctx, stored_at, plain_at = _per_thread("dctx", _CREATE_DCTX), stored.ctypes.data, plain.ctypes.data
        rc = _READ_BLOCKS(
            ctypes.byref(self._args),
            lo,
            hi,
            out.ctypes.data,
            _per_thread("xxh3_state", _XXH3_CREATE),
            ctx,
            stored_at,
            plain_at,
            ctypes.byref(detail),
        )
        if rc == _ERR_IO:
            raise OSError(detail.value, os.strerror(detail.value))
        if rc != 0:
            raise BlockError(_BLOCK_ERRORS.get(rc, f"code {rc}"), detail.value)


def _per_thread(name: str, create) -> int:
    """This thread's handle `name`, made by the C function `create` on first use and kept
    for the thread's life (an XXH3 state, a zstd context)."""
    handle = getattr(_local, name, None)
    if handle is None:
        handle = create()
        if not handle:
            raise MemoryError(f"{name}: {create.__name__} failed")
        setattr(_local, name, handle)
    return handle


def _array(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def copy_into(dst, src) -> None:
    """memmove of `src`'s bytes into the writable `dst` of the same size, without the GIL."""
    d, s = _array(dst), _array(src)
    if d.size != s.size or not d.flags.writeable:
        raise ValueError(
            f"cannot copy {s.size} bytes into a{' read-only' * (not d.flags.writeable)} {d.size}-byte buffer"
        )
    ctypes.memmove(d.ctypes.data, s.ctypes.data, d.size)


def xxh3_64(buf) -> int:
    """xxh3-64 of `buf`'s bytes (seed 0), without the GIL where the C function is bound."""
    if _XXH3 is None:
        return xxhash.xxh3_64_intdigest(buf)
    a = _array(buf)
    return _XXH3(a.ctypes.data, a.size)


def zstd_decompress_into(src, dst) -> None:
    """Decode `src` into `dst` (writable), filling it exactly; see the module's contract."""
    d = _array(dst)
    if not d.flags.writeable:
        raise ValueError("dst must be writable")
    if HAVE_NATIVE_ZSTD:
        s = _array(src)
        # An error is a size_t near 2**64 (ZSTD_isError's rule), never d.size.
        got = _DECOMPRESS(_per_thread("dctx", _CREATE_DCTX), d.ctypes.data, d.size, s.ctypes.data, s.size)
    else:
        got = _stream_decompress_into(src, d)
    if got != d.size:
        raise ZstdError(f"zstd data is corrupt or does not decode to {d.size} bytes")


def _stream_decompress_into(src, dst: np.ndarray) -> int:
    """Bytes decoded into `dst`, or len(dst) + 1 if `src` holds more."""
    dctx = getattr(_local, "py_dctx", None)
    if dctx is None:
        dctx = _local.py_dctx = zstandard.ZstdDecompressor()
    view, got = dst.data, 0
    with dctx.stream_reader(src) as reader:
        while got < len(view) and (n := reader.readinto(view[got:])):
            got += n
        return got + 1 if got == len(view) and reader.read(1) else got
