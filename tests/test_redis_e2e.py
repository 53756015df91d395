"""Two real SGLang servers share one redis-server: what the first computed is a hit on
the second's very first request, with the same greedy output; the second promotes what it
loads into its own CPU tier, so it still hits once Redis is gone, and serves every
request while Redis is down."""

import time

import pytest
import yaml

from lmcache_sgl.models import make_model
from lmcache_sgl.server import SGLangServer
from redis_servers import redis_factory, redis_server  # noqa: F401 (fixtures)
from test_e2e_server import CHUNK, POOL, PROMPT, prompts, same_output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


def start(model, tmp_path, name, **values):
    cfg = tmp_path / f"{name}.yaml"
    base = {"chunk_size": CHUNK, "max_local_cpu_size": 0.2, "max_disk_write_delay": 0.5, "remote_timeout": 0.5}
    cfg.write_text(yaml.safe_dump({**base, **values}))
    args = ["--enable-lmcache", "--lmcache-config-file", str(cfg), "--max-total-tokens", str(POOL), "--log-level", "info"]
    return SGLangServer(model, extra_args=args, log_path=tmp_path / f"{name}.log")


def wait_for_keys(client, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while client.dbsize() < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return client.dbsize()


def test_second_instance_hits_what_the_first_stored(model, tmp_path, redis_server):
    a, b, c = prompts(3, seed=7)
    first_srv = start(model, tmp_path, "first", remote_url=redis_server.url)
    second_srv = start(model, tmp_path, "second", remote_url=redis_server.url, local_disk=str(tmp_path / "disk2"),
                       max_local_disk_size=0.2)
    with first_srv, second_srv:
        first_srv.wait_healthy()
        second_srv.wait_healthy()
        first = first_srv.generate(a, max_new_tokens=8)
        assert wait_for_keys(redis_server.client(), PROMPT // CHUNK + 1) >= PROMPT // CHUNK + 1
        second = second_srv.generate(a, max_new_tokens=8)  # its CPU and disk tiers are empty
        assert second["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK, "not a hit from Redis"
        assert same_output(first, second)

        redis_server.kill()  # every request is still served; the loaded chunks are in its CPU tier
        for p in (b, c):
            second_srv.generate(p, max_new_tokens=4)
        again = second_srv.generate(a, max_new_tokens=8)
        log = second_srv.log_path.read_text()
    assert again["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK, "the Redis hit was not promoted"
    assert same_output(first, again)
    assert "lmcache-sgl active" in log and "redis redis://127.0.0.1" in log
    assert log.count("its chunks are misses; retrying with backoff") == 1
