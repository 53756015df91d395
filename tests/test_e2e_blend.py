"""End to end on the real SGLang server with enable_blending: documents seen in one
prompt are reused in another prompt that puts them in another order after another
preamble; at recompute ratio 1.0 the output equals a full prefill's; blended
(approximate) KV is never served as an exact hit, from the tree or the prefix tiers; a
model blending cannot serve is refused at start."""

import random

import pytest
from transformers import AutoTokenizer

from lmcache_sgl.models import make_model
from lmcache_sgl.server import ServerError, SGLangServer

from test_e2e_server import config_file, same_output, server

BLENDED = "lmcache-sgl: blended"
LOADED = "lmcache-sgl: loaded"
DOC = 150  # tokens per document


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {preset: make_model(root / preset, preset) for preset in ("tiny", "mla-tiny")}


def rag_prompts(model):
    """Two prompts over the same three documents, in other orders, after other preambles."""
    separator = AutoTokenizer.from_pretrained(str(model)).encode(" # # ", add_special_tokens=False)
    rng = random.Random(5)

    def text(n):
        return [rng.randrange(10, 2000) for _ in range(n)]

    docs = [text(DOC) for _ in range(3)]

    def prompt(order):
        tokens = text(20)
        for d in order:
            tokens += separator + docs[d]
        return tokens + separator + text(12)

    return prompt([0, 1, 2]), prompt([2, 0, 1])


def blend_config(tmp_path, **values):
    return config_file(tmp_path, enable_blending=True, **values)


def test_shuffled_documents_are_blended_and_ratio_one_equals_full_prefill(models, tmp_path):
    first, shuffled = rag_prompts(models["tiny"])
    cfg = blend_config(tmp_path, blend_strategy="cacheblend", blend_recompute_ratios=1.0)
    with server(models["tiny"], cfg, tmp_path, "blend") as srv:
        srv.wait_healthy()
        srv.generate(first, max_new_tokens=4)
        blended = srv.generate(shuffled, max_new_tokens=8)
        log = srv.log_path.read_text()
    assert log.count(BLENDED) == 1, "the shuffled documents were not reused"
    assert blended["meta_info"]["cached_tokens"] >= 3 * DOC
    with SGLangServer(models["tiny"], extra_args=["--log-level", "info"], log_path=tmp_path / "stock.log") as srv:
        srv.wait_healthy()
        full = srv.generate(shuffled, max_new_tokens=8)
    assert same_output(full, blended), (full["output_ids"], blended["output_ids"])


def test_blended_kv_is_never_an_exact_hit(models, tmp_path):
    first, shuffled = rag_prompts(models["tiny"])
    cfg = blend_config(tmp_path, blend_strategy="reuse")
    with server(models["tiny"], cfg, tmp_path, "reuse") as srv:
        srv.wait_healthy()
        srv.generate(first, max_new_tokens=4)
        once = srv.generate(shuffled, max_new_tokens=8)
        again = srv.generate(shuffled, max_new_tokens=8)  # not from the tree: blended again
        srv.flush_cache()
        after_flush = srv.generate(shuffled, max_new_tokens=8)  # not from the prefix tiers either
        log = srv.log_path.read_text()
    assert log.count(BLENDED) == 3
    assert LOADED not in log
    assert once["output_ids"] == again["output_ids"] == after_flush["output_ids"]


def test_a_model_blending_cannot_serve_is_refused(models, tmp_path):
    with server(models["mla-tiny"], blend_config(tmp_path), tmp_path, "mla") as srv:
        with pytest.raises(ServerError, match="enable_blending does not support model DeepseekV2ForCausalLM"):
            srv.wait_healthy(timeout=240)


def test_without_a_separator_stored_spans_are_found_at_any_offset(models, tmp_path):
    """blend_special_str null: the chunk-aligned spans of a computed prompt are found in a
    prompt that shifts them by a non-multiple of the chunk size; a request's
    custom_params.lmcache_blend picks its strategy, and a bad one falls back to the
    server's, counted."""
    rng = random.Random(8)
    body = [rng.randrange(10, 2000) for _ in range(400)]
    first = [rng.randrange(10, 2000) for _ in range(20)] + body
    shifted = [rng.randrange(10, 2000) for _ in range(33)] + body + [5, 6, 7]
    cfg = blend_config(tmp_path, blend_special_str=None)
    with server(models["tiny"], cfg, tmp_path, "rolling") as srv:
        srv.wait_healthy()
        srv.generate(first, max_new_tokens=2)
        boundary = srv.generate(shifted, max_new_tokens=2, custom_params={"lmcache_blend": {"strategy": "boundary"}})
        srv.generate(shifted, max_new_tokens=2, custom_params={"lmcache_blend": {"strategy": "nope"}})
        log = srv.log_path.read_text()
    assert log.count(BLENDED) == 2
    assert "lmcache-sgl: blend boundary" in log and "lmcache-sgl: blend cacheblend" in log
    assert "strategy 'nope' is not one of" in log
    assert boundary["meta_info"]["cached_tokens"] >= 320  # spans of 64 inside the shifted body
