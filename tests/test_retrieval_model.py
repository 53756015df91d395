"""The retrieval task (lmcache_sgl.retrieval) and its committed model: the weights answer
held-out prompts of every question type with full prefill (bf16 forward on CPU), the
tokenizer keeps the separator and the parts' tokens intact, the generator is
deterministic, aliases resolve to an earlier document only."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lmcache_sgl import models  # noqa: E402
from lmcache_sgl import retrieval as R  # noqa: E402

N_PER_TYPE = 100


@pytest.fixture(scope="module")
def tok():
    return R.load_tokenizer()


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(R.MODEL_DIR, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def prompts():
    return [p for t in R.QTYPES for p in R.sample_prompts(N_PER_TYPE, "test", t)]


# ---------------------------------------------------------------- the committed model


def test_model_directory(model):
    import torch

    cfg = json.loads((R.MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] == "bfloat16"
    assert cfg["max_position_embeddings"] >= 4096 and not cfg["tie_word_embeddings"]
    assert cfg["bos_token_id"] == R.BOS_ID and cfg["eos_token_id"] == R.EOS_ID
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        f.name for f in R.MODEL_DIR.iterdir()
    }
    assert model.dtype == torch.bfloat16
    assert 2e6 <= sum(p.numel() for p in model.parameters()) < 5e6
    assert cfg["num_hidden_layers"] >= 4  # bench/rag.py: cacheblend's check layers [1] and [2] leave layers after them
    assert models.TRAINED["retrieval"] == R.MODEL_DIR


def test_held_out_accuracy_full_prefill_bf16(model, prompts):
    acc = R.accuracy(prompts, R.predict(model, prompts))
    assert all(acc[t] >= 0.9 for t in R.QTYPES), acc


def test_answer_is_followed_by_eos(model, prompts):
    sample = prompts[:: len(prompts) // 20]
    followed = [dataclasses.replace(p, input_ids=p.input_ids + (p.answer_id,)) for p in sample]
    assert sum(t == R.EOS_ID for t in R.predict(model, followed)) >= 0.9 * len(sample)


def test_make_model_copies_the_committed_model(tmp_path):
    path = models.make_model(tmp_path / "r", "retrieval")
    assert (path / "model.safetensors").read_bytes() == (R.MODEL_DIR / "model.safetensors").read_bytes()
    assert models.is_complete(path, "retrieval", 0)
    before = (path / "model.safetensors").stat().st_mtime_ns
    models.make_model(path, "retrieval")
    assert (path / "model.safetensors").stat().st_mtime_ns == before


# ---------------------------------------------------------------- tokenizer


def test_committed_tokenizer_is_the_task_vocabulary(tok):
    assert tok.get_vocab() == R.TOKEN_ID
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (R.BOS_ID, R.EOS_ID, R.PAD_ID)


def test_separator_tokens_appear_verbatim(tok, prompts):
    sep = tok.encode(R.SEPARATOR, add_special_tokens=False)
    assert tuple(sep) == R.SEPARATOR_IDS and len(sep) == 2
    for p in prompts[:50]:
        ids = p.input_ids
        ends = [s for s, _ in p.doc_spans] + [p.doc_spans[-1][1] + len(sep)]
        for at in ends:
            assert ids[at - len(sep) : at] == R.SEPARATOR_IDS
        for d, (s, e) in zip(p.documents, p.doc_spans, strict=True):
            assert list(ids[s:e]) == tok.encode(d.text, add_special_tokens=False)


def test_whole_prompt_is_the_concatenation_of_its_parts(tok, prompts):
    for p in prompts[:50]:
        assert p.text == R.SEPARATOR.join(p.parts)
        whole = tok(p.text)["input_ids"]
        assert whole == list(p.input_ids)
        parts = [tok.bos_token_id]
        for i, part in enumerate(p.parts):
            parts += tok.encode(part, add_special_tokens=False)
            if i < len(p.parts) - 1:
                parts += tok.encode(R.SEPARATOR, add_special_tokens=False)
        assert whole == parts
        assert R.token_ids(p.text) == whole[1:]
        assert tok.decode(whole[1:]) == " ".join(p.text.split())


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic():
    assert R.sample_prompts(30, "test") == R.sample_prompts(30, "test")
    assert R.sample_prompts(30, "test")[:10] == R.sample_prompts(10, "test")
    assert R.document_pool("valid") == R.document_pool("valid")
    assert R.document_pool("valid") != R.document_pool("test")
    a = [R.training_sequence(random.Random(7)) for _ in range(3)]
    b = [R.training_sequence(random.Random(7)) for _ in range(3)]
    assert a == b


def test_prompts_follow_the_task():
    for p in R.sample_prompts(90, "test"):
        assert len(p.documents) == R.N_DOCS and len(set(p.documents)) == R.N_DOCS
        assert all(50 <= e - s <= 100 for s, e in p.doc_spans)
        stated = [i for i, d in enumerate(p.documents) if d.value(p.key) is not None]
        if p.qtype == "alias":
            (at,) = stated
            target = p.documents[at].value(p.key)
            assert target is not None and R.is_alias(target)
            (src,) = [i for i, d in enumerate(p.documents) if d.value(target) is not None]
            assert src < at and p.key_docs == (src, at)
            assert p.answer == p.documents[src].value(target) and not R.is_alias(p.answer)
            continue
        assert tuple(stated) == p.key_docs
        assert p.answer == p.documents[stated[-1]].value(p.key) and p.answer_id == R.TOKEN_ID[p.answer]
        if p.qtype == "single":
            assert len(stated) == 1
        else:
            assert len(stated) >= 2 and all(p.documents[i].value(p.key) != p.answer for i in stated[:-1])
    assert {p.qtype for p in R.sample_prompts(10, "test")} == set(R.QTYPES)
    with pytest.raises(ValueError):
        R.build_prompt(R.document_pool("test", 4), "no-such-key")


def test_alias_resolves_only_to_an_earlier_document():
    k1, k2, k3 = R.KEYS[:3]
    v1, v2 = R.VALUES[:2]
    fact = R.Document(R.TITLES[0], ((k1, v1),))
    alias = R.Document(R.TITLES[1], ((k2, k1),))
    other = R.Document(R.TITLES[2], ((k3, v2),))
    assert R.classify([fact, other, alias], k2) == "alias" and R.answer([fact, other, alias], k2) == v1
    assert R.build_prompt([fact, other, alias, other], k2).key_docs == (0, 2)
    assert R.classify([alias, fact], k2) is None  # the target comes later
    assert R.classify([fact, R.Document(R.TITLES[3], ((k1, v2),)), alias], k2) is None  # the target is updated
    assert R.classify([fact, alias, R.Document(R.TITLES[3], ((k2, v2),))], k2) is None  # restated by a fact
    assert R.classify([fact, alias], k1) == "single"  # an alias's target is no statement of it
    assert R.keys_by_type([fact, other, alias]) == {"single": [k1, k3], "updated": [], "alias": [k2]}
