"""The Redis tier over a real 3-master Redis Cluster on loopback: chunks spread over
every master, one pipeline per master; with a master killed mid-workload its chunks are
misses, nothing raises, and the other masters keep serving reads and writes; a paused
master costs one timeout and serves again once resumed; rediss-cluster:// runs every
master, and the cluster bus, over TLS with client certificates."""

import time

import torch

from lmcache_sgl.storage import CpuTier, TierStack
from lmcache_sgl.storage.redis import RedisTier, TlsFiles
from redis_servers import free_port, redis_factory, start_cluster, tls_client_kwargs  # noqa: F401 (fixture)
from test_redis_auth_tls import pki  # noqa: F401 (fixture)
from test_redis_tier import LAYOUT, TIMEOUT, count_round_trips, key, owned, payload, position, read

N = 30


def test_cluster_spreads_chunks_and_survives_a_dead_master(redis_factory, monkeypatch):
    nodes = start_cluster(3, redis_factory)
    url = "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])  # the third is discovered
    writer = RedisTier(url, timeout_s=TIMEOUT, max_delay_s=0.5)
    for i in range(N):
        writer.put(key(i), LAYOUT, owned(i))
    assert writer.flush(10)
    assert writer.metrics.snapshot()["stored_chunks_total"] == {"redis": N}
    sizes = [n.client().dbsize() for n in nodes]
    assert sum(sizes) == N and all(s > 0 for s in sizes), f"chunks not spread: {sizes}"

    stack = TierStack(CpuTier(2 * N * LAYOUT.nbytes, LAYOUT.nbytes), [RedisTier(url, timeout_s=TIMEOUT)])
    calls = count_round_trips(monkeypatch)
    keys = [key(i) for i in range(N)]
    assert stack.lookup(keys) == N and len(calls) == 3  # one pipelined EXISTS per master

    servers = stack.cold[0]._route.servers()
    assert len(servers) == 3 and all(s.client.get_connection_kwargs()["socket_timeout"] == TIMEOUT for s in servers)
    nodes[1].kill()
    dead = {i for i in range(N) if writer._route.server_of(writer._rkey(key(i))).client.get_connection_kwargs()["port"]
            == nodes[1].port}
    assert 0 < len(dead) < N
    started = time.monotonic()
    hits = stack.get_many([(k, LAYOUT) for k in keys])
    assert time.monotonic() - started < 2 * TIMEOUT + 1
    for i, hit in enumerate(hits):
        if i in dead:
            assert hit is None
        else:
            assert hit is not None and torch.equal(hit.data, payload(i)) and hit.position == position(i)
            stack.release(key(i))
    more = [key(N + i) for i in range(N)]  # writes continue on the live masters
    for i, k in enumerate(more):
        writer.put(k, LAYOUT, owned(N + i))
    assert writer.flush(10)
    snapshot = writer.metrics.snapshot()
    stored, dropped = snapshot["stored_chunks_total"]["redis"] - N, snapshot["dropped_writes_total"]["redis_down"]
    assert stored + dropped == N and stored > 0 and dropped > 0
    reader = RedisTier(url, timeout_s=TIMEOUT)
    alive = [i for i in range(N) if i not in dead]
    assert all(torch.equal(read(reader, i), payload(i)) for i in alive)
    for t in (writer, stack, reader):
        t.close()


def store_all(url: str, **kwargs) -> RedisTier:
    writer = RedisTier(url, timeout_s=TIMEOUT, max_delay_s=0.5, **kwargs)
    for i in range(N):
        writer.put(key(i), LAYOUT, owned(i))
    assert writer.flush(10)
    assert writer.metrics.snapshot()["stored_chunks_total"] == {"redis": N}
    return writer


def on_node(tier: RedisTier, node) -> set[int]:
    return {i for i in range(N) if tier._route.server_of(tier._rkey(key(i))).client.get_connection_kwargs()["port"]
            == node.port}


def test_a_paused_master_costs_one_timeout_and_serves_again_when_resumed(redis_factory):
    nodes = start_cluster(3, redis_factory)
    url = "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    writer = store_all(url)
    stack = TierStack(CpuTier(2 * N * LAYOUT.nbytes, LAYOUT.nbytes), [RedisTier(url, timeout_s=TIMEOUT)])
    keys = [key(i) for i in range(N)]
    assert stack.lookup(keys) == N
    paused = on_node(writer, nodes[2])
    assert 0 < len(paused) < N
    nodes[2].pause()  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        hits = stack.get_many([(k, LAYOUT) for k in keys])
        assert time.monotonic() - started < 2 * TIMEOUT + 0.5
        for i, hit in enumerate(hits):
            assert (hit is None) == (i in paused)
            if hit is not None:
                assert torch.equal(hit.data, payload(i))
                stack.release(key(i))
        started = time.monotonic()  # backing off: its keys cost no wait at all
        assert stack.cold[0].count_present([key(i) for i in sorted(paused)]) == 0
        assert time.monotonic() - started < TIMEOUT / 2
    finally:
        nodes[2].resume()
    first = min(paused)
    deadline = time.monotonic() + 10
    while (got := read(stack.cold[0], first)) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the backoff (0.25 s, doubling) passes
    assert got is not None and torch.equal(got, payload(first))
    writer.close(), stack.close()


def test_a_tls_cluster_with_client_certificates(redis_factory, pki):  # noqa: F811
    files = (str(pki / "ca.crt"), str(pki / "server.crt"), str(pki / "server.key"))
    nodes = start_cluster(3, redis_factory, tls=files)
    url = "rediss-cluster://" + f"127.0.0.1:{nodes[0].port}"  # the others are discovered
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "client.crt"), str(pki / "client.key"))
    writer = store_all(url, tls=tls)
    sizes = [n.client(**tls_client_kwargs(files)).dbsize() for n in nodes]
    assert sum(sizes) == N and all(s > 0 for s in sizes), f"chunks not spread: {sizes}"
    reader = RedisTier(url, timeout_s=TIMEOUT, tls=tls)
    assert reader.count_present([key(i) for i in range(N)]) == N
    assert all(torch.equal(read(reader, i), payload(i)) for i in range(N))
    no_certificate = RedisTier(url, timeout_s=TIMEOUT, tls=TlsFiles(str(pki / "ca.crt")))
    assert no_certificate.count_present([key(0)]) == 0 and read(no_certificate, 0) is None
    for t in (writer, reader, no_certificate):
        t.close()


def test_a_cluster_that_never_answers_is_an_outage_not_an_error():
    """No startup node reachable (nothing listens), or none that accepts our TLS: every
    call is a miss or a dropped write, counted; nothing raises."""
    url = f"redis-cluster://127.0.0.1:{free_port()}"
    t = RedisTier(url, timeout_s=TIMEOUT, max_delay_s=0.2)
    assert t.count_present([key(0), key(1)]) == 0 and read(t, 0) is None
    t.put(key(0), LAYOUT, owned(0))
    assert t.flush(5) and t.metrics.snapshot()["dropped_writes_total"] == {"redis_down": 1}
    assert t.usage() == (0, 0)
    t.clear(), t.close()
