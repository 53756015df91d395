"""native.py: the ctypes paths give the xxhash and zstandard modules' results exactly, and
the fallbacks (used where the C functions are not found) give them too."""

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl import native


def test_the_native_paths_are_found_here():
    """The pinned stack on Debian binds both; a silent fallback would lose the speed."""
    assert native.HAVE_NATIVE_HASH and native.HAVE_NATIVE_ZSTD


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
