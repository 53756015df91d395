"""The Redis tier over a real 3-master Redis Cluster on loopback: chunks spread over
every master, one pipeline per master; with a master killed mid-workload its chunks are
misses, nothing raises, and the other masters keep serving reads and writes."""

import time

import torch

from lmcache_sgl.storage import CpuTier, TierStack
from lmcache_sgl.storage.redis import RedisTier
from redis_servers import redis_factory, start_cluster  # noqa: F401 (fixture)
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
