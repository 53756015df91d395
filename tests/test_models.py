"""Random-weight model directories: deterministic from the seed, loadable by transformers."""

from __future__ import annotations

import filecmp
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lmcache_sgl import models  # noqa: E402


def _files(d):
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = models.make_model(root / "a", "tiny", seed=0)
    b = models.make_model(root / "b", "tiny", seed=0)
    c = models.make_model(root / "c", "tiny", seed=1)
    return a, b, c


def test_same_seed_same_bytes(built):
    a, b, _ = built
    assert _files(a) == _files(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", models.MARKER} <= set(_files(a))
    match, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert mismatch == [] and errors == []


def test_different_seed_differs(built):
    a, _, c = built
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)
    assert not filecmp.cmp(a / "tokenizer.json", c / "tokenizer.json", shallow=False)


def test_complete_dir_is_skipped(built):
    a, _, _ = built
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert models.is_complete(a, "tiny", 0)
    assert not models.is_complete(a, "tiny", 1) and not models.is_complete(a, "small", 0)
    models.make_model(a, "tiny", seed=0)
    assert (a / "model.safetensors").stat().st_mtime_ns == before


def test_loads_with_transformers(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, _, _ = built
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.dtype == torch.bfloat16
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 4.5e6
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    assert tok.eos_token_id != tok.bos_token_id

    text = "Strontium quaint blorf 123, 4567! def foo(x): return x"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless

    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "hi" in chat and chat.rstrip().endswith("<|assistant|>")

    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_words_tokenize_to_many_ids(built):
    """Prompts made of generated words spread over much of the vocabulary."""
    import random

    from transformers import AutoTokenizer

    a, _, _ = built
    tok = AutoTokenizer.from_pretrained(a)
    rng = random.Random(0)
    words = " ".join(models._word(rng) for _ in range(3000))
    ids = tok(words)["input_ids"]
    assert len(set(ids)) > 0.4 * tok.vocab_size
