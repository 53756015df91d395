"""native.py: the ctypes paths give the xxhash and zstandard modules' results exactly, and
the fallbacks (used where the C functions are not found) give them too; the kernels' frame
block reader gives a chunk's bytes from any range of its blocks and names every bad block."""

import os

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl import native


def test_the_native_paths_are_found_here():
    """The pinned stack on Debian binds them all; a silent fallback would lose the speed."""
    assert native.HAVE_NATIVE_HASH and native.HAVE_NATIVE_ZSTD and native.HAVE_NATIVE_READ


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), lo=st.integers(0, 50), hi=st.integers(0, 50))
def test_xxh3_64_equals_xxhash_on_any_slice(data, lo, hi):
    view = memoryview(data)[lo : max(lo, len(data) - hi)]
    expected = xxhash.xxh3_64_intdigest(view)
    assert native.xxh3_64(view) == expected
    assert native.xxh3_64(np.frombuffer(bytes(view), dtype=np.uint8)) == expected


def test_xxh3_64_fallback_is_the_same(monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    fast = native.xxh3_64(data)
    monkeypatch.setattr(native, "_XXH3", None)
    assert native.xxh3_64(data) == fast == xxhash.xxh3_64_intdigest(data)


@pytest.fixture(params=["native", "stream"])
def decoder(request, monkeypatch):
    if request.param == "stream":
        monkeypatch.setattr(native, "HAVE_NATIVE_ZSTD", False)
    return native.zstd_decompress_into


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000), level=st.integers(1, 5))
def test_zstd_decompress_into_round_trips(data, level):
    frame = zstandard.ZstdCompressor(level=level).compress(data)
    for native_zstd in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "HAVE_NATIVE_ZSTD", native_zstd and native.HAVE_NATIVE_ZSTD)
            out = np.empty(len(data), dtype=np.uint8)
            native.zstd_decompress_into(frame, out)
            assert out.tobytes() == data


@pytest.mark.parametrize("size_delta", [-1, 1, 1000])
def test_zstd_output_of_another_size_is_an_error(decoder, size_delta):
    data = bytes(range(256)) * 40
    frame = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(native.ZstdError):
        decoder(frame, np.empty(len(data) + size_delta, dtype=np.uint8))


