import os

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zstandard

from lmcache_sgl import codec as codec_module
from lmcache_sgl import native
from lmcache_sgl.codec import (
    BLOCK_BYTES,
    HEADER_BYTES,
    ChecksumMismatch,
    ChunkLayout,
    FrameError,
    KeyMismatch,
    LayoutMismatch,
    MalformedFrame,
    OldVersionFrame,
    TruncatedFrame,
    decode_into,
    encode,
    frame_bytes,
    parse_header,
    read_into,
)

KEY = bytes(range(16))
OTHER_KEY = bytes(16)


@pytest.fixture(params=["native", "python"])
def file_reader(request, monkeypatch):
    """read_into with the kernels' block reader, and with its Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(native, "HAVE_NATIVE_READ", False)
    return request.param


def kv_like(layout: ChunkLayout, seed: int = 0) -> torch.Tensor:
    """Smooth-ish values, so zstd after byte shuffle has something to find."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(layout.shape, generator=g, dtype=torch.float32)
    return values.to(getattr(torch, layout.dtype)).contiguous()


def roundtrip(layout, data, codec, level=1):
    frame = frame_bytes(encode(KEY, layout, data, codec, level))
    out = torch.empty(layout.nbytes, dtype=torch.uint8)
    decode_into(frame, KEY, layout, out)
    return frame, out


def version_2_frame(key: bytes, layout: ChunkLayout, data: torch.Tensor, codec: str = "raw") -> bytes:
    """The frame the version-2 codec wrote (checked byte for byte against it when version 3
    came): version 3's header without its trailing position, the digest over that."""
    header, table, *blocks, _ = encode(key, layout, data, codec)
    old = header[:4] + (2).to_bytes(2, "little") + header[6:-8]
    return b"".join([old, table, *blocks, xxhash.xxh3_128_digest(old + table)])


layouts = st.builds(
    ChunkLayout,
    kind=st.sampled_from(["mha", "mla", "bytes"]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "uint8"]),
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=5).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(layout=layouts, codec=st.sampled_from(["raw", "zstd"]), seed=st.integers(0, 100))
def test_decode_of_encode_is_identity(layout, codec, seed):
    data = kv_like(layout, seed) if layout.dtype != "uint8" else torch.randint(0, 256, layout.shape, dtype=torch.uint8)
    _, out = roundtrip(layout, data, codec)
    assert torch.equal(out, data.reshape(-1).view(torch.uint8))


def test_multi_block_zstd_roundtrip_and_ratio():
    layout = ChunkLayout("mha", "bfloat16", (2, 4, 256, 8, 128))  # 4 MiB: several blocks
    data = kv_like(layout)
    frame, out = roundtrip(layout, data, "zstd")
    assert torch.equal(out, data.reshape(-1).view(torch.uint8))
    assert len(frame) < layout.nbytes  # the exponent plane compresses


@pytest.mark.parametrize("level", [1, 3, 19])
def test_zstd_frames_of_the_earlier_encoder_still_decode(tmp_path, monkeypatch, level):
    """Frames written before the encoder kept its match finder small (zstd's own settings
    for the level) are read like new ones: the small match finder changes what is
    written, never what a frame means."""
    layout = ChunkLayout("mha", "bfloat16", (2, 2, 300, 4, 64))  # 1.2 MiB: two blocks
    data = kv_like(layout)
    new = frame_bytes(encode(KEY, layout, data, "zstd", level))
    monkeypatch.setattr(codec_module, "compressor", lambda lvl: zstandard.ZstdCompressor(level=lvl))
    monkeypatch.setattr(codec_module._local, "cctx", None, raising=False)  # the thread's cached compressor
    old = frame_bytes(encode(KEY, layout, data, "zstd", level))
    assert old != new
    for frame in (old, new):
        out = torch.empty(layout.nbytes, dtype=torch.uint8)
        decode_into(frame, KEY, layout, out)
        assert torch.equal(out, data.reshape(-1).view(torch.uint8))


