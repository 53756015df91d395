"""Segments: stretches of a prompt whose KV may be stored once and reused at any position.

A segment piece (a keys.Chunk) is keyed by its token ids and the namespace only (keys.segment_key), never
by its position; the tiers record the position its KV was computed at. Two ways to find
pieces:

- With a separator (token ids, e.g. the tokenized " # # "), a prompt's segments are the
  stretches between separators, except the last one (the query after the last separator).
  A segment of at least `min_tokens` tokens is cut into pieces of at most `chunk_size`
  tokens from its start, so the same segment gives the same pieces wherever it appears.
- Without one, pieces are spans of exactly `chunk_size` tokens. The chunk-aligned spans
  of a stored prompt are remembered (`remember`); a rolling hash over a new prompt finds
  each remembered span at any offset, and a candidate counts only once its token ids
  equal the remembered ones.

Not thread-safe: used from the scheduler's thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .keys import Chunk, segment_key

_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_BASE_INVERSE = pow(_BASE, -1, 2**64)
MAX_SPANS = 1 << 16  # remembered spans (rolling-hash mode); the least recently found go first


def window_hashes(tokens: np.ndarray, width: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window tokens[i : i + width], for each i, in
    O(len(tokens)): hash = sum_m t[m] * B**(width - 1 - m) with t = token id + 1."""
    n = len(tokens) - width + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    t = np.asarray(tokens, dtype=np.int64).astype(np.uint64) + np.uint64(1)
    powers = np.full(len(t), _BASE, dtype=np.uint64)
    powers[0] = 1
    inverse = np.full(len(t), _BASE_INVERSE, dtype=np.uint64)
    inverse[0] = 1
    with np.errstate(over="ignore"):
        powers, inverse = np.cumprod(powers), np.cumprod(inverse)  # B**m, B**-m (wrapping)
        sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(t * inverse)])
        return (sums[width:] - sums[:n]) * powers[width - 1 : width - 1 + n]


class SegmentIndex:
    def __init__(
        self, chunk_size: int, min_tokens: int, separator: Sequence[int] | None, max_spans: int = MAX_SPANS
    ) -> None:
        """separator: token ids of the segment separator; None for rolling-hash mode."""
        if separator is not None and len(separator) == 0:
            raise ValueError("the segment separator must have at least one token")
        self.chunk_size, self.min_tokens, self.max_spans = chunk_size, min_tokens, max_spans
        self.separator = None if separator is None else np.asarray(separator, dtype=np.int64)
        self._spans: OrderedDict[int, list[np.ndarray]] = OrderedDict()  # window hash -> remembered spans

    def candidates(self, seed: bytes, tokens: np.ndarray, begin: int, end: int) -> list[Chunk]:
        """Pieces inside tokens[begin:end] that may be stored, in order, not overlapping."""
        if self.separator is not None:
            return [p for p in self._segment_pieces(seed, tokens) if begin <= p.start and p.end <= end]
        return self._found_spans(seed, tokens, begin, end)

    def storable(self, seed: bytes, tokens: np.ndarray) -> list[Chunk]:
        """Pieces of a computed prompt whose KV may be stored as segments."""
        if self.separator is not None:
            return self._segment_pieces(seed, tokens)
        width = self.chunk_size
        return [
            Chunk(segment_key(seed, tokens[s : s + width]), s, s + width)
            for s in range(0, len(tokens) - width + 1, width)
        ]

    def remember(self, tokens: np.ndarray, pieces: Sequence[Chunk]) -> None:
        """Rolling-hash mode: make stored pieces (spans of chunk_size tokens) findable."""
        if self.separator is not None:
            return
        for p in pieces:
            span = np.array(tokens[p.start : p.end], dtype=np.int64)
            if len(span) != self.chunk_size:
                continue
            h = int(window_hashes(span, self.chunk_size)[0])
            spans = self._spans.setdefault(h, [])
            if not any(np.array_equal(s, span) for s in spans):
                spans.append(span)
            self._spans.move_to_end(h)
        while len(self._spans) > self.max_spans:
            self._spans.popitem(last=False)

    def _segment_pieces(self, seed: bytes, tokens: np.ndarray) -> list[Chunk]:
        assert self.separator is not None
        tokens = np.asarray(tokens, dtype=np.int64)
        pieces, start, width = [], 0, len(self.separator)
        for sep in self._separator_starts(tokens):
            if sep - start >= self.min_tokens:
                for s in range(start, sep, self.chunk_size):
                    e = min(s + self.chunk_size, sep)
                    pieces.append(Chunk(segment_key(seed, tokens[s:e]), s, e))
            start = sep + width
        return pieces

    def _separator_starts(self, tokens: np.ndarray) -> list[int]:
        """Starts of the non-overlapping occurrences of the separator, left to right."""
        assert self.separator is not None
        width = len(self.separator)
        if len(tokens) < width:
            return []
        where = np.flatnonzero(tokens[: len(tokens) - width + 1] == self.separator[0])
        starts, after = [], 0
        for i in where.tolist():
            if i >= after and np.array_equal(tokens[i : i + width], self.separator):
                starts.append(i)
                after = i + width
        return starts

    def _found_spans(self, seed: bytes, tokens: np.ndarray, begin: int, end: int) -> list[Chunk]:
        width = self.chunk_size
        if not self._spans or end - begin < width:
            return []
        window = np.asarray(tokens[begin:end], dtype=np.int64)
        hashes = window_hashes(window, width)
        known = np.fromiter(self._spans.keys(), dtype=np.uint64, count=len(self._spans))
        pieces: list[Chunk] = []
        after = 0
        for i in np.flatnonzero(np.isin(hashes, known)).tolist():
            if i < after:
                continue
            h = int(hashes[i])
            span = window[i : i + width]
            if any(np.array_equal(s, span) for s in self._spans[h]):
                self._spans.move_to_end(h)
                pieces.append(Chunk(segment_key(seed, span), begin + i, begin + i + width))
                after = i + width
        return pieces
