"""CacheEngine: loads and stores never raise, namespaces stay bounded."""

import torch

from lmcache_sgl.config import LMCacheConfig
from lmcache_sgl.engine import MAX_SEEDS, CacheEngine, KVPoolView


def small_engine() -> tuple[CacheEngine, tuple[torch.Tensor, ...]]:
    buffers = tuple(torch.randn(64, 1, 8) for _ in range(2))
    return CacheEngine(LMCacheConfig(chunk_size=4, max_local_cpu_size=0.001), KVPoolView("mha", buffers), b"m"), buffers


def test_engine_load_survives_a_tier_that_raises_midway(tmp_path):
    """A tier raising on the 2nd of 3 chunks: the load returns False, every pin is
    released, the failure is counted; nothing is raised to the caller."""
    engine, buffers = small_engine()
    chunks = engine.chunks(engine.seed(), list(range(12)))
    assert engine.store(chunks, torch.arange(1, 13)) == 3
    hot, real_pin, calls = engine.stack.hot, engine.stack.hot.pin, []

    def pin(k, layout):
        calls.append(k)
        if len(calls) == 2:
            raise RuntimeError("tier broke")
        return real_pin(k, layout)

    hot.pin = pin
    assert not engine.load(chunks, 0, torch.arange(20, 32))
    assert all(e.pins == 0 for e in hot._entries.values())
    assert engine.stats()["failed_loads_total"] == {"miss": 1}
    hot.pin = real_pin
    assert engine.load(chunks, 0, torch.arange(20, 32))
    assert torch.equal(buffers[0][20:32], buffers[0][1:13]) and torch.equal(buffers[1][20:32], buffers[1][1:13])


def test_engine_store_skips_a_chunk_whose_gather_raises():
    engine, _ = small_engine()
    chunks = engine.chunks(engine.seed(), list(range(12)))
    slots = torch.arange(1, 13)
    real_gather, calls = engine._gather, []

    def gather(chunk_slots, buf):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pool broke")
        real_gather(chunk_slots, buf)

    engine._gather = gather
    assert engine.store(chunks, slots) == 2
    assert engine.stats()["dropped_writes_total"] == {"error": 1}
    assert engine.hit_length(chunks) == 4  # the first chunk only: the second is missing


def test_seed_table_is_bounded_and_seeds_stay_stable():
    engine, _ = small_engine()
    first = engine.seed("tenant-0", None)
    for i in range(MAX_SEEDS + 10):
        engine.seed(f"tenant-{i}", "salt")
    assert len(engine._seeds) == MAX_SEEDS
    assert engine.seed("tenant-0", None) == first  # recomputed after eviction: the same digest


def test_protect_that_raises_in_a_later_tier_keeps_nothing(tmp_path):
    from lmcache_sgl.storage import CpuTier, DiskTier, Payload, TierStack
    from lmcache_sgl.codec import ChunkLayout

    layout = ChunkLayout("bytes", "uint8", (100,))
    disk = DiskTier(str(tmp_path), 10**6)
    stack = TierStack(CpuTier(1000, 100), [disk], write_through=False)
    stack.store(b"a" * 16, layout, lambda buf: buf.fill_(1))
    disk.put(b"b" * 16, layout, Payload(torch.ones(100, dtype=torch.uint8), 100))
    disk.flush()

    def broken(keys):
        raise OSError("disk tier broke")

    disk.protect = broken
    assert stack.protect([b"a" * 16, b"b" * 16]) is None
    assert all(e.pins == 0 for e in stack.hot._entries.values())  # the CPU tier's protection was undone
    disk.close()
