import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from lmcache_sgl.keys import KEY_BYTES, Namespace, chunk_keys, chunk_spans, model_fingerprint

NS = Namespace(model=model_fingerprint({"layers": 2}, b"w"), kv_dtype="bfloat16", kv_layout="mha:L2:H1:D4")
tokens_st = st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=64)


def _keys_in_subprocess(hashseed: str) -> str:
    code = (
        "from lmcache_sgl.keys import *;"
        "ns = Namespace(model=model_fingerprint({'layers': 2}, b'w'), kv_dtype='bfloat16', kv_layout='x');"
        "print(','.join(k.hex() for k in chunk_keys(ns.digest(), list(range(100)), 16, partial=True)))"
    )
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_keys_are_stable_across_processes_and_hash_seeds():
    a, b = _keys_in_subprocess("1"), _keys_in_subprocess("4242")
    assert a == b and len(a.split(",")) == 7


@given(tokens=tokens_st, chunk=st.integers(1, 8), partial=st.booleans())
def test_one_key_per_chunk_and_wide(tokens, chunk, partial):
    keys = chunk_keys(NS.digest(), tokens, chunk, partial=partial)
    spans = list(chunk_spans(len(tokens), chunk, partial=partial))
    assert len(keys) == len(spans)
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == len(keys)


@given(tokens=st.lists(st.integers(0, 1000), min_size=8, max_size=64), chunk=st.integers(1, 8), data=st.data())
def test_changing_a_token_changes_its_chunk_and_later_keys_only(tokens, chunk, data):
    pos = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[pos] += 1
    before = chunk_keys(NS.digest(), tokens, chunk, partial=True)
    after = chunk_keys(NS.digest(), changed, chunk, partial=True)
    hit = pos // chunk
    assert before[:hit] == after[:hit]
    assert all(x != y for x, y in zip(before[hit:], after[hit:]))


@given(tokens=st.lists(st.integers(0, 1000), min_size=4, max_size=32))
def test_namespaces_give_disjoint_keys(tokens):
    variants = [
        NS,
        Namespace(model=model_fingerprint({"layers": 3}, b"w"), kv_dtype="bfloat16", kv_layout="mha:L2:H1:D4"),
        Namespace(model=model_fingerprint({"layers": 2}, b"v"), kv_dtype="bfloat16", kv_layout="mha:L2:H1:D4"),
        Namespace(model=NS.model, kv_dtype="float16", kv_layout=NS.kv_layout),
        Namespace(model=NS.model, kv_dtype=NS.kv_dtype, kv_layout="mla:L2:D8"),
        Namespace(model=NS.model, kv_dtype=NS.kv_dtype, kv_layout=NS.kv_layout, tp_rank=1, tp_size=2),
        Namespace(model=NS.model, kv_dtype=NS.kv_dtype, kv_layout=NS.kv_layout, extra_key="lora-a"),
        Namespace(model=NS.model, kv_dtype=NS.kv_dtype, kv_layout=NS.kv_layout, cache_salt="tenant-b"),
    ]
    key_sets = [set(chunk_keys(ns.digest(), tokens, 4, partial=True)) for ns in variants]
    for i in range(len(key_sets)):
        for j in range(i + 1, len(key_sets)):
            assert not key_sets[i] & key_sets[j]


def test_partial_chunk_key_differs_from_whole_chunk_key():
    whole = chunk_keys(NS.digest(), [1, 2, 3, 4], 4)
    part = chunk_keys(NS.digest(), [1, 2, 3], 4, partial=True)
    assert len(whole) == 1 and len(part) == 1 and whole != part
    assert chunk_keys(NS.digest(), [1, 2, 3], 4) == []
