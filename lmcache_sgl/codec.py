"""Self-describing, verified chunk frames.

frame = header | block table | blocks | xxh3-128 digest of header and block table.

The header names the chunk key, the layout (kind, dtype, shape), the codec, the sizes
and the position: the first token's position when the KV was computed (a
position-independent segment is moved from there by its reader). The chunk is cut into
blocks (BLOCK_BYTES: 1 MiB raw, 256 KiB zstd); the block table holds each stored block's
size and xxh3-64 digest, so blocks are read, verified and decoded in parallel on every
core, and the trailing digest covers the table. Codecs: raw (a block is the
chunk's bytes) and zstd (a block is byte-plane shuffled, then zstd-compressed on its
own with the smallest match finder, `compressor`; encoding runs in the caller's thread,
a background writer). Decoding checks
everything and raises a FrameError subclass on any mismatch: callers treat that as a
miss, never as data. Decoding returns the position (parse_header: a FrameHeader holding
it). Frames of versions 1 (one digest over the whole frame) and 2 (no position) raise
OldVersionFrame, a FrameError naming their version.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash
import zstandard

from . import native, ops
from .keys import KEY_BYTES

MAGIC = b"LMSG"
VERSION = 3
CODECS = {"raw": 0, "zstd": 1}
KINDS = {"bytes": 0, "mha": 1, "mla": 2}
DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_DTYPE_CODES = {name: i for i, name in enumerate(DTYPES)}
_DTYPE_NAMES = list(DTYPES)
_KIND_NAMES = {code: name for name, code in KINDS.items()}
_CODEC_NAMES = {code: name for name, code in CODECS.items()}
MAX_DIMS = 6
# Chunk bytes per block, by codec. A zstd block's stored and decoded bytes (about 170 and
# 256 KiB) stay in one core's 512 KiB L2 while it is read, hashed, decoded and unshuffled
# (measured here side by side, 8 runs each: 256 KiB blocks read 4% faster than 1 MiB ones,
# 0.86 against 0.79 of the zstd decode ceiling; same ratio). Raw blocks are read
# RAW_READ_BLOCKS at a time.
BLOCK_BYTES = {"raw": 1 << 20, "zstd": 1 << 18}
# The block sizes a reader accepts: frames of either codec's size (and zstd frames of 1 MiB
# blocks, written before the zstd size shrank); the floor bounds a hostile block table.
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 1 << 16, 1 << 20
# Raw blocks read from a file per read call (measured here: 4 beat 1, 2 and 16, by 15-40%)
RAW_READ_BLOCKS = 4
# magic, version, codec, kind, dtype, ndim, key, shape[6], raw length, block size, blocks,
# position (version 2's header is this one without its trailing position)
_HEADER = struct.Struct(f"<4sHBBBB{KEY_BYTES}s{MAX_DIMS}IQIIQ")
_PREFIX = struct.Struct("<4sH")  # magic, version: read before the rest
_ENTRY = struct.Struct("<QQ")  # a block's stored size and xxh3-64 digest
_DIGEST_BYTES = 16
HEADER_BYTES = _HEADER.size

# torch.frombuffer warns on read-only buffers; frames are only ever read through them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class FrameError(ValueError):
    """A frame that must not be used: the caller counts it as a miss."""


class OldVersionFrame(FrameError):
    """A frame of an earlier format version (written before an upgrade)."""


class TruncatedFrame(FrameError):
    pass


class MalformedFrame(FrameError):
    pass


class ChecksumMismatch(FrameError):
    pass


class KeyMismatch(FrameError):
    pass


class LayoutMismatch(FrameError):
    pass


# native.BlockError reasons as FrameErrors ("invalid": sizes the checked table rules out)
_BLOCK_ERRORS = {
    "short": TruncatedFrame,
    "digest": ChecksumMismatch,
    "decode": MalformedFrame,
    "invalid": MalformedFrame,
}


@dataclass(frozen=True)
class ChunkLayout:
    """The shape and dtype of one chunk buffer, e.g. MHA (2, layers, tokens, heads, dim)."""

    kind: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.dtype not in DTYPES:
            raise ValueError(f"unsupported layout {self}")
        if not 1 <= len(self.shape) <= MAX_DIMS or any(not 0 <= d < 2**32 for d in self.shape):
            raise ValueError(f"unsupported shape {self.shape}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


_WORKERS = os.cpu_count() or 1
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="lmcsgl-codec")
    return _pool


def compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd at `level` (its strategy) with the smallest match finder: KV byte planes hold
    almost no repeats worth a match (the gain is the entropy coding of the exponent
    plane), and the short matches a larger table finds cost more than the literals they
    replace. Measured on a random-weight Llama's bf16 KV at levels 1, 3, 9 and 19: a
    higher ratio (1.488 against 1.467 at level 1), decoding 1.5-2.8x and encoding 2.6-7.5x
    faster. Any zstd decoder reads the frames."""
    params = zstandard.ZstdCompressionParameters.from_level(level, hash_log=6, chain_log=6, search_log=1, min_match=7)
    return zstandard.ZstdCompressor(compression_params=params)