@pytest.mark.parametrize("damage", ["cut", "garbage", "flipped", "twice"])
def test_corrupt_zstd_is_an_error(decoder, damage):
    data = bytes(range(256)) * 40
    frame = bytearray(zstandard.ZstdCompressor().compress(data))
    if damage == "cut":
        frame = frame[:-7]
    elif damage == "garbage":
        frame = bytearray(b"not a zstd frame" * 8)
    elif damage == "flipped":
        frame[len(frame) // 2] ^= 0xFF
    else:
        frame = frame + frame  # decodes to twice the bytes
    out = np.empty(len(data), dtype=np.uint8)
    try:
        decoder(bytes(frame), out)
    except native.ZstdError:
        return
    # a flipped byte inside a literal run can still decode to len(data) bytes: the
    # codec's block digest is what catches that; anything else must raise
    assert damage == "flipped" and out.tobytes() != data


def test_read_only_output_is_refused():
    frame = zstandard.ZstdCompressor().compress(b"abc")
    with pytest.raises(ValueError):
        native.zstd_decompress_into(frame, b"xyz")


def test_copy_into_copies_and_refuses_other_sizes_and_read_only_buffers():
    src = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    native.copy_into(dst, memoryview(src))
    assert np.array_equal(dst, src)
    with pytest.raises(ValueError):
        native.copy_into(dst[:-1], src)
    with pytest.raises(ValueError, match="read-only"):
        native.copy_into(bytes(len(src)), src)


def shuffled(data: bytes, elem: int) -> bytes:
    """data's byte planes (codec's shuffle): byte j of every element, for j in order."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, elem).T.tobytes()


def write_blocks(path, blocks: list[bytes], gap: int) -> tuple[int, list[int]]:
    """`blocks` stored one after another behind `gap` bytes in a new file at `path`: its
    open read-only descriptor and each block's offset."""
    offsets, at = [], gap
    for block in blocks:
        offsets.append(at)
        at += len(block)
    path.write_bytes(bytes(gap) + b"".join(blocks))
    return os.open(path, os.O_RDONLY), offsets


def block_reader(tmp_path, data: bytes, block: int, elem: int, name: str = "f"):
    """`data` cut into blocks of `block` bytes, stored raw (elem 0) or as zstd frames of
    their byte planes, as a FrameBlocks; and its file descriptor."""
    pieces = [data[i : i + block] for i in range(0, len(data), block)]
    stored = [zstandard.ZstdCompressor().compress(shuffled(p, elem)) if elem else p for p in pieces]
    fd, offsets = write_blocks(tmp_path / name, stored, gap=7)
    digests = [xxhash.xxh3_64_intdigest(s) for s in stored]
    return native.FrameBlocks(fd, block, len(data), offsets, [len(s) for s in stored], digests, elem), fd


def read_range(frames: native.FrameBlocks, lo: int, hi: int, out: np.ndarray, block: int) -> None:
    frames.read(lo, hi, out, np.empty(2 * block + 64, dtype=np.uint8), np.empty(block, dtype=np.uint8))


@settings(max_examples=60, deadline=None)
@given(
    elem=st.sampled_from([0, 1, 2, 4]),
    blocks=st.integers(0, 5),
    tail=st.integers(0, 3),
    piece_kib=st.sampled_from([4, 300]),
    split=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    shift=st.sampled_from([0, 1]),
)
def test_frame_blocks_read_every_range_of_blocks_into_place(
    tmp_path_factory, elem, blocks, tail, piece_kib, split, seed, shift
):
    """Blocks (some larger than the reader's 256 KiB raw read, a shorter last one) read as two
    ranges, as two threads would: the chunk's bytes exactly, raw or unshuffled from zstd,
    into an aligned output (non-temporal stores) or one shifted by a byte."""
    block = piece_kib << 10
    size = block * blocks + tail * 4
    data = np.random.default_rng(seed).integers(0, 4, size, dtype=np.uint8).tobytes()  # compressible
    frames, fd = block_reader(tmp_path_factory.mktemp("blocks"), data, block, elem)
    try:
        count = -(-size // block)
        out = np.zeros(size + 64, dtype=np.uint8)[64 - shift : 64 - shift + size]
        assert size == 0 or (out.ctypes.data % 16 == 0) == (shift == 0)
        cut = min(split, count)
        read_range(frames, 0, cut, out, block)
        read_range(frames, cut, count, out, block)
        assert out.tobytes() == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("elem", [0, 2])
def test_frame_blocks_name_the_first_bad_block_and_why(tmp_path, elem):
    """A flipped stored byte is a digest error, a file cut inside a block is short, a zstd
    block whose digest holds but which decodes to another size is a decode error, a raw
    block whose size is not its length is invalid, a read error is an OSError: each
    naming the block, and the blocks before it read."""
    block = 4096
    data = np.random.default_rng(0).integers(0, 4, 3 * block, dtype=np.uint8).tobytes()
    frames, fd = block_reader(tmp_path, data, block, elem)
    stored_sizes = list(frames._arrays[1])
    os.close(fd)
    raw = (tmp_path / "f").read_bytes()
    offsets = list(frames._arrays[0])
    digests = list(frames._arrays[2])

    def reader(blob: bytes, sizes=stored_sizes, digests=digests, name="g") -> tuple[native.FrameBlocks, int]:
        (tmp_path / name).write_bytes(blob)
        fd = os.open(tmp_path / name, os.O_RDONLY)
        return native.FrameBlocks(fd, block, len(data), offsets, sizes, digests, elem), fd

    flipped = bytearray(raw)
    flipped[offsets[1] + 3] ^= 0x40
    cases = [("digest", 1, reader(bytes(flipped))), ("short", 2, reader(raw[: offsets[2] + 5], name="h"))]
    if elem:
        garbage = zstandard.ZstdCompressor().compress(b"x" * 10)
        cut = raw[: offsets[1]] + garbage
        cases.append(("decode", 1, reader(cut, [*stored_sizes[:1], len(garbage)], [digests[0], xxhash.xxh3_64_intdigest(garbage)], "i")))
    else:
        cases.append(("invalid", 0, reader(raw, [block - 1, *stored_sizes[1:]], name="i")))
    for reason, bad, (frames, fd) in cases:
        out = np.zeros(len(data), dtype=np.uint8)
        with pytest.raises(native.BlockError) as caught:
            read_range(frames, 0, 3, out, block)
        assert (caught.value.reason, caught.value.block) == (reason, bad)
        assert out[: bad * block].tobytes() == data[: bad * block]
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        frames = native.FrameBlocks(fd, block, len(data), offsets, stored_sizes, digests, elem)
        with pytest.raises(OSError):
            read_range(frames, 0, 3, np.zeros(len(data), dtype=np.uint8), block)
    finally:
        os.close(fd)


def test_frame_blocks_refuse_ranges_outside_the_frame_and_read_only_output(tmp_path):
    data = bytes(range(256)) * 64
    frames, fd = block_reader(tmp_path, data, 4096, 0)
    try:
        for lo, hi in [(-1, 2), (2, 1), (0, 5)]:
            with pytest.raises(native.BlockError, match="invalid"):
                read_range(frames, lo, hi, np.zeros(len(data), dtype=np.uint8), 4096)
        with pytest.raises(ValueError, match="read-only"):
            frames.read(0, 1, np.frombuffer(bytes(len(data)), dtype=np.uint8), np.empty(4096, dtype=np.uint8), None)
        out = np.zeros(len(data), dtype=np.uint8)
        frames.read(0, 4, out, None, None)  # raw blocks need no buffers of their own
        assert out.tobytes() == data
    finally:
        os.close(fd)
    frames, fd = block_reader(tmp_path, data, 4096, 2, name="z")
    try:
        largest = max(frames._arrays[1])
        for stored, plain in [(largest - 1, 4096), (largest, 4095), (None, 4096), (largest, None)]:
            with pytest.raises(ValueError, match="smaller"):
                frames.read(
                    0, 4, np.zeros(len(data), dtype=np.uint8),
                    None if stored is None else np.empty(stored, dtype=np.uint8),
                    None if plain is None else np.empty(plain, dtype=np.uint8),
                )
    finally:
        os.close(fd)
