"""The Redis tier against real redis-server processes: frames round-trip, operations are
pipelined, bad values are rejected misses, outages cost bounded time and heal, keys are
isolated by namespace and prefix."""

import logging
import time

import pytest
import torch

from lmcache_sgl.codec import ChunkLayout, encode, frame_bytes
from lmcache_sgl.config import ConfigError, LMCacheConfig
from lmcache_sgl.engine import CacheEngine, KVPoolView
from lmcache_sgl.storage import CpuTier, Payload, TierStack
from lmcache_sgl.storage import redis as redis_module
from lmcache_sgl.storage.redis import RedisTier
from redis_servers import redis_factory, redis_server  # noqa: F401 (fixtures)
from test_codec import version_2_frame

LAYOUT = ChunkLayout("mha", "bfloat16", (2, 2, 4, 1, 64))
TIMEOUT = 0.3


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(LAYOUT.shape, generator=g).to(torch.bfloat16).reshape(-1).view(torch.uint8).clone()


def tier(server, **kwargs) -> RedisTier:
    return RedisTier(server.url, timeout_s=TIMEOUT, max_delay_s=0.5, **kwargs)


def position(i: int) -> int:
    return 2**50 + 3 * i


def owned(i: int) -> Payload:
    """Chunk i's bytes and position, as a copy for a tier to write."""
    return Payload(payload(i), LAYOUT.nbytes, position=position(i))


def put(t: RedisTier, *ids: int) -> None:
    for i in ids:
        t.put(key(i), LAYOUT, owned(i))
    assert t.flush(10)


def read(t: RedisTier, i: int) -> torch.Tensor | None:
    """Chunk i's bytes from `t` (which must give its position too), None on a miss."""
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    got = t.get_into(key(i), LAYOUT, out)
    assert got in (None, position(i))
    return None if got is None else out


def count_round_trips(monkeypatch) -> list:
    """The number of commands of each exchange with a server (run()'s pipeline, or get()'s
    pipelined GETs), in order."""
    calls = []
    for name in ("run", "get"):
        real = getattr(redis_module._Server, name)
        monkeypatch.setattr(
            redis_module._Server, name, lambda self, batch, real=real: calls.append(len(batch)) or real(self, batch)
        )
    return calls


@pytest.mark.parametrize("serde", ["naive", "zstd"])
def test_store_and_read_back_across_instances(redis_server, serde):
    a, b = tier(redis_server, serde=serde), tier(redis_server, serde=serde)
    put(a, 0, 1, 2)
    assert a.metrics.snapshot()["stored_chunks_total"] == {"redis": 3}
    assert b.count_present([key(0), key(1), key(2), key(3)]) == 3
    assert key(1) in b and key(7) not in b  # seen present by count_present; never a network call
    assert torch.equal(read(b, 1), payload(1)) and read(b, 5) is None
    assert not a.put(key(0), LAYOUT, owned(0))  # known present: not written twice
    a.close(), b.close()


def test_queued_writes_share_one_pipeline(redis_server, monkeypatch):
    """Chunks queued while the server is busy are written, once their turn comes, with
    one pipeline of SETs per batch, not one round trip per chunk."""
    from lmcache_sgl.storage import IdleSignal

    idle = IdleSignal()
    t = RedisTier(redis_server.url, timeout_s=TIMEOUT, max_delay_s=60, idle=idle)
    calls = count_round_trips(monkeypatch)
    for i in range(redis_module.WRITE_BATCH):
        assert t.put(key(i), LAYOUT, owned(i))
    assert t.flush(10)
    assert calls == [redis_module.WRITE_BATCH]
    assert t.metrics.snapshot()["stored_chunks_total"] == {"redis": redis_module.WRITE_BATCH}
    assert all(torch.equal(read(tier(redis_server), i), payload(i)) for i in range(redis_module.WRITE_BATCH))
    t.close()


def test_lookup_and_load_are_one_round_trip_each(redis_server, monkeypatch):
    """20 chunks from another instance: lookup is one pipelined EXISTS, get_many one
    pipelined GET, and every chunk is promoted into the CPU tier."""
    writer = tier(redis_server)
    put(writer, *range(20))
    stack = TierStack(CpuTier(20 * LAYOUT.nbytes, LAYOUT.nbytes), [tier(redis_server)])
    calls = count_round_trips(monkeypatch)
    keys = [key(i) for i in range(20)] + [key(99)]
    assert stack.lookup(keys) == 20 and calls == [21]
    hits = stack.get_many([(k, LAYOUT) for k in keys[:20]])
    assert calls == [21, 20]
    assert all(h.tier == "redis" and torch.equal(h.data, payload(i)) for i, h in enumerate(hits))
    for k in keys[:20]:
        stack.release(k)
    assert stack.lookup_tiers(keys[:20]) == ["cpu"] * 20
    writer.close(), stack.close()