def test_zstd_frames_of_1_mib_blocks_still_decode(tmp_path, file_reader, monkeypatch):
    """zstd frames written while zstd blocks were 1 MiB (as raw ones still are) are read
    from memory and from a file like frames of today's blocks."""
    layout = ChunkLayout("mha", "bfloat16", (2, 4, 7 * 1024, 2, 16))  # 3.5 MiB
    data = kv_like(layout)
    monkeypatch.setitem(codec_module.BLOCK_BYTES, "zstd", 1 << 20)
    parts = encode(KEY, layout, data, "zstd")
    assert len(parts[2:-1]) == 4 and parse_header(parts[0]).block_bytes == 1 << 20
    frame = frame_bytes(parts)
    path = tmp_path / "f.lmsg"
    path.write_bytes(frame)
    outs = [torch.empty(layout.nbytes, dtype=torch.uint8) for _ in range(2)]
    decode_into(frame, KEY, layout, outs[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        read_into(fd, len(frame), KEY, layout, outs[1])
    finally:
        os.close(fd)
    assert all(torch.equal(out, data.reshape(-1).view(torch.uint8)) for out in outs)


@pytest.mark.parametrize("block_bytes", [(1 << 16) - 2, (1 << 20) + 2, (1 << 18) + 1, 0])
def test_a_header_naming_blocks_outside_the_accepted_sizes_is_malformed(block_bytes):
    """Block sizes below 64 KiB or above 1 MiB, or not a whole number of elements, are
    refused even when the block count agrees with them."""
    layout = ChunkLayout("mha", "bfloat16", (2, 4, 7 * 1024, 2, 16))
    fields = list(codec_module._HEADER.unpack(encode(KEY, layout, kv_like(layout), "zstd")[0]))
    fields[-3] = block_bytes
    fields[-2] = -(-layout.nbytes // block_bytes) if block_bytes else 0
    with pytest.raises(MalformedFrame, match="blocks of"):
        parse_header(codec_module._HEADER.pack(*fields))


LAYOUT = ChunkLayout("mha", "bfloat16", (2, 2, 16, 2, 8))


@pytest.fixture(params=["raw", "zstd"])
def good_frame(request):
    return frame_bytes(encode(KEY, LAYOUT, kv_like(LAYOUT), request.param))


def test_every_flipped_bit_is_detected(good_frame):
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    for pos in range(0, len(good_frame), max(1, len(good_frame) // 97)):
        for bit in (0, 5):
            bad = bytearray(good_frame)
            bad[pos] ^= 1 << bit
            with pytest.raises(FrameError):
                decode_into(bytes(bad), KEY, LAYOUT, out)


def test_every_cut_is_detected(good_frame):
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    for cut in range(len(good_frame)):
        with pytest.raises((TruncatedFrame, ChecksumMismatch)):
            decode_into(good_frame[:cut], KEY, LAYOUT, out)
    with pytest.raises(FrameError):
        decode_into(good_frame + b"\0", KEY, LAYOUT, out)


def test_other_key_or_layout_is_refused(good_frame):
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    with pytest.raises(KeyMismatch):
        decode_into(good_frame, OTHER_KEY, LAYOUT, out)
    for other in (
        ChunkLayout("mla", "bfloat16", LAYOUT.shape),
        ChunkLayout("mha", "float16", LAYOUT.shape),
        ChunkLayout("mha", "bfloat16", (2, 2, 16, 1, 16)),
    ):
        with pytest.raises(LayoutMismatch):
            decode_into(good_frame, KEY, other, torch.empty(other.nbytes, dtype=torch.uint8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(max_size=400), prefix=st.booleans())
def test_decoder_fuzz_never_returns_data(junk, prefix):
    frame = (frame_bytes(encode(KEY, LAYOUT, kv_like(LAYOUT), "zstd"))[:64] + junk) if prefix else junk
    out = torch.zeros(LAYOUT.nbytes, dtype=torch.uint8)
    with pytest.raises(FrameError):
        decode_into(frame, KEY, LAYOUT, out)


def test_encode_refuses_wrong_size():
    with pytest.raises(ValueError):
        encode(KEY, LAYOUT, torch.zeros(3, dtype=torch.uint8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codec=st.sampled_from(["raw", "zstd"]), tokens=st.integers(1, 40), flip=st.integers(0, 10**6), cut=st.integers(0, 10**6))
def test_read_into_a_file_matches_decode_and_refuses_damage(tmp_path_factory, file_reader, codec, tokens, flip, cut):
    """Reading a frame from a file (raw payloads straight into the output) gives the same
    bytes as decoding it from memory; a flipped bit or a cut file is a FrameError."""
    layout = ChunkLayout("mha", "bfloat16", (2, 2, tokens, 2, 8))
    data = torch.randn(layout.shape).to(torch.bfloat16)
    frame = bytearray(frame_bytes(encode(KEY, layout, data, codec)))
    path = tmp_path_factory.mktemp("frames") / "f.lmsg"

    def read(blob: bytes) -> torch.Tensor:
        path.write_bytes(blob)
        out = torch.empty(layout.nbytes, dtype=torch.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            read_into(fd, os.fstat(fd).st_size, KEY, layout, out)
        finally:
            os.close(fd)
        return out

    assert torch.equal(read(bytes(frame)), data.reshape(-1).view(torch.uint8))
    damaged = bytearray(frame)
    damaged[flip % len(frame)] ^= 1 << (flip % 8)
    with pytest.raises(FrameError):
        read(bytes(damaged))
    with pytest.raises(FrameError):
        read(bytes(frame[: cut % len(frame)]))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_frames_of_earlier_versions_are_refused_naming_the_version(tmp_path, codec):
    layout = ChunkLayout("mha", "bfloat16", (2, 1, 4, 1, 8))
    data = torch.randn(layout.shape).to(torch.bfloat16)
    out = torch.empty(layout.nbytes, dtype=torch.uint8)
    old = version_2_frame(KEY, layout, data, codec)
    with pytest.raises(OldVersionFrame, match="version-2 frame"):
        decode_into(old, KEY, layout, out)
    with pytest.raises(OldVersionFrame, match="version-2 frame"):
        parse_header(old[:HEADER_BYTES])
    path = tmp_path / "old.lmsg"
    path.write_bytes(old)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OldVersionFrame, match="version-2 frame"):
            read_into(fd, len(old), KEY, layout, out)
    finally:
        os.close(fd)
    frame = bytearray(frame_bytes(encode(KEY, layout, data, codec)))
    frame[4:6] = (1).to_bytes(2, "little")  # version 1: one digest over the whole frame
    with pytest.raises(OldVersionFrame, match="version-1 frame"):
        decode_into(bytes(frame), KEY, layout, out)
    frame[4:6] = (4).to_bytes(2, "little")  # no such version yet: not a frame this build knows
    with pytest.raises(MalformedFrame, match="not a version-3 frame"):
        decode_into(bytes(frame), KEY, layout, out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 2**64 - 1), codec=st.sampled_from(["raw", "zstd"]))
def test_the_position_round_trips_through_every_decoder(tmp_path_factory, file_reader, position, codec):
    data = kv_like(LAYOUT)
    frame = frame_bytes(encode(KEY, LAYOUT, data, codec, position=position))
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    assert decode_into(frame, KEY, LAYOUT, out) == position and torch.equal(out, data.reshape(-1).view(torch.uint8))
    assert parse_header(frame[:HEADER_BYTES]).position == position
    path = tmp_path_factory.mktemp("frames") / "f.lmsg"
    path.write_bytes(frame)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_into(fd, len(frame), KEY, LAYOUT, out) == position
    finally:
        os.close(fd)


@pytest.mark.parametrize("position", [-1, 2**64])
def test_encode_refuses_a_position_outside_64_bits(position):
    with pytest.raises(ValueError, match="position"):
        encode(KEY, LAYOUT, kv_like(LAYOUT), position=position)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("parallel", [True, False])
def test_multi_block_frames_decode_in_ranges_and_a_bad_block_anywhere_is_caught(tmp_path, file_reader, codec, parallel):
    """3.5 blocks, decoded from memory and from a file, on every core or on one thread
    (the blocks go in one contiguous range per core): the same bytes; a bit flipped in
    any block's payload is a FrameError, whichever range it falls in."""
    layout = ChunkLayout("mha", "bfloat16", (2, 4, 7 * BLOCK_BYTES[codec] // 1024, 2, 16))  # 512 B a token
    data = torch.randn(layout.shape).to(torch.bfloat16)
    parts = encode(KEY, layout, data, codec)
    frame = frame_bytes(parts)
    blocks = parts[2:-1]
    assert len(blocks) == 4
    path = tmp_path / "f.lmsg"

    def both(blob: bytes) -> list[torch.Tensor]:
        path.write_bytes(blob)
        outs = [torch.empty(layout.nbytes, dtype=torch.uint8) for _ in range(2)]
        decode_into(blob, KEY, layout, outs[0], parallel=parallel)
        fd = os.open(path, os.O_RDONLY)
        try:
            read_into(fd, len(blob), KEY, layout, outs[1], parallel=parallel)
        finally:
            os.close(fd)
        return outs

    assert all(torch.equal(o, data.reshape(-1).view(torch.uint8)) for o in both(frame))
    start = len(parts[0]) + len(parts[1])
    for block in blocks:
        damaged = bytearray(frame)
        damaged[start + len(block) // 2] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(FrameError):
            decode_into(bytes(damaged), KEY, layout, torch.empty(layout.nbytes, dtype=torch.uint8), parallel=parallel)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(FrameError):
                read_into(fd, len(damaged), KEY, layout, torch.empty(layout.nbytes, dtype=torch.uint8),
                          parallel=parallel)
        finally:
            os.close(fd)
        start += len(block)
