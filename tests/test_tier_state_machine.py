"""A random walk over the TierStack against a plain dict, checking the contracts:
a get returns exactly the stored bytes and position or a miss, from whichever tier and
lane (write-through, demotion, promotion); no tier exceeds its capacity; lookup counts a
contiguous run of present chunks; a disk restart finds every intact entry."""

import errno
import os
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lmcache_sgl.codec import ChunkLayout
from lmcache_sgl.storage import CpuTier, DiskTier, TierStack
from lmcache_sgl.storage import disk as disk_module
from lmcache_sgl.storage.cpu import LANES

LAYOUT = ChunkLayout("mha", "bfloat16", (2, 1, 4, 1, 16))
NUM_KEYS = 8
DISK_CAPACITY = 1400


def key(i: int) -> bytes:
    return bytes([i]) * 16


def position(i: int) -> int:
    """Chunk i's position when its KV was computed: beyond 32 bits, one per chunk."""
    return (i + 1) << 40 | i


def payload(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(LAYOUT.shape, generator=g).to(torch.bfloat16).reshape(-1).view(torch.uint8).clone()


def _disk_full(path, parts):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class TierStackMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lmcsgl-sm-")
        self.model: dict[bytes, torch.Tensor] = {}
        self.damaged: set[bytes] = set()
        self.real_write = disk_module._write_file

    @initialize(write_through=st.booleans(), segment_share=st.sampled_from([0.0, 0.34]))
    def make_stack(self, write_through, segment_share):
        self.write_through = write_through
        cpu = CpuTier(3 * LAYOUT.nbytes, LAYOUT.nbytes, segment_share=segment_share)
        self.stack = TierStack(cpu, [self._disk()], write_through=write_through)

    def _disk(self) -> DiskTier:
        return DiskTier(self.dir, DISK_CAPACITY, codec="zstd", max_queue_bytes=4 * LAYOUT.nbytes)

    @property
    def disk(self) -> DiskTier:
        return self.stack.cold[0]

    def teardown(self):
        disk_module._write_file = self.real_write
        if hasattr(self, "stack"):
            self.disk.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(i=st.integers(0, NUM_KEYS - 1), lane=st.sampled_from(LANES))
    def store(self, i, lane):
        self.stack.store(key(i), LAYOUT, lambda buf: buf.copy_(payload(i)), position=position(i), lane=lane)
        self.model[key(i)] = payload(i)

    @rule(i=st.integers(0, NUM_KEYS - 1), lane=st.sampled_from(LANES))
    def get(self, i, lane):
        hit = self.stack.get(key(i), LAYOUT, lane=lane)
        if hit is None:
            return
        data = hit.data
        try:
            assert key(i) in self.model, "a chunk that was never stored came back"
            assert torch.equal(data, self.model[key(i)]), "a get returned other bytes"
            assert hit.position == position(i), f"a get from {hit.tier} returned another position"
        finally:
            self.stack.release(key(i))

    @rule(ids=st.lists(st.integers(0, NUM_KEYS - 1), min_size=2, max_size=5, unique=True), lane=st.sampled_from(LANES))
    def get_many(self, ids, lane):
        hits = self.stack.get_many([(key(i), LAYOUT) for i in ids], lane=lane)
        try:
            for i, hit in zip(ids, hits):
                assert hit is None or torch.equal(hit.data, self.model[key(i)]), "get_many returned other bytes"
                assert hit is None or hit.position == position(i), "get_many returned another position"
        finally:
            for i, hit in zip(ids, hits):
                if hit is not None:
                    self.stack.release(key(i))

    @rule(order=st.permutations(list(range(NUM_KEYS))), n=st.integers(0, NUM_KEYS))
    def lookup(self, order, n):
        keys = [key(i) for i in order[:n]]
        found = self.stack.lookup(keys)
        assert all(self.stack.contains(k) for k in keys[:found])
        # A chunk still queued for the disk is contained (not stored twice) but not yet present.
        assert found == len(keys) or not any(t.count_present(keys[found : found + 1]) for t in self.stack.tiers)

    @rule(lane=st.sampled_from(LANES))
    def evict(self, lane):
        self.stack.hot.evict_lru(lane)

    @rule()
    def flush(self):
        self.stack.flush()
        assert all(e.pins == 0 for e in self.stack.hot._entries.values()), "a written chunk stayed pinned"
        files = [f for f in os.listdir(self.dir) if f.endswith(".lmsg")]
        assert sum(os.path.getsize(os.path.join(self.dir, f)) for f in files) <= DISK_CAPACITY

    @rule()
    def restart_disk_tier(self):
        old = self.disk
        old.close()
        intact = set(old.keys()) - self.damaged
        self.stack = TierStack(self.stack.hot, [self._disk()], write_through=self.write_through)
        assert intact <= set(self.disk.keys()), "an intact disk entry was lost in a restart"
        out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
        for k in intact:
            assert self.disk.get_into(k, LAYOUT, out) == position(k[0]) and torch.equal(out, self.model[k])

    def _some_file(self, i):
        keys = self.disk.keys()
        return (keys[i % len(keys)], os.path.join(self.dir, keys[i % len(keys)].hex() + ".lmsg")) if keys else (None, None)

    # The writer may evict a file at any moment: damage it in place, never re-create it
    # (a re-created file would be one the tier no longer counts).
    @rule(i=st.integers(0, 100), pos=st.integers(0, 10_000))
    def corrupt_a_file(self, i, pos):
        k, path = self._some_file(i)
        if k is None:
            return
        try:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if not size:
                    return
                f.seek(pos % size)
                byte = f.read(1)[0]
                f.seek(pos % size)
                f.write(bytes([byte ^ 0x40]))
        except FileNotFoundError:  # just evicted
            return
        self.damaged.add(k)

    @rule(i=st.integers(0, 100), cut=st.integers(0, 10_000))
    def truncate_a_file(self, i, cut):
        k, path = self._some_file(i)
        if k is None:
            return
        try:
            with open(path, "r+b") as f:
                f.truncate(cut % max(os.fstat(f.fileno()).st_size, 1))
        except FileNotFoundError:
            return
        self.damaged.add(k)

    @rule(full=st.booleans())
    def disk_full(self, full):
        disk_module._write_file = _disk_full if full else self.real_write

    @invariant()
    def capacities_hold(self):
        cpu, disk = self.stack.hot, self.disk
        assert len(cpu) <= cpu.num_slabs and cpu.used_bytes <= cpu.capacity_bytes
        assert disk.used_bytes <= DISK_CAPACITY


TierStackMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LMCACHE_SGL_SM_EXAMPLES", 200)),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_tier_stack = TierStackMachine.TestCase