def test_positions_come_back_from_redis_written_through_or_demoted_and_promoted(redis_server):
    """A chunk's position reaches Redis by write-through and by write-back demotion, and
    comes back with the promotion into the CPU tier and with later CPU hits."""
    for write_through in (True, False):
        redis_server.client().flushall()
        stack = TierStack(CpuTier(LAYOUT.nbytes, LAYOUT.nbytes), [tier(redis_server)], write_through=write_through)
        for i in (0, 1):  # under write_back, 1's store demotes 0
            assert stack.store(key(i), LAYOUT, lambda buf, i=i: buf.copy_(payload(i)), position=position(i))
            assert stack.flush(10)
        stack.hot.clear()
        for i, source in ((0, "redis"), (0, "cpu")):
            hit = stack.get(key(i), LAYOUT)
            assert hit is not None and (hit.tier, hit.position) == (source, position(i))
            assert torch.equal(hit.data, payload(i))
            stack.release(key(i))
        assert torch.equal(read(tier(redis_server), 0), payload(0))
        stack.close()


def test_a_version_2_frame_in_redis_is_a_rejected_miss(redis_server):
    redis_server.client().set(b"lmcsgl:" + key(0).hex().encode(), version_2_frame(key(0), LAYOUT, payload(0)))
    t = tier(redis_server)
    assert t.count_present([key(0)]) == 1 and read(t, 0) is None and key(0) not in t
    assert t.metrics.snapshot()["corrupt_frames_total"] == {"redis": 1}
    put(t, 0)  # the next store overwrites it
    assert torch.equal(read(tier(redis_server), 0), payload(0))
    t.close()


def test_ttl_is_set(redis_server):
    t = tier(redis_server, ttl_s=30)
    put(t, 0)
    assert 0 < redis_server.client().pttl(b"lmcsgl:" + key(0).hex().encode()) <= 30_000
    t.close()


def test_garbage_foreign_and_flipped_values_are_rejected_misses(redis_server):
    t = tier(redis_server)
    put(t, 0, 1)
    r = redis_server.client()
    name = lambda i: b"lmcsgl:" + key(i).hex().encode()  # noqa: E731
    r.set(name(2), b"garbage")
    r.set(name(3), r.get(name(0)))  # another chunk's frame under this key
    flipped = bytearray(r.get(name(1)))
    flipped[len(flipped) // 2] ^= 0x10
    r.set(name(1), bytes(flipped))
    r.set(name(4), frame_bytes(encode(key(4), ChunkLayout("bytes", "uint8", (10,)), torch.zeros(10, dtype=torch.uint8))))
    fresh = tier(redis_server)
    for i in (1, 2, 3, 4):
        assert read(fresh, i) is None and key(i) not in fresh
    assert torch.equal(read(fresh, 0), payload(0))
    assert fresh.metrics.snapshot()["corrupt_frames_total"] == {"redis": 4}
    t.close(), fresh.close()


def test_hmac_rejects_frames_without_the_secret_with_another_or_altered(redis_server):
    signed = tier(redis_server, hmac_key=b"secret-a")
    plain = tier(redis_server, key_prefix="plain:")
    put(signed, 0, 1)
    put(plain, 2)
    r = redis_server.client()
    r.set(b"lmcsgl:" + key(2).hex().encode(), r.get(b"plain:" + key(2).hex().encode()))  # a valid frame, no tag
    value = bytearray(r.get(b"lmcsgl:" + key(1).hex().encode()))
    value[100] ^= 1
    r.set(b"lmcsgl:" + key(1).hex().encode(), bytes(value))
    reader = tier(redis_server, hmac_key=b"secret-a")
    other = tier(redis_server, hmac_key=b"secret-b")
    unsigned = tier(redis_server)
    assert torch.equal(read(reader, 0), payload(0))
    assert read(reader, 1) is None and read(reader, 2) is None
    assert read(other, 0) is None and read(unsigned, 0) is None  # the tag makes the frame's size wrong
    assert reader.metrics.snapshot()["corrupt_frames_total"] == {"redis": 2}
    assert other.metrics.snapshot()["corrupt_frames_total"] == {"redis": 1}
    for t in (signed, plain, reader, other, unsigned):
        t.close()


def test_key_prefix_isolates_and_clear_deletes_only_its_prefix(redis_server):
    a, b = tier(redis_server, key_prefix="dep-a:"), tier(redis_server, key_prefix="dep-b:")
    put(a, 0, 1)
    put(b, 0)
    assert tier(redis_server, key_prefix="dep-b:").count_present([key(0), key(1)]) == 1
    held = a.protect([key(1)])
    a.clear()
    r = redis_server.client()
    assert sorted(r.keys()) == sorted([b"dep-a:" + key(1).hex().encode(), b"dep-b:" + key(0).hex().encode()])
    a.unprotect(held)
    a.close(), b.close()


def _engine(url: str, model: bytes) -> CacheEngine:
    config = LMCacheConfig(chunk_size=4, max_local_cpu_size=0.001, remote_url=url, remote_timeout=TIMEOUT,
                           max_disk_write_delay=0.5)
    return CacheEngine(config, KVPoolView("mha", tuple(torch.randn(64, 1, 8) for _ in range(2))), model)


def test_namespaces_never_meet_in_one_redis(redis_server):
    """Two models, or two cache_salts, on one Redis: nothing of one is found by the other."""
    tokens = list(range(12))
    first = _engine(redis_server.url, b"model-a")
    assert first.store(first.chunks(first.seed(), tokens), torch.arange(1, 13)) == 3
    assert first.stack.flush(10)
    same, other_model = _engine(redis_server.url, b"model-a"), _engine(redis_server.url, b"model-b")
    assert same.hit_length(same.chunks(same.seed(), tokens)) == 12
    assert other_model.hit_length(other_model.chunks(other_model.seed(), tokens)) == 0
    assert same.hit_length(same.chunks(same.seed(cache_salt="tenant-2"), tokens)) == 0
    assert same.load(same.chunks(same.seed(), tokens), 0, torch.arange(20, 32))
    assert same.stats()["loaded_tokens_total"] == {"redis": 12}
    for e in (first, same, other_model):
        e.close(5)


def test_killed_redis_costs_nothing_warns_once_and_heals(redis_server, caplog):
    t = tier(redis_server)
    put(t, 0)
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="lmcache_sgl"):
        started = time.monotonic()
        for _ in range(50):
            assert t.count_present([key(0)]) == 0 and read(t, 0) is None
        assert time.monotonic() - started < TIMEOUT
        t.put(key(1), LAYOUT, owned(1))
        assert t.flush(5)
    assert len([r for r in caplog.records if "redis" in r.getMessage()]) == 1
    assert t.metrics.snapshot()["dropped_writes_total"] == {"redis_down": 1}
    redis_server.start()  # the same address, empty
    deadline = time.monotonic() + redis_module.MAX_BACKOFF_S + 2
    while t.count_present([key(0)]) == 0 and time.monotonic() < deadline:
        put(t, 0)
        time.sleep(0.05)
    assert torch.equal(read(t, 0), payload(0))
    t.close()


