import errno
import os

import pytest
import torch

from lmcache_sgl.codec import ChunkLayout
from lmcache_sgl.storage import CpuTier, DiskTier, TierStack
from lmcache_sgl.storage import disk as disk_module

LAYOUT = ChunkLayout("bytes", "uint8", (1000,))


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (LAYOUT.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def fill_with(i):
    return lambda buf: buf.copy_(payload(i))


def test_cpu_tier_lru_and_capacity():
    evicted = []
    cpu = CpuTier(3 * 1000 + 999, 1000, on_evict=lambda k, l, d: evicted.append((k, d.clone())))
    assert cpu.num_slabs == 3
    for i in range(3):
        assert cpu.store(key(i), LAYOUT, fill_with(i))
    assert not cpu.store(key(0), LAYOUT, fill_with(0))  # present: refreshes LRU
    assert cpu.store(key(3), LAYOUT, fill_with(3))
    assert [k for k, _ in evicted] == [key(1)] and torch.equal(evicted[0][1], payload(1))
    assert sorted(cpu.keys()) == sorted([key(0), key(2), key(3)])


def test_cpu_arena_population_keeps_bytes():
    """Faulting the arena in ahead of use runs concurrently with stores: it must not write."""
    from lmcache_sgl.storage.cpu import _populate

    data = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    arena = torch.empty_like(data)
    arena[: 3 << 20].copy_(data[: 3 << 20])  # some pages written, the rest untouched
    _populate(arena, step=1 << 20)
    arena[3 << 20 :].copy_(data[3 << 20 :])
    assert torch.equal(arena, data)


def test_cpu_tier_pins_block_eviction_and_layout_is_checked():
    cpu = CpuTier(2000, 1000)
    cpu.store(key(0), LAYOUT, fill_with(0))
    cpu.store(key(1), LAYOUT, fill_with(1))
    view0 = cpu.pin(key(0), LAYOUT)
    view1 = cpu.pin(key(1), LAYOUT)
    assert torch.equal(view0, payload(0)) and torch.equal(view1, payload(1))
    assert not cpu.store(key(2), LAYOUT, fill_with(2))  # everything pinned: dropped
    assert cpu.stats.dropped == 1
    cpu.unpin(key(1))
    assert cpu.store(key(2), LAYOUT, fill_with(2)) and key(0) in cpu and key(1) not in cpu
    assert cpu.pin(key(2), ChunkLayout("bytes", "uint8", (999,))) is None
    assert cpu.stats.corrupt == 1
    with pytest.raises(KeyError):
        cpu.unpin(key(2))


def test_cpu_tier_fill_failure_gives_the_slab_back():
    cpu = CpuTier(1000, 1000)

    def boom(buf):
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError):
        cpu.store(key(0), LAYOUT, boom)
    assert key(0) not in cpu and cpu.store(key(1), LAYOUT, fill_with(1))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_disk_tier_roundtrip_restart_and_budget(tmp_path, codec):
    disk = DiskTier(str(tmp_path), capacity_bytes=4000, codec=codec)
    for i in range(6):
        assert disk.put(key(i), LAYOUT, payload(i))
    disk.flush()
    assert disk.used_bytes <= 4000 and 0 < len(disk) < 6
    kept = disk.keys()
    disk.close()
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 4000
    (tmp_path / "stray.tmp").write_bytes(b"half a write")
    again = DiskTier(str(tmp_path), capacity_bytes=4000, codec=codec)
    assert again.keys() == kept and not (tmp_path / "stray.tmp").exists()
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    i = int.from_bytes(kept[-1], "little")
    assert again.get_into(kept[-1], LAYOUT, out) and torch.equal(out, payload(i))
    again.close()


def test_disk_tier_corrupt_file_is_a_miss_and_removed(tmp_path):
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6)
    disk.put(key(1), LAYOUT, payload(1))
    disk.flush()
    path = tmp_path / (key(1).hex() + ".lmsg")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    assert not disk.get_into(key(1), LAYOUT, out)
    assert disk.stats.corrupt == 1 and key(1) not in disk and not path.exists()
    disk.close()


def test_disk_full_is_logged_counted_and_dropped(tmp_path, monkeypatch, caplog):
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6)

    def full(path, parts):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_module, "_write_file", full)
    assert disk.put(key(1), LAYOUT, payload(1))
    disk.flush()
    assert disk.stats.write_errors == 1 and key(1) not in disk and disk.used_bytes == 0
    assert list(tmp_path.iterdir()) == [] and "No space left" in caplog.text
    disk.close()


def test_stack_write_back_demotes_and_promotes(tmp_path):
    stack = TierStack(CpuTier(2000, 1000), DiskTier(str(tmp_path), 10**6))
    keys = [key(i) for i in range(4)]
    for i, k in enumerate(keys):
        assert stack.store(k, LAYOUT, fill_with(i))
    stack.flush()
    assert stack.lookup(keys) == 4 and stack.lookup([key(9)] + keys) == 0
    assert keys[0] not in stack.cpu and keys[0] in stack.disk  # demoted
    data = stack.get(keys[0], LAYOUT)  # promoted back into the CPU tier
    assert data is not None and torch.equal(data, payload(0)) and keys[0] in stack.cpu
    stack.release(keys[0])
    assert stack.stats()["disk"]["hits"] == 1


def test_stack_write_through_and_disk_only(tmp_path):
    stack = TierStack(CpuTier(10**6, 1000), DiskTier(str(tmp_path / "a"), 10**6), write_through=True)
    stack.store(key(1), LAYOUT, fill_with(1))
    stack.flush()
    assert key(1) in stack.cpu and key(1) in stack.disk
    disk_only = TierStack(None, DiskTier(str(tmp_path / "b"), 10**6))
    disk_only.store(key(2), LAYOUT, fill_with(2))
    disk_only.flush()
    data = disk_only.get(key(2), LAYOUT)
    assert data is not None and torch.equal(data, payload(2))
    disk_only.release(key(2))
    assert disk_only.get(key(3), LAYOUT) is None


def test_disk_writes_wait_for_the_gate_unless_flushed(tmp_path):
    import threading
    import time

    gate = threading.Event()
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6, gate=gate, queue_depth=8)
    disk.put(key(1), LAYOUT, payload(1))
    time.sleep(0.3)
    assert key(1) not in disk  # the host is busy: nothing written yet
    gate.set()
    for _ in range(100):
        if key(1) in disk:
            break
        time.sleep(0.02)
    assert key(1) in disk
    gate.clear()
    disk.put(key(2), LAYOUT, payload(2))
    disk.flush()  # a flush does not wait for the gate
    assert key(2) in disk
    for i in range(3, 8):  # half the queue waiting: writes go ahead anyway
        disk.put(key(i), LAYOUT, payload(i))
    disk.flush()
    assert all(key(i) in disk for i in range(3, 8))
    disk.close()
