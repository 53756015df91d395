"""End to end on the real SGLang server with --enable-metrics: /metrics (served by SGLang's
HTTP process) shows lmcache-sgl's series, written by the scheduler process, and SGLang's
own sglang:cached_tokens_total counts a tier hit."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcache_sgl.models import make_model
from lmcache_sgl.server import SGLangServer

from test_e2e_server import CHUNK, POOL, PROMPT, config_file, prompts

HIT = PROMPT // CHUNK * CHUNK  # the whole chunks of the prompt


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model(root / "tiny", "tiny")


def scrape(srv) -> list:
    """/metrics as (sample name, labels, value)."""
    text = srv.request("/metrics")
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples, name, **labels) -> float:
    """Sum of the samples named `name` whose labels match `labels` ("a|b": either value)."""
    return sum(v for n, have, v in samples if n == name and all(have.get(k) in want.split("|") for k, want in labels.items()))


def test_metrics_endpoint_shows_a_tier_hit(model, tmp_path):
    cfg = config_file(tmp_path)
    (a,) = prompts(1, seed=3)
    args = ["--enable-lmcache", "--lmcache-config-file", cfg, "--max-total-tokens", str(POOL), "--enable-metrics"]
    with SGLangServer(model, extra_args=args, log_path=tmp_path / "metrics.log") as srv:
        srv.wait_healthy()
        first = srv.generate(a, max_new_tokens=4)
        assert first["meta_info"]["cached_tokens"] == 0
        srv.request("/flush_cache")  # empties the device tree, the tiers keep the prompt
        again = srv.generate(a, max_new_tokens=4)
        assert again["meta_info"]["cached_tokens"] >= HIT, "the revisit was not served from the tiers"

        least = {  # sample name, labels: the least value that shows the hit
            ("lmcache_sgl_lookup_requested_tokens_total", ()): PROMPT,
            ("lmcache_sgl_lookup_hit_tokens_total", (("tier", "cpu"),)): HIT,
            ("lmcache_sgl_loaded_tokens_total", (("tier", "cpu"),)): HIT,
            ("lmcache_sgl_load_bytes_total", (("tier", "cpu"),)): 1,
            ("lmcache_sgl_load_seconds_count", ()): 1,
            ("lmcache_sgl_capacity_bytes", (("tier", "cpu"),)): 1,
            ("lmcache_sgl_usage_bytes", (("tier", "cpu"),)): 1,
            # SGLang counts the tokens init_load_back loads as cache_source "host"; an adapter
            # that also reports them as the request's storage hit (as SGLang's own LMCache
            # adapter does) gets "storage". Either credits the tiers, not the device.
            ("sglang:cached_tokens_total", (("cache_source", "host|storage"),)): HIT,
        }
        deadline = time.monotonic() + 10  # gauges are exported every second
        while True:
            samples = scrape(srv)
            got = {(name, labels): total(samples, name, **dict(labels)) for name, labels in least}
            if all(got[key] >= least[key] for key in least) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert {key: got[key] for key in least if got[key] < least[key]} == {}, f"{got}; log {srv.log_path}"
    ours = [labels for name, labels, _ in samples if name.startswith("lmcache_sgl_")]
    assert all(labels.get("tp_rank") == "0" and labels.get("model_name") for labels in ours)
