"""The CPU tier's two lanes: segments (position-independent KV, reused anywhere) keep
their share of the arena against prefix stores and the prefix lane keeps the rest
against segment stores; in the segment lane, entries never read since they were stored
go before entries that were read."""

import math
import os
from collections import Counter, OrderedDict

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lmcache_sgl.codec import ChunkLayout
from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.metrics import CacheMetrics
from lmcache_sgl.storage import CpuTier, build_stack
from lmcache_sgl.storage.cpu import LANES

LAYOUT = ChunkLayout("bytes", "uint8", (64,))
SLABS = 6
NUM_KEYS = 10


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def fill(buf: torch.Tensor) -> None:
    buf.fill_(1)


def read(cpu: CpuTier, i: int) -> bool:
    """A get: pin (the entry counts as read), then release."""
    if cpu.pin(key(i), LAYOUT) is None:
        return False
    cpu.unpin(key(i))
    return True


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_reused_segments_survive_100_novel_prompts(share):
    """8 segments that fit the segment share, then 100 rounds of one novel prefix chunk
    (stored once, never read again) and reads of 4 of the 8 segments: all 8 are still
    there at the end. Without a share (one LRU), the novel prompts push out the 4 that
    are not read."""
    cpu = CpuTier(16 * LAYOUT.nbytes, LAYOUT.nbytes, segment_share=share)
    segments = list(range(8))
    for i in segments:
        assert cpu.store(key(i), LAYOUT, fill, lane="segment")
    for r in range(100):
        assert cpu.store(key(1000 + r), LAYOUT, fill)
        assert all(read(cpu, i) for i in segments[:4])
    kept = [i for i in segments if key(i) in cpu]
    assert kept == (segments if share else segments[:4])


def test_segments_that_were_read_survive_a_scan_of_segments_used_once():
    cpu = CpuTier(8 * LAYOUT.nbytes, LAYOUT.nbytes, segment_share=0.5)  # 4 slabs for segments
    for i in range(4):
        assert cpu.store(key(i), LAYOUT, fill, lane="segment")
        assert cpu.store(key(50 + i), LAYOUT, fill)  # the prefix lane holds its 4
    assert read(cpu, 1) and read(cpu, 0)
    for i in range(100, 110):  # segments of one long document, never read again
        assert cpu.store(key(i), LAYOUT, fill, lane="segment")
    assert [i for i in (0, 1, 2, 3, *range(100, 110)) if key(i) in cpu] == [0, 1, 108, 109]
    assert all(key(50 + i) in cpu for i in range(4))
    assert [cpu.evict_lru("segment") for _ in range(4)] == [key(108), key(109), key(1), key(0)]


def test_lanes_are_off_without_a_share_and_describe_names_it():
    assert CpuTier(4 * LAYOUT.nbytes, LAYOUT.nbytes).describe() == f"cpu {4 * LAYOUT.nbytes / 2**30:.2f} GB"
    cpu = CpuTier(4 * LAYOUT.nbytes, LAYOUT.nbytes, segment_share=0.5)
    assert cpu.describe().endswith("(2 of 4 slabs kept for segments)")
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="segment_share"):
            CpuTier(4 * LAYOUT.nbytes, LAYOUT.nbytes, segment_share=bad)
    with pytest.raises(ValueError, match="lane"):
        cpu.store(key(0), LAYOUT, fill, lane="document")


@pytest.mark.parametrize("blending, lanes", [(True, " (1 of 4 slabs kept for segments)"), (False, "")])
def test_the_factory_gives_the_segment_share_only_with_blending(blending, lanes):
    config = LMCacheConfig(max_local_cpu_size=4 * LAYOUT.nbytes / 2**30, enable_blending=blending,
                           blend_segment_share=0.25)
    stack = build_stack(config, LAYOUT.nbytes, metrics=CacheMetrics())
    assert stack.describe() == f"cpu {4 * LAYOUT.nbytes / 2**30:.2f} GB{lanes}"


