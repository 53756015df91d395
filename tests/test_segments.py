import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl import segments
from lmcache_sgl.keys import segment_key
from lmcache_sgl.segments import SegmentIndex, window_hashes

SEED = b"n" * 16
SEP = [7, 7]
token_lists = st.lists(st.integers(0, 9), min_size=0, max_size=120)


def naive_hash(span):
    h = 0
    for t in span:
        h = (h * segments._BASE + int(t) + 1) % 2**64
    return h


@given(token_lists, st.integers(1, 20))
def test_window_hashes_are_the_polynomial_hash_of_each_window(tokens, width):
    got = window_hashes(np.array(tokens, dtype=np.int64), width)
    assert [int(h) for h in got] == [naive_hash(tokens[i : i + width]) for i in range(len(tokens) - width + 1)]


def split_on_separator(tokens):
    """Reference: the segments between separators (left to right, not overlapping)."""
    parts, start, i = [], 0, 0
    while i + len(SEP) <= len(tokens):
        if tokens[i : i + len(SEP)] == SEP:
            parts.append((start, i))
            start = i = i + len(SEP)
        else:
            i += 1
    return parts  # the stretch after the last separator (the query) is not a segment


@given(token_lists, st.integers(1, 8), st.integers(1, 6))
def test_separator_pieces_cut_every_segment_but_the_last(tokens, chunk, min_tokens):
    index = SegmentIndex(chunk, min_tokens, SEP)
    pieces = index.storable(SEED, np.array(tokens, dtype=np.int64))
    expected = []
    for start, end in split_on_separator(tokens):
        if end - start >= min_tokens:
            expected += [(s, min(s + chunk, end)) for s in range(start, end, chunk)]
    assert [(p.start, p.end) for p in pieces] == expected
    assert all(p.key == segment_key(SEED, tokens[p.start : p.end]) for p in pieces)


@given(st.lists(st.lists(st.integers(0, 6), min_size=3, max_size=20), min_size=2, max_size=5), st.randoms())
def test_a_segment_has_the_same_pieces_wherever_it_appears(docs, rnd):
    index = SegmentIndex(4, 3, SEP)

    def prompt(order):
        tokens = []
        for d in order:
            tokens += docs[d] + SEP
        return np.array(tokens + [1, 2], dtype=np.int64)

    first = list(range(len(docs)))
    shuffled = first[:]
    rnd.shuffle(shuffled)
    keys_a = {p.key for p in index.storable(SEED, prompt(first))}
    keys_b = {p.key for p in index.candidates(SEED, prompt(shuffled), 0, 10**6)}
    assert keys_a == keys_b


@given(
    st.lists(st.integers(0, 50), min_size=16, max_size=64),
    st.lists(st.integers(0, 50), max_size=20),
    st.lists(st.integers(0, 50), max_size=20),
)
def test_rolling_hash_finds_a_remembered_span_at_any_offset(stored, before, after):
    index = SegmentIndex(8, 1, None)
    stored = np.array(stored, dtype=np.int64)
    kept = index.storable(SEED, stored)
    index.remember(stored, kept)
    span = stored[8:16]
    prompt = np.concatenate([np.array(before, dtype=np.int64), span, np.array(after, dtype=np.int64)])
    found = index.candidates(SEED, prompt, 0, len(prompt))
    assert all(np.array_equal(prompt[p.start : p.end], stored[q.start : q.end]) for p in found for q in kept if p.key == q.key)
    assert all(any(p.key == q.key for q in kept) for p in found)
    assert all(b.start >= a.end for a, b in zip(found, found[1:]))
    assert any(p.key == segment_key(SEED, span) for p in found) or any(
        p.start < len(before) + 8 and p.end > len(before) for p in found
    )  # found, unless an earlier (overlapping) remembered span was taken first


@settings(max_examples=50)
@given(st.lists(st.integers(0, 3), min_size=8, max_size=40), st.lists(st.integers(0, 3), min_size=8, max_size=40))
def test_a_hash_collision_is_never_a_match(stored, prompt):
    """With every window hashing alike, only spans with equal token ids are found."""
    original = segments.window_hashes
    segments.window_hashes = lambda tokens, width: np.zeros(max(len(tokens) - width + 1, 0), dtype=np.uint64)
    try:
        index = SegmentIndex(8, 1, None)
        stored_a = np.array(stored, dtype=np.int64)
        index.remember(stored_a, index.storable(SEED, stored_a))
        prompt_a = np.array(prompt, dtype=np.int64)
        spans = {tuple(stored[s : s + 8]) for s in range(0, len(stored) - 7, 8)}
        for p in index.candidates(SEED, prompt_a, 0, len(prompt)):
            assert tuple(prompt[p.start : p.end]) in spans
    finally:
        segments.window_hashes = original


def test_remembered_spans_are_bounded():
    index = SegmentIndex(4, 1, None, max_spans=3)
    tokens = np.arange(40, dtype=np.int64)
    index.remember(tokens, index.storable(SEED, tokens))
    assert [p.start for p in index.candidates(SEED, tokens, 0, 40)] == [28, 32, 36]  # the 3 most recent


def test_an_empty_separator_is_refused():
    with pytest.raises(ValueError, match="separator"):
        SegmentIndex(4, 1, [])
