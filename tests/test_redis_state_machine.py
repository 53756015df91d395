"""A random walk over a TierStack of the CPU tier and a Redis tier (a real redis-server)
against a plain dict: a get returns exactly the stored bytes and position or a miss,
whatever happens to Redis (killed, restarted empty, garbage or another chunk's frame
written under a key); lookup counts a run of present chunks; no chunk stays pinned once
the writer is flushed."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from redis_servers import REDIS_SERVER, RedisServer
from test_tier_state_machine import LAYOUT, key, payload, position

from lmcache_sgl.storage import CpuTier, TierStack
from lmcache_sgl.storage.redis import RedisTier

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
NUM_KEYS = 4  # fewer than the disk walk: a value overwritten in Redis is read back sooner


class RedisStackMachine(RuleBasedStateMachine):
    server: RedisServer  # one redis-server for the whole walk, set by the test

    @initialize(write_through=st.booleans())
    def make_stack(self, write_through):
        self.server.client().flushall()
        self.model: dict[bytes, torch.Tensor] = {}
        self.redis = RedisTier(self.server.url, serde="zstd", timeout_s=0.3)
        self.stack = TierStack(CpuTier(3 * LAYOUT.nbytes, LAYOUT.nbytes), [self.redis], write_through=write_through)

    def teardown(self):
        if hasattr(self, "redis"):
            self.redis.close(timeout=2)
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.restart()

    @rule(i=st.integers(0, NUM_KEYS - 1))
    def store(self, i):
        self.stack.store(key(i), LAYOUT, lambda buf: buf.copy_(payload(i)), position=position(i))
        self.model[key(i)] = payload(i)

    @rule(ids=st.lists(st.integers(0, NUM_KEYS - 1), min_size=1, max_size=4, unique=True))
    def get_many(self, ids):
        hits = self.stack.get_many([(key(i), LAYOUT) for i in ids])
        try:
            for i, hit in zip(ids, hits, strict=True):
                if hit is not None:
                    assert key(i) in self.model, "a chunk that was never stored came back"
                    assert torch.equal(hit.data, self.model[key(i)]), "a get returned other bytes"
                    assert hit.position == position(i), f"a get from {hit.tier} returned another position"
        finally:
            for i, hit in zip(ids, hits, strict=True):
                if hit is not None:
                    self.stack.release(key(i))

    @rule(order=st.permutations(list(range(NUM_KEYS))), n=st.integers(0, NUM_KEYS))
    def lookup(self, order, n):
        keys = [key(i) for i in order[:n]]
        found = self.stack.lookup(keys)
        assert 0 <= found <= len(keys)
        assert all(self.stack.contains(k) or k in self.model for k in keys[:found])

    @rule()
    def evict(self):
        self.stack.hot.evict_lru()

    @rule()
    def drop_the_cpu_tier(self):
        """Every unpinned chunk leaves the CPU tier: later gets must come from Redis."""
        self.stack.hot.clear()

    @rule()
    def flush(self):
        self.stack.flush(timeout=5)
        assert all(e.pins == 0 for e in self.stack.hot._entries.values()), "a written chunk stayed pinned"

    @rule()
    def kill_and_restart_redis(self):
        """Redis dies and comes back empty on the same address."""
        self.server.restart()

    @rule(i=st.integers(0, NUM_KEYS - 1), other=st.integers(0, NUM_KEYS - 1), garbage=st.booleans())
    def overwrite_a_value(self, i, other, garbage):
        """Garbage, or another chunk's stored value, written under chunk i's Redis key."""
        client = self.server.client()
        rkey = self.redis._rkey(key(i))
        value = os.urandom(64) if garbage else client.get(self.redis._rkey(key(other)))
        if value is not None:
            client.set(rkey, value)

    @invariant()
    def cpu_capacity_holds(self):
        if hasattr(self, "stack"):
            cpu = self.stack.hot
            assert len(cpu) <= cpu.num_slabs


RedisStackMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LMCACHE_SGL_SM_EXAMPLES", 200)) // 2,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def shared_redis():
    server = RedisServer()
    yield server
    server.stop()


def test_redis_stack(shared_redis):
    RedisStackMachine.server = shared_redis
    RedisStackMachine.TestCase("runTest").runTest()
