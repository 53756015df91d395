"""End to end on the real SGLang server (CPU development mode, built-in models):
prefixes evicted from SGLang's radix tree come back from the CPU tier, and after a
restart from the disk tier, with the same greedy outputs; namespaces stay apart; a bad
config stops the server with a message naming the key."""

import random

import pytest
import yaml

from lmcache_sgl.models import make_model
from lmcache_sgl.server import ServerError, SGLangServer, wait_for_files

CHUNK = 64
PROMPT = 600  # 9 whole chunks + a partial one
POOL = 1500  # device tokens: two other prompts push the first one out of the radix tree
LOADED = "lmcache-sgl: loaded"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {preset: make_model(root / preset, preset) for preset in ("tiny", "mla-tiny")}


def config_file(tmp_path, **values):
    path = tmp_path / "lmcache.yaml"
    base = {"chunk_size": CHUNK, "max_local_cpu_size": 0.2, "local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.5}
    path.write_text(yaml.safe_dump({**base, **values}))
    return str(path)


def server(model, cfg, tmp_path, name):
    args = ["--enable-lmcache", "--lmcache-config-file", cfg, "--max-total-tokens", str(POOL), "--log-level", "info"]
    return SGLangServer(model, extra_args=args, log_path=tmp_path / f"{name}.log")


def prompts(n, vocab=2000, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(PROMPT)] for _ in range(n)]


def same_output(first, second):
    """Greedy outputs must match; on random weights a near-tie may flip a token, so a
    differing token is accepted only if both runs' top logprobs there are within 1e-2
    (bf16 rounding of a recomputed vs a loaded prefix can move logits that much)."""
    if first["output_ids"] == second["output_ids"]:
        return True
    for a, b in zip(first["meta_info"]["output_token_logprobs"], second["meta_info"]["output_token_logprobs"]):
        if a[1] != b[1]:
            return abs(a[0] - b[0]) < 1e-2
    return False


def evict_then_revisit(srv, a, others):
    for p in others:
        srv.generate(p, max_new_tokens=4)
    return srv.generate(a, max_new_tokens=8)


def test_evicted_prefix_comes_back_from_cpu_then_disk(models, tmp_path):
    cfg = config_file(tmp_path)
    a, b, c, = prompts(3)
    with server(models["tiny"], cfg, tmp_path, "first") as srv:
        srv.wait_healthy()
        first = srv.generate(a, max_new_tokens=8)
        assert first["meta_info"]["cached_tokens"] == 0
        again = evict_then_revisit(srv, a, [b, c])
        log = srv.log_path.read_text()
        stored = wait_for_files(tmp_path / "disk")  # disk writes run while the server is idle
    assert LOADED in log, "the revisit was not served from the tiers"
    assert again["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK
    assert same_output(first, again)
    assert stored >= PROMPT // CHUNK, "the disk tier does not hold the prompt"

    with server(models["tiny"], cfg, tmp_path, "restarted") as srv:  # CPU tier empty: disk only
        srv.wait_healthy()
        after_restart = srv.generate(a, max_new_tokens=8)
        log = srv.log_path.read_text()
    assert LOADED in log
    assert after_restart["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK
    assert same_output(first, after_restart)


def test_cache_salt_keeps_tenants_apart(models, tmp_path):
    """Also the other way in: --radix-cache-backend lmcache_sgl, config from LMCACHE_CONFIG_FILE."""
    cfg = config_file(tmp_path)
    a, b, c = prompts(3, seed=1)
    args = ["--radix-cache-backend", "lmcache_sgl", "--max-total-tokens", str(POOL)]
    srv = SGLangServer(models["tiny"], extra_args=args, env_overrides={"LMCACHE_CONFIG_FILE": cfg}, log_path=tmp_path / "salt.log")
    with srv:
        srv.wait_healthy()
        srv.request("/generate", {"input_ids": a, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "cache_salt": "tenant-a"})
        for p in (b, c):
            srv.generate(p, max_new_tokens=4)
        other = srv.request("/generate", {"input_ids": a, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "cache_salt": "tenant-b"})
        same = srv.request("/generate", {"input_ids": a, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "cache_salt": "tenant-a"})
        log = srv.log_path.read_text()
    assert "lmcache-sgl active" in log and LOADED in log
    assert other["meta_info"]["cached_tokens"] == 0
    assert same["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK


def test_mla_model_end_to_end(models, tmp_path):
    cfg = config_file(tmp_path)
    a, b, c = prompts(3, seed=2)
    with server(models["mla-tiny"], cfg, tmp_path, "mla") as srv:
        srv.wait_healthy()
        first = srv.generate(a, max_new_tokens=8)
        again = evict_then_revisit(srv, a, [b, c])
        log = srv.log_path.read_text()
    assert LOADED in log
    assert again["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK
    assert same_output(first, again)


def test_bad_config_stops_the_server_naming_the_key(models, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("chunk_sise: 256\n")
    with server(models["tiny"], str(path), tmp_path, "bad") as srv:
        with pytest.raises(ServerError, match="chunk_sise"):
            srv.wait_healthy(timeout=240)