def _compress_block(block: torch.Tensor, elem: int, level: int) -> bytes:
    shuffled = torch.empty_like(block)
    ops.shuffle_bytes(block, shuffled, elem)
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = _local.cctx = compressor(level)
        _local.level = level
    return cctx.compress(memoryview(shuffled.numpy()))


def _decompress_into(block, elem: int, out: torch.Tensor) -> None:
    """Decode one zstd block into `out` through a per-thread scratch buffer (no allocation)."""
    scratch = _scratch("plain", out.numel())[: out.numel()]
    try:
        native.zstd_decompress_into(block, scratch.numpy())
    except native.ZstdError as e:
        raise MalformedFrame(f"zstd block: {e}") from e
    ops.unshuffle_bytes(scratch, out, elem)


def _scratch(name: str, nbytes: int) -> torch.Tensor:
    """A per-thread buffer of at least `nbytes`, reused across calls."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_local, name, buf)
    return buf


def encode(
    key: bytes, layout: ChunkLayout, data: torch.Tensor, codec: str = "raw", level: int = 1, *, position: int = 0
) -> list:
    """Frame of `data` (a contiguous CPU tensor of layout.nbytes bytes), whose first token
    was at `position` (0 <= position < 2**64) when its KV was computed, as a list of buffers.

    The buffers, concatenated, are the frame; they alias `data` for the raw codec, so
    write them out before `data` changes.
    """
    raw = data.reshape(-1).view(torch.uint8)
    if len(key) != KEY_BYTES or raw.numel() != layout.nbytes or codec not in CODECS or not 0 <= position < 2**64:
        raise ValueError(
            f"cannot encode {raw.numel()} bytes as {layout} with key of {len(key)} bytes, codec {codec}, "
            f"position {position}"
        )
    elem = layout.itemsize
    block_bytes = BLOCK_BYTES[codec] - BLOCK_BYTES[codec] % elem
    pieces = raw.split(block_bytes) if raw.numel() else ()
    blocks: list[memoryview | bytes]
    if codec == "raw":
        blocks = [memoryview(piece.numpy()) for piece in pieces]
    else:
        blocks = [_compress_block(piece, elem, level) for piece in pieces]  # in the caller's (background) thread
    shape = tuple(layout.shape) + (0,) * (MAX_DIMS - len(layout.shape))
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        CODECS[codec],
        KINDS[layout.kind],
        _DTYPE_CODES[layout.dtype],
        len(layout.shape),
        key,
        *shape,
        raw.numel(),
        block_bytes,
        len(blocks),
        position,
    )
    table = b"".join(_ENTRY.pack(len(block), native.xxh3_64(block)) for block in blocks)
    return [header, table, *blocks, xxhash.xxh3_128_digest(header + table)]


def frame_bytes(parts: Sequence) -> bytes:
    return b"".join(parts)


@dataclass(frozen=True)
class _Frame:
    """A frame's header and block table, checked against the expected key and layout."""

    codec: int
    block_bytes: int
    sizes: tuple[int, ...]  # stored size of each block
    digests: tuple[int, ...]  # xxh3-64 of each stored block
    table_end: int  # offset of the first block

    @property
    def size(self) -> int:
        return self.table_end + sum(self.sizes) + _DIGEST_BYTES

    def offsets(self) -> list[int]:
        """Where each block starts in the frame."""
        out, at = [], self.table_end
        for size in self.sizes:
            out.append(at)
            at += size
        return out


@dataclass(frozen=True)
class FrameHeader:
    """What a frame's header says: consistent, but not checked against an expected key or
    layout, nor against the frame's digests."""

    key: bytes
    layout: ChunkLayout
    codec: str
    block_bytes: int
    nblocks: int
    position: int  # the first token's position when the KV was computed


