"""Deterministic chunk keys.

A chunk key names the KV of one chunk of tokens *at its position*: the key of chunk i
is H(key of chunk i-1 || token ids of chunk i), seeded by a namespace digest that
separates everything which changes the KV of the same tokens (model, dtype, layout,
tensor-parallel rank, SGLang's extra_key and cache_salt). H is BLAKE2b-128 over
fixed-width little-endian integers, so keys are stable across processes, machines and
PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KEY_BYTES = 16


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of a prompt, whose KV is stored under `key` if at all."""

    key: bytes
    start: int  # first token
    end: int  # one past the last token


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def model_fingerprint(config: Mapping[str, Any], tensors: bytes) -> bytes:
    """Digest of a model's identity: its config and a digest of its tensors (names,
    dtypes, shapes and bytes; see sglang.plugin.tensors_digest)."""
    return _digest(b"model", _canonical(dict(config)), tensors)


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that decides the KV of a chunk."""

    model: bytes  # model_fingerprint(...)
    kv_dtype: str  # the logical KV dtype, e.g. "bfloat16" or "float8_e4m3fn/fp8_e4m3" (stored as uint8)
    kv_layout: str  # e.g. "mha:L32:H8:D128" or "mla:L27:D576"
    tp_rank: int = 0
    tp_size: int = 1
    extra_key: str | None = None
    cache_salt: str | None = None

    def digest(self) -> bytes:
        fields = [self.kv_dtype, self.kv_layout, self.tp_rank, self.tp_size, self.extra_key, self.cache_salt]
        return _digest(b"namespace", self.model, _canonical(fields))


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    return arr.astype("<i8", copy=False).tobytes()


def chunk_keys(
    seed: bytes, tokens: Sequence[int] | np.ndarray, chunk_size: int, *, partial: bool = False
) -> list[bytes]:
    """Prefix-chained keys of the consecutive chunks of `tokens`, starting at token 0.

    One key per whole chunk; with `partial=True` also one for the trailing partial chunk
    (keyed by its exact tokens, so it never collides with a whole chunk).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    data = _token_bytes(tokens)
    width = 8 * chunk_size
    keys: list[bytes] = []
    prev = seed
    end = len(data) if partial else len(data) - len(data) % width
    for start in range(0, end, width):
        prev = _digest(prev, data[start : start + width])
        keys.append(prev)
    return keys


def chunk_spans(num_tokens: int, chunk_size: int, *, partial: bool = False) -> Iterable[tuple[int, int]]:
    """(start, end) token ranges matching chunk_keys(..., partial=partial)."""
    end = num_tokens if partial else num_tokens - num_tokens % chunk_size
    for start in range(0, end, chunk_size):
        yield start, min(start + chunk_size, end)


def segment_key(seed: bytes, tokens: Sequence[int] | np.ndarray) -> bytes:
    """Content-only key of a segment piece: the namespace and the token ids, never the
    position (a domain tag keeps it apart from every prefix-chained key)."""
    return _digest(b"segment", seed, _token_bytes(tokens))