def test_paused_redis_costs_a_request_at_most_the_timeout(redis_server):
    """SIGSTOP: connections are accepted, nothing answers. A whole load (lookup, then
    get_many) costs at most one timeout; later ones nothing while the backoff lasts."""
    writer = tier(redis_server)
    put(writer, 0, 1)
    stack = TierStack(CpuTier(4 * LAYOUT.nbytes, LAYOUT.nbytes), [tier(redis_server)])
    redis_server.pause()
    try:
        for _ in range(3):
            started = time.monotonic()
            assert stack.lookup([key(0), key(1)]) == 0
            assert stack.get_many([(key(0), LAYOUT), (key(1), LAYOUT)]) == [None, None]
            assert time.monotonic() - started < 2 * TIMEOUT + 0.2  # connect, then one read, each bounded
    finally:
        redis_server.resume()
    deadline = time.monotonic() + redis_module.MAX_BACKOFF_S + 2
    while stack.lookup([key(0), key(1)]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.lookup([key(0), key(1)]) == 2
    writer.close(), stack.close()


@pytest.mark.parametrize("values, message", [
    ({"remote_url": "http://h:1"}, "'remote_url'"),
    ({"remote_url": "redis://u:hunter2@h:x"}, "'remote_url' = 'redis://u:***@h:x'"),
    ({"remote_url": "redis://a:1,b:2"}, "use redis-cluster"),
    ({"remote_url": "redis-cluster://a"}, "is not host:port"),
    ({"remote_url": "unix://"}, "socket path"),
    ({"remote_url": "redis://h", "remote_serde": "cachegen"}, "'remote_serde'"),
    ({"remote_url": "redis://h", "remote_timeout": 0.0}, "'remote_timeout'"),
    ({"remote_url": "redis://h", "remote_ttl": -1.0}, "'remote_ttl'"),
    ({"remote_url": "redis://h", "remote_key_prefix": "a b"}, "'remote_key_prefix'"),
    ({"remote_url": "redis://h", "remote_hmac_key": ""}, "'remote_hmac_key'"),
    ({"remote_url": "redis://h", "remote_hmac_key": "k", "remote_hmac_key_file": "/f"}, "'remote_hmac_key_file'"),
    ({"remote_url": "redis://h", "remote_hmac_key_file": "/nonexistent"}, "'remote_hmac_key_file'"),
    ({"remote_url": "redis://h", "remote_tls_ca_file": "/etc/hostname"}, "'remote_tls_ca_file'"),
    ({"remote_hmac_key": "secret"}, "'remote_hmac_key' = '<set>'"),
])
def test_config_refuses_bad_remote_keys_naming_them(values, message):
    with pytest.raises(ConfigError) as e:
        LMCacheConfig(**values).validated()
    assert message in str(e.value) and "hunter2" not in str(e.value) and "secret" not in str(e.value)


def test_config_reads_the_secret_from_a_file(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret\n")
    config = LMCacheConfig(remote_url="unix:///tmp/x.sock", remote_hmac_key_file=str(path)).validated()
    assert config.hmac_secret == b"s3cret"
