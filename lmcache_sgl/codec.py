"""Self-describing, verified chunk frames.

frame = header | block table | payload | xxh3-128 digest of everything before it.

The header names the chunk key, the layout (kind, dtype, shape), the codec and the
sizes. Codecs: raw (payload is the chunk's bytes) and zstd (the chunk is cut into
blocks; each block is byte-plane shuffled, then zstd-compressed on its own, so blocks
decode in parallel on every core; encoding runs in the caller's thread, a background
writer). Decoding checks everything and raises a FrameError
subclass on any mismatch: callers treat that as a miss, never as data.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
import xxhash
import zstandard

from . import ops
from .keys import KEY_BYTES

MAGIC = b"LMSG"
VERSION = 1
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
MAX_DIMS = 6
BLOCK_BYTES = 1 << 20
# magic, version, codec, kind, dtype, ndim, key, shape[6], raw length, block size, blocks
_HEADER = struct.Struct(f"<4sHBBBB{KEY_BYTES}s{MAX_DIMS}IQII")
_DIGEST_BYTES = 16

# torch.frombuffer warns on read-only buffers; frames are only ever read through them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class FrameError(ValueError):
    """A frame that must not be used: the caller counts it as a miss."""


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


_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lmcsgl-codec")
    return _pool


def _as_bytes_tensor(buf) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=torch.uint8) if len(memoryview(buf)) else torch.empty(0, dtype=torch.uint8)


def _compress_block(block: torch.Tensor, elem: int, level: int) -> bytes:
    shuffled = torch.empty_like(block)
    ops.shuffle_bytes(block, shuffled, elem)
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level)
        _local.level = level
    return cctx.compress(memoryview(shuffled.numpy()))


def _decompress_block(block: memoryview, elem: int, out: torch.Tensor) -> None:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        plain = dctx.decompress(block, max_output_size=out.numel())
    except zstandard.ZstdError as e:
        raise MalformedFrame(f"zstd block does not decode: {e}") from e
    if len(plain) != out.numel():
        raise MalformedFrame(f"zstd block decodes to {len(plain)} bytes, expected {out.numel()}")
    ops.unshuffle_bytes(_as_bytes_tensor(plain), out, elem)


def encode(key: bytes, layout: ChunkLayout, data: torch.Tensor, codec: str = "raw", level: int = 1) -> list:
    """Frame of `data` (a contiguous CPU tensor of layout.nbytes bytes) as a list of buffers.

    The buffers, concatenated, are the frame; they alias `data` for the raw codec, so
    write them out before `data` changes.
    """
    raw = data.reshape(-1).view(torch.uint8)
    if len(key) != KEY_BYTES or raw.numel() != layout.nbytes or codec not in CODECS:
        raise ValueError(f"cannot encode {raw.numel()} bytes as {layout} with key of {len(key)} bytes, codec {codec}")
    if codec == "raw":
        blocks = [memoryview(raw.numpy())] if raw.numel() else []
        block_bytes = raw.numel()
    else:
        elem = layout.itemsize
        block_bytes = BLOCK_BYTES - BLOCK_BYTES % elem
        pieces = raw.split(block_bytes)
        blocks = [_compress_block(b, elem, level) for b in pieces]  # in the caller's (background) thread
    shape = tuple(layout.shape) + (0,) * (MAX_DIMS - len(layout.shape))
    header = _HEADER.pack(
        MAGIC, VERSION, CODECS[codec], KINDS[layout.kind], _DTYPE_CODES[layout.dtype], len(layout.shape),
        key, *shape, raw.numel(), block_bytes, len(blocks),
    )
    table = struct.pack(f"<{len(blocks)}Q", *(len(b) for b in blocks))
    digest = xxhash.xxh3_128()
    for part in (header, table, *blocks):
        digest.update(part)
    return [header, table, *blocks, digest.digest()]


def frame_bytes(parts: Sequence) -> bytes:
    return b"".join(parts)


@dataclass(frozen=True)
class _Frame:
    """A frame's header and block table, checked against the expected key and layout."""

    codec: int
    block_bytes: int
    sizes: tuple[int, ...]  # compressed size of each block
    table_end: int  # offset of the first block

    @property
    def size(self) -> int:
        return self.table_end + sum(self.sizes) + _DIGEST_BYTES