class LaneMachine(RuleBasedStateMachine):
    """Stores, gets (pins that read), protections (pins that do not), releases, evictions
    and clears in both lanes, against a model of which entries are held, in which lane,
    read or not, pinned or not, and in what order they were last used."""

    @initialize(share=st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.5, 0.84]))
    def make_tier(self, share):
        self.evicted: list[bytes] = []
        self.cpu = CpuTier(
            SLABS * LAYOUT.nbytes,
            LAYOUT.nbytes,
            on_evict=lambda k, layout, copy, position: self.evicted.append(k),
            segment_share=share,
        )
        segment = math.floor(share * SLABS)
        self.share = {"prefix": SLABS - segment, "segment": segment}
        self.lane: dict[bytes, str] = {}  # the lane of each entry held
        self.read: dict[bytes, bool] = {}  # read (pinned by a get) since stored
        self.pins: Counter[bytes] = Counter()  # pins this walk holds
        self.recency: OrderedDict[bytes, None] = OrderedDict()  # least recently used first

    def _count(self, lane: str) -> int:
        return sum(1 for held in self.lane.values() if held == lane)

    def _next_victim(self, lane: str) -> bytes | None:
        """The lane's least recently used unpinned entry, one never read first (segments)."""
        free = [k for k in self.recency if self.lane[k] == lane and not self.pins[k]]
        if lane == "segment":
            free.sort(key=lambda k: self.read[k])  # stable: recency within each kind
        return free[0] if free else None

    def _forget(self, k: bytes) -> None:
        del self.lane[k], self.read[k], self.recency[k]

    @rule(i=st.integers(0, NUM_KEYS - 1), lane=st.sampled_from(LANES))
    def store(self, i, lane):
        k = key(i)
        lane = lane if self.share["segment"] else "prefix"  # no lanes without a share
        present, full = k in self.lane, len(self.lane) == SLABS
        counts = {name: self._count(name) for name in LANES}
        other = LANES[1 - LANES.index(lane)]
        order = (lane,) if counts[lane] >= self.share[lane] else (other, lane)
        expected = next((v for v in map(self._next_victim, order) if v is not None), None)
        self.evicted.clear()
        stored = self.cpu.store(k, LAYOUT, fill, lane=lane, position=i)
        if present:
            assert not stored and not self.evicted
            self.recency.move_to_end(k)
            return
        if not full:
            assert stored and not self.evicted
        elif expected is None:
            assert not stored and not self.evicted, "stored although every slab it may take is pinned"
        else:
            assert stored and self.evicted == [expected], f"evicted {self.evicted}, expected {expected}"
            victim_lane = self.lane[expected]
            assert victim_lane == lane or counts[victim_lane] > self.share[victim_lane], (
                f"a {lane} store pushed the {victim_lane} lane below its share"
            )
            if victim_lane == "segment" and self.read[expected]:
                assert not any(
                    self.lane[k2] == "segment" and not self.read[k2] and not self.pins[k2] for k2 in self.lane
                ), "a segment that was read went before one never read"
            self._forget(expected)
        if stored:
            self.lane[k], self.read[k] = lane, False
            self.recency[k] = None

    @rule(i=st.integers(0, NUM_KEYS - 1))
    def get(self, i):
        k = key(i)
        view = self.cpu.pin(k, LAYOUT)
        assert (view is not None) == (k in self.lane)
        if view is not None:
            assert self.cpu.position(k) == i
            self.pins[k] += 1
            self.read[k] = True
            self.recency.move_to_end(k)

    @rule(i=st.integers(0, NUM_KEYS - 1))
    def protect(self, i):
        held = self.cpu.protect([key(i)])
        assert held.keys == ((key(i),) if key(i) in self.lane else ())
        self.pins.update(held.keys)

    @rule(i=st.integers(0, NUM_KEYS - 1))
    def release(self, i):
        if self.pins[key(i)]:
            self.cpu.unpin(key(i))
            self.pins[key(i)] -= 1

    @rule(lane=st.sampled_from(LANES))
    def evict(self, lane):
        lane = lane if self.share["segment"] else "prefix"
        expected = self._next_victim(lane)
        self.evicted.clear()
        assert self.cpu.evict_lru(lane) == expected
        assert self.evicted == ([] if expected is None else [expected])
        if expected is not None:
            self._forget(expected)

    @rule()
    def clear(self):
        self.cpu.clear()
        for k in [k for k in self.lane if not self.pins[k]]:
            self._forget(k)

    @invariant()
    def the_tier_holds_what_the_model_holds(self):
        entries = self.cpu._entries
        assert {k: e.lane for k, e in entries.items()} == self.lane
        assert all(entries[k].pins == self.pins[k] for k in entries)
        assert self.cpu._slabs == {lane: self._count(lane) for lane in LANES}
        assert len(self.cpu) <= SLABS


LaneMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LMCACHE_SGL_SM_EXAMPLES", 200)), stateful_step_count=60, deadline=None
)
test_cpu_lanes = LaneMachine.TestCase


def test_engine_store_records_each_chunks_start_in_its_lane():
    from lmcache_sgl.engine import CacheEngine, KVPoolView

    config = LMCacheConfig(chunk_size=4, max_local_cpu_size=0.001, enable_blending=True, blend_segment_share=0.5)
    engine = CacheEngine(config, KVPoolView("mha", tuple(torch.randn(64, 1, 8) for _ in range(2))), b"m")
    chunks = engine.chunks(engine.seed(), list(range(12)))
    assert engine.store(chunks[:2], torch.arange(1, 13)) == 2
    assert engine.store(chunks[2:], torch.arange(1, 13), lane="segment") == 1
    entries = engine.stack.hot._entries
    assert [(entries[c.key].position, entries[c.key].lane) for c in chunks] == [
        (0, "prefix"), (4, "prefix"), (8, "segment")
    ]
    hit = engine.stack.get(chunks[2].key, engine.pool.layout(4))
    assert hit is not None and hit.position == 8
    engine.stack.release(chunks[2].key)
    engine.close()
