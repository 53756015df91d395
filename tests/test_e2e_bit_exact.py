"""End to end at the reported length (16376-token prompts, small model, context 16384, CPU
mode): a prefix loaded from the CPU tier gives the same greedy tokens and logprobs, bit
for bit, as the device prefix it replaces: all of it, and its tail after a shorter device
hit. Both recompute the prompt's last token for its logits; a device hit then decodes
over the tree's KV of that token (SGLang's checkpoint points the request at it), so a
tier hit must decode over the stored KV of it, not over the recomputed one (which the CPU
path rounds otherwise when it computes 1 new token instead of a block of them)."""

import random

import pytest
import yaml

from lmcache_sgl.models import make_model
from lmcache_sgl.server import SGLangServer

PROMPT = 16376  # 63 whole chunks of 256 + 248; SGLang clips max_new_tokens to 6 here


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "small", "small")


def outputs(reply):
    return reply["output_ids"], [entry[0] for entry in reply["meta_info"]["output_token_logprobs"]]


def hits(reply):
    """(device, tier) tokens of the request's prefix."""
    details = reply["meta_info"]["cached_tokens_details"]
    return details["device"], details["host"]


def test_loaded_prefix_gives_the_device_prefix_logits_bit_for_bit(model, tmp_path):
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 0.5}))
    args = ["--enable-lmcache", "--lmcache-config-file", str(cfg), "--max-total-tokens", "20000",
            "--context-length", "16384"]
    rng = random.Random(1)
    a = [rng.randrange(10, 8000) for _ in range(PROMPT)]
    b = a[:-6] + [11, 12, 13]  # PROMPT - 3 tokens, the first PROMPT - 6 of them a's
    with SGLangServer(model, extra_args=args, log_path=tmp_path / "server.log") as srv:
        srv.wait_healthy(600)
        srv.generate(a, max_new_tokens=8)
        a_device = srv.generate(a, max_new_tokens=8)
        srv.flush_cache()  # the device tree is empty; the tiers keep what was computed
        a_loaded = srv.generate(a, max_new_tokens=8)
        srv.generate(b, max_new_tokens=8)  # a device hit of a's PROMPT - 6 tokens
        b_device = srv.generate(b, max_new_tokens=8)
        srv.flush_cache()
        b_loaded = srv.generate(b, max_new_tokens=8)
        a_tail_loaded = srv.generate(a, max_new_tokens=8)  # b's PROMPT - 6 on the device
    assert hits(a_device) == (PROMPT - 1, 0) and hits(a_loaded) == (0, PROMPT - 1)
    assert hits(b_device) == (PROMPT - 4, 0) and hits(b_loaded) == (0, PROMPT - 4)
    assert hits(a_tail_loaded) == (PROMPT - 6, 5)
    assert outputs(a_loaded) == outputs(a_device)
    assert outputs(b_loaded) == outputs(b_device)
    assert outputs(a_tail_loaded) == outputs(a_device)