def parse_header(buf) -> FrameHeader:
    """The header at the start of `buf` (at least HEADER_BYTES of a frame); raises
    OldVersionFrame for a frame of an earlier version, TruncatedFrame or MalformedFrame if
    it is cut, not a frame of this version, or names no valid layout or blocks."""
    view = memoryview(buf).cast("B")
    if len(view) >= _PREFIX.size:
        magic, version = _PREFIX.unpack_from(view)
        if magic == MAGIC and 1 <= version < VERSION:
            raise OldVersionFrame(f"a version-{version} frame, written before an upgrade (this build reads {VERSION})")
    if len(view) < _HEADER.size:
        raise TruncatedFrame(f"frame of {len(view)} bytes is shorter than a header")
    magic, version, codec, kind, dtype, ndim, key, *rest = _HEADER.unpack_from(view)
    shape, (raw_len, block_bytes, nblocks, position) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if magic != MAGIC or version != VERSION or codec not in _CODEC_NAMES:
        raise MalformedFrame(f"not a version-{VERSION} frame (magic {magic!r}, version {version}, codec {codec})")
    dtype_name = _DTYPE_NAMES[dtype] if dtype < len(_DTYPE_NAMES) else f"dtype code {dtype}"
    try:
        layout = ChunkLayout(_KIND_NAMES.get(kind, f"kind code {kind}"), dtype_name, tuple(shape[:ndim]))
    except ValueError as e:
        raise MalformedFrame(f"header names no valid layout: {e}") from None
    if raw_len != layout.nbytes:
        raise MalformedFrame(f"header says {raw_len} bytes for {layout}")
    if (
        not MIN_BLOCK_BYTES <= block_bytes <= MAX_BLOCK_BYTES
        or block_bytes % layout.itemsize
        or nblocks != -(-raw_len // block_bytes)
    ):
        raise MalformedFrame(f"{nblocks} blocks of {block_bytes} bytes do not match {raw_len} bytes of {layout.dtype}")
    return FrameHeader(key, layout, _CODEC_NAMES[codec], block_bytes, nblocks, position)


def _parse_header(view: memoryview, key: bytes, layout: ChunkLayout) -> FrameHeader:
    """The header at the start of `view`, which must hold `key` and `layout`."""
    header = parse_header(view)
    if header.key != key:
        raise KeyMismatch(f"frame holds key {header.key.hex()}, expected {key.hex()}")
    found = header.layout
    if (found.kind, found.dtype, found.shape) != (layout.kind, layout.dtype, tuple(layout.shape)):
        raise LayoutMismatch(f"frame holds {found}, expected {layout}")
    return header


def _parse_table(head: bytes, table: bytes, digest: bytes, codec: int, block_bytes: int, raw_len: int) -> _Frame:
    """The block table, after the trailing digest has confirmed header and table."""
    if xxhash.xxh3_128_digest(head + table) != digest:
        raise ChecksumMismatch("frame header or block table checksum mismatch")
    entries = list(_ENTRY.iter_unpack(table))
    sizes = tuple(size for size, _ in entries)
    if codec == CODECS["raw"] and any(
        size != min(block_bytes, raw_len - i * block_bytes) for i, size in enumerate(sizes)
    ):
        raise MalformedFrame("raw block size does not match the layout")
    return _Frame(codec, block_bytes, sizes, tuple(d for _, d in entries), len(head) + len(table))


def _flat_out(out: torch.Tensor, nbytes: int) -> torch.Tensor:
    """`out`'s bytes; ValueError unless it holds `nbytes`."""
    dst = out.reshape(-1).view(torch.uint8)
    if dst.numel() != nbytes:
        raise ValueError(f"output holds {dst.numel()} bytes, the chunk has {nbytes}")
    return dst


def _targets(out: torch.Tensor, frame: _Frame, nbytes: int) -> tuple:
    """`out`'s bytes cut into the frame's blocks."""
    return _flat_out(out, nbytes).split(frame.block_bytes) if nbytes else ()


def _check_block(block, expected: int) -> None:
    if native.xxh3_64(block) != expected:
        raise ChecksumMismatch("frame block checksum mismatch")


def decode_into(frame, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> int:
    """Verify `frame` against `key` and `layout`, then write its chunk into `out`, its
    blocks verified and decoded on every core when `parallel`, else on this thread (for
    callers that decode several frames at once, one per core); the chunk's position.

    `out` is a contiguous CPU tensor of layout.nbytes bytes. Raises a FrameError subclass
    (and leaves `out` unspecified) if the frame is cut, corrupt, of an earlier version, or
    for another chunk.
    """
    view = memoryview(frame).cast("B")
    header = _parse_header(view, key, layout)
    codec, block_bytes, nblocks = CODECS[header.codec], header.block_bytes, header.nblocks
    table_end = _HEADER.size + _ENTRY.size * nblocks
    if len(view) < table_end + _DIGEST_BYTES:
        raise TruncatedFrame(f"frame of {len(view)} bytes is cut inside its block table")
    info = _parse_table(
        bytes(view[: _HEADER.size]),
        bytes(view[_HEADER.size : table_end]),
        bytes(view[-_DIGEST_BYTES:]),
        codec,
        block_bytes,
        layout.nbytes,
    )
    if len(view) != info.size:
        raise TruncatedFrame(f"frame of {len(view)} bytes, header says {info.size}")
    targets = _targets(out, info, layout.nbytes)
    offsets = info.offsets()

    def blocks(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            block = view[offsets[i] : offsets[i] + info.sizes[i]]
            _check_block(block, info.digests[i])
            _decode_block(codec, block, layout.itemsize, targets[i])

    _run(blocks, nblocks, parallel)
    return header.position


def read_into(
    fd: int, file_size: int, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True
) -> int:
    """decode_into for a frame in an open file: each block is read by the thread that
    verifies and decodes it, in the compiled kernels where they are built (raw blocks
    straight into `out`, a cache-sized piece at a time; zstd blocks through per-thread
    buffers), else in Python (raw blocks straight into `out`); the chunk's position.
    Raises FrameError as decode_into does, OSError on a read error."""
    head = _pread_exact(fd, _HEADER.size, 0)
    header = _parse_header(memoryview(head), key, layout)
    codec, block_bytes, nblocks = CODECS[header.codec], header.block_bytes, header.nblocks
    table_end = _HEADER.size + _ENTRY.size * nblocks
    if table_end + _DIGEST_BYTES > file_size:
        raise TruncatedFrame(f"frame of {file_size} bytes is cut inside its block table")
    table = _pread_exact(fd, table_end - _HEADER.size, _HEADER.size)
    digest = _pread_exact(fd, _DIGEST_BYTES, file_size - _DIGEST_BYTES)
    info = _parse_table(head, table, digest, codec, block_bytes, layout.nbytes)
    if file_size != info.size:
        raise TruncatedFrame(f"frame of {file_size} bytes, header says {info.size}")
    reader = _native_block_reader if native.HAVE_NATIVE_READ else _block_reader
    _run(reader(fd, info, layout, _flat_out(out, layout.nbytes)), nblocks, parallel)
    return header.position


def _native_block_reader(fd: int, info: _Frame, layout: ChunkLayout, flat: torch.Tensor):
    """read_into's fn(lo, hi) over blocks: the kernels read, verify and decode them."""
    zstd = info.codec == CODECS["zstd"]
    frame = native.FrameBlocks(
        fd, info.block_bytes, layout.nbytes, info.offsets(), info.sizes, info.digests, layout.itemsize if zstd else 0
    )
    out = flat.numpy()

    def blocks(lo: int, hi: int) -> None:
        stored = plain = None
        if zstd:
            stored = _scratch("stored", max(info.sizes[lo:hi], default=0)).numpy()
            plain = _scratch("plain", info.block_bytes).numpy()
        try:
            frame.read(lo, hi, out, stored, plain)
        except native.BlockError as e:
            raise _BLOCK_ERRORS[e.reason](f"frame block {e.block}: {e.reason}") from None

    return blocks


def _block_reader(fd: int, info: _Frame, layout: ChunkLayout, flat: torch.Tensor):
    """read_into's fn(lo, hi) over blocks in Python (where the kernels are not built): each
    block read, verified and decoded by the thread that reads it."""
    targets = _targets(flat, info, layout.nbytes)
    offsets, block_bytes = info.offsets(), info.block_bytes

    def raw_blocks(lo: int, hi: int) -> None:  # consecutive in the file and in `flat`
        for first in range(lo, hi, RAW_READ_BLOCKS):  # one read, then its digests, still in cache
            last = min(hi, first + RAW_READ_BLOCKS)
            _preadv_exact(fd, memoryview(flat[first * block_bytes : last * block_bytes].numpy()), offsets[first])
            for i in range(first, last):
                _check_block(targets[i].numpy(), info.digests[i])

    def zstd_blocks(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            size = info.sizes[i]
            view = memoryview(_scratch("stored", size)[:size].numpy())
            _preadv_exact(fd, view, offsets[i])
            _check_block(view, info.digests[i])
            _decompress_into(view, layout.itemsize, targets[i])

    return zstd_blocks if info.codec == CODECS["zstd"] else raw_blocks


def _decode_block(codec: int, block: memoryview, elem: int, out: torch.Tensor) -> None:
    if codec == CODECS["raw"]:
        native.copy_into(out.numpy(), block)  # not torch's copy_, whose threads a worker thread must not start
    else:
        _decompress_into(block, elem, out)


def _run(fn, count: int, parallel: bool) -> None:
    """fn(lo, hi) over [0, count) cut into one contiguous range per core when `parallel`,
    else in one call on this thread (the first error is raised)."""
    workers = min(count, _WORKERS) if parallel else 1
    if workers <= 1:
        fn(0, count)
        return
    bounds = [count * k // workers for k in range(workers + 1)]
    list(_workers().map(fn, bounds[:-1], bounds[1:]))


def _preadv_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise TruncatedFrame(f"file ends {len(view) - got} bytes early")
        got += n


def _pread_exact(fd: int, nbytes: int, offset: int) -> bytes:
    buf = bytearray(nbytes)
    _preadv_exact(fd, memoryview(buf), offset)
    return bytes(buf)
