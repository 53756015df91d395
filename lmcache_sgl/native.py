"""xxh3-64, one-shot zstd decompression and memmove called through ctypes, which releases
the GIL, so that the codec's per-block work runs on every core at once.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np
import xxhash
import zstandard

ZstdError = zstandard.ZstdError
_P, _SIZE = ctypes.c_void_p, ctypes.c_size_t


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
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = _local.dctx = _CREATE_DCTX()  # one per thread, kept for the thread's life
            if not dctx:
                raise MemoryError("ZSTD_createDCtx failed")
        s = _array(src)
        # An error is a size_t near 2**64 (ZSTD_isError's rule), never d.size.
        got = _DECOMPRESS(dctx, d.ctypes.data, d.size, s.ctypes.data, s.size)
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