def _parse_header(view: memoryview, key: bytes, layout: ChunkLayout) -> tuple[int, int, int]:
    """(codec, block bytes, number of blocks) of the header at the start of `view`."""
    if len(view) < _HEADER.size:
        raise TruncatedFrame(f"frame of {len(view)} bytes is shorter than a header")
    magic, version, codec, kind, dtype, ndim, fkey, *rest = _HEADER.unpack_from(view)
    shape, (raw_len, block_bytes, nblocks) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if magic != MAGIC or version != VERSION or codec not in CODECS.values():
        raise MalformedFrame(f"not a version-{VERSION} frame (magic {magic!r}, version {version}, codec {codec})")
    if fkey != key:
        raise KeyMismatch(f"frame holds key {fkey.hex()}, expected {key.hex()}")
    dtype_name = _DTYPE_NAMES[dtype] if dtype < len(_DTYPE_NAMES) else None
    found = (_KIND_NAMES.get(kind), dtype_name, tuple(shape[:ndim]))
    if found != (layout.kind, layout.dtype, tuple(layout.shape)) or raw_len != layout.nbytes:
        raise LayoutMismatch(f"frame holds {found}, expected {layout}")
    if raw_len and (block_bytes == 0 or nblocks != -(-raw_len // block_bytes)):
        raise MalformedFrame(f"{nblocks} blocks of {block_bytes} bytes cannot hold {raw_len} bytes")
    return codec, block_bytes, nblocks


def _parse_table(view: memoryview, codec: int, block_bytes: int, nblocks: int, raw_len: int) -> _Frame:
    table_end = _HEADER.size + 8 * nblocks
    if len(view) < table_end:
        raise TruncatedFrame(f"frame of {len(view)} bytes is cut inside its block table")
    sizes = struct.unpack_from(f"<{nblocks}Q", view, _HEADER.size)
    if codec == CODECS["raw"] and any(size != min(block_bytes, raw_len - i * block_bytes) for i, size in enumerate(sizes)):
        raise MalformedFrame("raw block size does not match the layout")
    return _Frame(codec, block_bytes, sizes, table_end)


def _targets(out: torch.Tensor, frame: _Frame, nbytes: int) -> tuple:
    dst = out.reshape(-1).view(torch.uint8)
    if dst.numel() != nbytes:
        raise ValueError(f"output holds {dst.numel()} bytes, the chunk has {nbytes}")
    return dst.split(frame.block_bytes) if nbytes else ()


def _decode_blocks(blocks: Sequence, targets: Sequence[torch.Tensor], elem: int, parallel: bool) -> None:
    runner = _workers().map if parallel else map
    list(runner(lambda bt: _decompress_block(bt[0], elem, bt[1]), zip(blocks, targets)))


def decode_into(frame, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> None:
    """Verify `frame` against `key` and `layout`, then write its chunk into `out`, its zstd
    blocks decoded on every core when `parallel`, else on this thread (for callers that
    decode several frames at once, one per core).

    `out` is a contiguous CPU tensor of layout.nbytes bytes. Raises a FrameError subclass
    (and leaves `out` unspecified) if the frame is cut, corrupt, or for another chunk.
    """
    view = memoryview(frame).cast("B")
    codec, block_bytes, nblocks = _parse_header(view, key, layout)
    info = _parse_table(view, codec, block_bytes, nblocks, layout.nbytes)
    if len(view) != info.size:
        raise TruncatedFrame(f"frame of {len(view)} bytes, header says {info.size}")
    if xxhash.xxh3_128_digest(view[:-_DIGEST_BYTES]) != bytes(view[-_DIGEST_BYTES:]):
        raise ChecksumMismatch("frame checksum mismatch")
    targets = _targets(out, info, layout.nbytes)
    offsets = [info.table_end]
    for size in info.sizes:
        offsets.append(offsets[-1] + size)
    blocks = [view[offsets[i] : offsets[i + 1]] for i in range(nblocks)]
    if codec == CODECS["raw"]:
        for block, target in zip(blocks, targets):
            target.copy_(_as_bytes_tensor(block))
    else:
        _decode_blocks(blocks, targets, layout.itemsize, parallel)


def read_into(fd: int, file_size: int, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> None:
    """decode_into for a frame in an open file: a raw payload is read straight into `out`
    (one copy) and hashed there; a zstd payload is read into a per-thread buffer reused
    across reads. Raises FrameError as decode_into does, OSError on a read error."""
    head = _pread_exact(fd, _HEADER.size, 0)
    codec, block_bytes, nblocks = _parse_header(head, key, layout)
    if _HEADER.size + 8 * nblocks + _DIGEST_BYTES > file_size:
        raise TruncatedFrame(f"frame of {file_size} bytes is cut inside its block table")
    table = _pread_exact(fd, 8 * nblocks, _HEADER.size)
    info = _parse_table(memoryview(head.tobytes() + table.tobytes()), codec, block_bytes, nblocks, layout.nbytes)
    if file_size != info.size:
        raise TruncatedFrame(f"frame of {file_size} bytes, header says {info.size}")
    targets = _targets(out, info, layout.nbytes)
    digest = xxhash.xxh3_128(head)
    digest.update(table)
    payload_bytes = sum(info.sizes)
    if codec == CODECS["raw"]:
        payload = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if payload_bytes else memoryview(b"")
        _preadv_exact(fd, payload, info.table_end)
    else:
        buffer = getattr(_local, "read_buffer", None)
        if buffer is None or len(buffer) < payload_bytes:
            buffer = _local.read_buffer = bytearray(payload_bytes)
        payload = memoryview(buffer)[:payload_bytes]
        _preadv_exact(fd, payload, info.table_end)
    digest.update(payload)
    if digest.digest() != _pread_exact(fd, _DIGEST_BYTES, info.table_end + payload_bytes).tobytes():
        raise ChecksumMismatch("frame checksum mismatch")
    if codec != CODECS["raw"]:
        offsets = [0]
        for size in info.sizes:
            offsets.append(offsets[-1] + size)
        blocks = [payload[offsets[i] : offsets[i + 1]] for i in range(nblocks)]
        _decode_blocks(blocks, targets, layout.itemsize, parallel)


def _preadv_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise TruncatedFrame(f"file ends {len(view) - got} bytes early")
        got += n


def _pread_exact(fd: int, nbytes: int, offset: int) -> memoryview:
    view = memoryview(bytearray(nbytes))
    _preadv_exact(fd, view, offset)
    return view
