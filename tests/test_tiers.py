import errno
import gc
import os
import stat
import threading
import time
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl.codec import ChunkLayout
from lmcache_sgl.storage import AsyncWriter, CpuTier, DiskDirectoryError, DiskTier, IdleSignal, Payload, TierStack
from lmcache_sgl.storage import disk as disk_module
from test_codec import version_2_frame

LAYOUT = ChunkLayout("bytes", "uint8", (1000,))


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (LAYOUT.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def fill_with(i):
    return lambda buf: buf.copy_(payload(i))


def test_cpu_tier_lru_and_capacity():
    evicted = []
    cpu = CpuTier(3 * 1000 + 999, 1000, on_evict=lambda k, l, d, p: evicted.append((k, d.clone())))
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
    _populate(lambda: arena)
    arena[3 << 20 :].copy_(data[3 << 20 :])
    assert torch.equal(arena, data)


def test_cpu_arena_is_populated_one_huge_page_per_call(monkeypatch):
    """Long MADV_POPULATE_WRITE calls stalled the process's other threads (a disk load of
    64 MiB took 0.2-0.8 s instead of ~40 ms): the arena is asked for huge pages, then
    populated in calls that each end at the next 2 MiB boundary and together cover it."""
    from lmcache_sgl.storage import cpu as cpu_module

    calls: list[tuple[int, int, int]] = []

    class Libc:
        def madvise(self, addr, length, advice):
            calls.append((addr.value, length.value, advice))
            return 0

    monkeypatch.setattr(cpu_module.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    arena = torch.empty((9 << 20) + 12345, dtype=torch.uint8)
    cpu_module._populate(lambda: arena)
    page, huge = os.sysconf("SC_PAGE_SIZE"), 2 << 20
    start = -(-arena.data_ptr() // page) * page
    end = (arena.data_ptr() + arena.numel()) // page * page
    assert calls[0] == (start, end - start, 14)  # MADV_HUGEPAGE over the whole arena
    populated = calls[1:]
    assert all(advice == 23 for _, _, advice in populated)  # MADV_POPULATE_WRITE
    assert populated[0][0] == start and sum(n for _, n, _ in populated) == end - start
    assert all(a + n == b for (a, n, _), (b, _, _) in zip(populated, populated[1:]))  # in order, no gaps
    assert all(a // huge == (a + n - 1) // huge for a, n, _ in populated)  # none crosses a huge page


def tier_and_its_populate(idle: IdleSignal) -> tuple[CpuTier, threading.Thread]:
    """An 8 MiB CpuTier populated while `idle` is set, and its populate thread."""
    before = set(threading.enumerate())
    tier = CpuTier(8 << 20, 1 << 20, idle=idle)
    (populate,) = [t for t in threading.enumerate() if t not in before and t.name == "lmcsgl-cpu-populate"]
    return tier, populate


def test_cpu_arena_is_populated_only_while_the_server_is_idle(monkeypatch):
    """Faulting in a 2 GiB arena took a core for 3 s right after start, and a restarted
    server's first requests ran 4 times slower beside it: with an IdleSignal, no page is
    populated while it is clear, and the rest once it is set."""
    from lmcache_sgl.storage import cpu as cpu_module

    calls: list[int] = []

    class Libc:
        def madvise(self, addr, length, advice):
            calls.append(advice)
            return 0

    monkeypatch.setattr(cpu_module.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    idle = IdleSignal()
    tier, populate = tier_and_its_populate(idle)  # the tier stays alive: a dropped one's populate stops
    populate.join(timeout=0.5)
    assert populate.is_alive() and calls == [14]  # huge pages asked for, nothing populated
    idle.set()
    populate.join(timeout=10)
    assert not populate.is_alive() and calls[0] == 14 and len(calls) >= 5 and set(calls[1:]) == {23}


def test_a_cpu_tier_dropped_before_the_server_idles_frees_its_arena_and_populate(monkeypatch):
    """A populate waiting for idle time must not keep its arena alive: an engine that is
    closed before its server ever idles (or never runs in one) frees its memory, and the
    thread ends."""
    from lmcache_sgl.storage import cpu as cpu_module

    monkeypatch.setattr(cpu_module, "_IDLE_POLL_S", 0.01)
    tier, populate = tier_and_its_populate(IdleSignal())
    arena = weakref.ref(tier._arena)
    del tier
    gc.collect()
    assert arena() is None
    populate.join(timeout=5)
    assert not populate.is_alive()


def test_cpu_arena_is_faulted_in_at_the_creators_priority(monkeypatch):
    """The populate thread holds the memory-map lock in each call: niced, it was
    descheduled holding it and stalled every allocation of the process's other threads."""
    from lmcache_sgl.storage import cpu as cpu_module

    seen: list[int] = []
    monkeypatch.setattr(
        cpu_module,
        "_populate",
        lambda arena, idle: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
    )
    CpuTier(4 << 20, 1 << 20)
    populate = next((t for t in threading.enumerate() if t.name == "lmcsgl-cpu-populate"), None)
    if populate is not None:
        populate.join(timeout=10)
    assert seen == [os.getpriority(os.PRIO_PROCESS, threading.get_native_id())]


def test_cpu_tier_pins_block_eviction_and_layout_is_checked():
    cpu = CpuTier(2000, 1000)
    cpu.store(key(0), LAYOUT, fill_with(0))
    cpu.store(key(1), LAYOUT, fill_with(1))
    view0 = cpu.pin(key(0), LAYOUT)
    view1 = cpu.pin(key(1), LAYOUT)
    assert torch.equal(view0, payload(0)) and torch.equal(view1, payload(1))
    assert not cpu.store(key(2), LAYOUT, fill_with(2))  # everything pinned: no room
    cpu.unpin(key(1))
    assert cpu.store(key(2), LAYOUT, fill_with(2)) and key(0) in cpu and key(1) not in cpu
    assert cpu.pin(key(2), ChunkLayout("bytes", "uint8", (999,))) is None
    assert cpu.metrics.snapshot()["corrupt_frames_total"] == {"cpu": 1}
    with pytest.raises(KeyError):
        cpu.unpin(key(2))


def test_cpu_tier_fill_failure_gives_the_slab_back():
    cpu = CpuTier(1000, 1000)

    def boom(buf):
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError):
        cpu.store(key(0), LAYOUT, boom)
    assert key(0) not in cpu and cpu.store(key(1), LAYOUT, fill_with(1))


def owned(i: int, position: int = 0) -> Payload:
    data = payload(i)
    return Payload(data, data.numel(), position=position)


def test_cpu_tier_keeps_each_entrys_position_for_pins_lends_and_evictions():
    evicted = []
    cpu = CpuTier(2000, 1000, on_evict=lambda k, layout, copy, position: evicted.append((k, position)))
    assert cpu.store(key(0), LAYOUT, fill_with(0), position=2**63 + 5, pins=1)
    assert cpu.store(key(1), LAYOUT, fill_with(1))
    lent = cpu.lent(key(0))
    assert lent.position == 2**63 + 5 and torch.equal(lent.tensor, payload(0))
    assert not cpu.store(key(0), LAYOUT, fill_with(0), position=7)  # present: its position stays
    assert cpu.pin(key(0), LAYOUT) is not None and cpu.position(key(0)) == 2**63 + 5
    assert cpu.position(key(1)) == 0
    cpu.unpin(key(0))
    lent.release()
    cpu.evict_lru()
    cpu.evict_lru()
    assert evicted == [(key(1), 0), (key(0), 2**63 + 5)]


def wait_until(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_disk_tier_roundtrip_restart_and_budget(tmp_path, codec):
    disk = DiskTier(str(tmp_path), capacity_bytes=4000, codec=codec)
    for i in range(6):
        assert disk.put(key(i), LAYOUT, owned(i))
    disk.flush()
    assert disk.used_bytes <= 4000 and 0 < len(disk) < 6
    kept = disk.keys()
    disk.close()
    assert sum(f.stat().st_size for f in tmp_path.glob("*.lmsg")) <= 4000
    own_temp = tmp_path / (key(9).hex() + ".lmsg.1234.tmp")
    own_temp.write_bytes(b"half a write")
    foreign = tmp_path / "notes.tmp"
    foreign.write_bytes(b"not ours")
    again = DiskTier(str(tmp_path), capacity_bytes=4000, codec=codec)
    assert again.keys() == kept and not own_temp.exists() and foreign.exists()
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    i = int.from_bytes(kept[-1], "little")
    assert again.get_into(kept[-1], LAYOUT, out) == 0 and torch.equal(out, payload(i))
    again.close()


def test_disk_tier_keeps_positions_across_a_restart(tmp_path):
    disk = DiskTier(str(tmp_path), 10**6)
    for i in range(3):
        assert disk.put(key(i), LAYOUT, owned(i, position=1000 * i + 2**40))
    disk.close()
    again = DiskTier(str(tmp_path), 10**6)
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    for i in range(3):
        assert again.get_into(key(i), LAYOUT, out) == 1000 * i + 2**40 and torch.equal(out, payload(i))
    assert again.get_into(key(9), LAYOUT, out) is None
    again.close()


def test_disk_tier_refuses_a_version_2_frame_as_a_counted_miss(tmp_path):
    """A frame written before the upgrade to version 3 is found at start, then dropped
    and counted when read; the chunk can be stored again."""
    DiskTier(str(tmp_path), 10**6).close()
    old = tmp_path / (key(1).hex() + ".lmsg")
    old.write_bytes(version_2_frame(key(1), LAYOUT, payload(1)))
    old.chmod(0o600)
    disk = DiskTier(str(tmp_path), 10**6)
    assert disk.count_present([key(1)]) == 1
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    assert disk.get_into(key(1), LAYOUT, out) is None
    assert disk.metrics.snapshot()["corrupt_frames_total"] == {"disk": 1}
    assert key(1) not in disk and not old.exists()
    assert disk.put(key(1), LAYOUT, owned(1, position=3)) and disk.flush(10)
    assert disk.get_into(key(1), LAYOUT, out) == 3 and torch.equal(out, payload(1))
    disk.close()


def test_disk_tier_corrupt_file_is_a_miss_and_removed(tmp_path):
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6)
    disk.put(key(1), LAYOUT, owned(1))
    disk.flush()
    path = tmp_path / (key(1).hex() + ".lmsg")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    assert not disk.get_into(key(1), LAYOUT, out)
    assert disk.metrics.snapshot()["corrupt_frames_total"] == {"disk": 1}
    assert key(1) not in disk and not path.exists()
    disk.close()


def test_disk_full_below_the_budget_evicts_own_files_and_retries(tmp_path, monkeypatch, caplog):
    """ENOSPC with room left in the budget: the tier evicts its least recently used files
    and retries; when nothing helps, the chunk is dropped and logged once, with a count."""
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6, codec="raw")
    for i in range(3):
        disk.put(key(i), LAYOUT, owned(i))
    disk.flush()
    real_write, room = disk_module._write_file, [1]  # the device takes one more file after each eviction

    def small_device(path, parts):
        if len(list(tmp_path.glob("*.lmsg"))) >= 3 and room[0] == 0:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] = 0
        real_write(path, parts)

    monkeypatch.setattr(disk_module, "_write_file", small_device)
    room[0] = 0
    assert disk.put(key(3), LAYOUT, owned(3))
    disk.flush()
    assert key(3) in disk.keys() and key(0) not in disk.keys()  # the oldest file made room
    assert disk.metrics.snapshot()["dropped_writes_total"] == {}

    def full(path, parts):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_module, "_write_file", full)
    caplog.clear()
    for i in range(10, 20):
        disk.put(key(i), LAYOUT, owned(i))
    disk.flush()
    assert disk.metrics.snapshot()["dropped_writes_total"] == {"disk_full": 10}
    assert caplog.text.count("No space left") == 1
    assert disk.used_bytes == sum(f.stat().st_size for f in tmp_path.glob("*.lmsg")) == 0
    assert not list(tmp_path.glob("*.tmp"))
    disk.close()


def test_stack_write_back_demotes_and_promotes(tmp_path):
    stack = TierStack(CpuTier(2000, 1000), [DiskTier(str(tmp_path), 10**6)], write_through=False)
    keys = [key(i) for i in range(4)]
    for i, k in enumerate(keys):
        assert stack.store(k, LAYOUT, fill_with(i))
    stack.flush()
    assert stack.lookup(keys) == 4 and stack.lookup([key(9)] + keys) == 0
    assert stack.lookup_tiers(keys) == ["disk", "disk", "cpu", "cpu"]
    assert keys[0] not in stack.hot and keys[0] in stack.cold[0]  # demoted
    hit = stack.get(keys[0], LAYOUT)  # promoted back into the CPU tier
    assert hit is not None and hit.tier == "disk" and torch.equal(hit.data, payload(0)) and keys[0] in stack.hot
    stack.release(keys[0])
    assert stack.metrics.snapshot()["load_bytes_total"] == {"disk": LAYOUT.nbytes}


def test_get_many_pins_its_cpu_chunks_before_promoting_others(tmp_path):
    """A load of chunks from the CPU tier and from the disk: promoting the disk ones must not
    evict the CPU one it is about to use (write_back: an evicted chunk is only queued for
    the disk, so it would be a miss). The CPU tier has room for one promotion; the other
    disk chunk is read into a buffer of its own. Repeated: the readers' timing varies."""
    for attempt in range(10):
        disk = DiskTier(str(tmp_path / str(attempt)), 10**6)
        stack = TierStack(CpuTier(2000, 1000), [disk], write_through=False)
        for i in (1, 2):  # on the disk only
            disk.put(key(i), LAYOUT, Payload(payload(i), 0))
        disk.flush()
        assert stack.store(key(0), LAYOUT, fill_with(0))  # in the CPU tier only
        hits = stack.get_many([(key(1), LAYOUT), (key(2), LAYOUT), (key(0), LAYOUT)])
        assert [h.tier if h else None for h in hits] == ["disk", "disk", "cpu"]
        assert all(torch.equal(h.data, payload(i)) for h, i in zip(hits, (1, 2, 0)))
        for i in (1, 2, 0):
            stack.release(key(i))
        stack.close()


@pytest.mark.parametrize("write_through", [True, False])
def test_positions_survive_write_through_demotion_and_promotion(tmp_path, write_through):
    """Each chunk's position comes back from whichever tier answers: the CPU tier, the
    disk (written through, or demoted by an eviction), the CPU tier again after promotion."""
    disk = DiskTier(str(tmp_path), 10**6)
    stack = TierStack(CpuTier(2000, 1000), [disk], write_through=write_through)
    at = {i: 17 * i + 2**33 for i in range(4)}
    for i in range(4):
        assert stack.store(key(i), LAYOUT, fill_with(i), position=at[i]) and stack.flush(10)  # written: unpinned
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    on_disk = [0, 1, 2, 3] if write_through else [0, 1]  # the first two were demoted
    assert all(disk.get_into(key(i), LAYOUT, out) == at[i] for i in on_disk)
    for i, tier in ((3, "cpu"), (0, "disk"), (0, "cpu")):  # 0 is promoted from the disk, then a CPU hit
        hit = stack.get(key(i), LAYOUT)
        assert hit is not None and (hit.tier, hit.position) == (tier, at[i]) and torch.equal(hit.data, payload(i))
        stack.release(key(i))
    stack.close()


def test_positions_without_room_in_the_cpu_tier_or_without_one(tmp_path):
    """No room in the CPU tier (its one slab pinned): the copy for the disk keeps the
    position; a stack without a CPU tier hands out the disk's position."""
    stack = TierStack(CpuTier(1000, 1000), [DiskTier(str(tmp_path / "a"), 10**6)], write_through=True)
    assert stack.store(key(0), LAYOUT, fill_with(0), position=5)
    held = stack.get(key(0), LAYOUT)
    assert held is not None and held.position == 5
    assert stack.store(key(1), LAYOUT, fill_with(1), position=6) and key(1) not in stack.hot
    assert stack.flush(10)
    hit = stack.get(key(1), LAYOUT)  # no room to promote either: a scratch copy
    assert hit is not None and (hit.tier, hit.position) == ("disk", 6) and torch.equal(hit.data, payload(1))
    stack.release(key(1)), stack.release(key(0))
    stack.close()
    disk_only = TierStack(None, [DiskTier(str(tmp_path / "b"), 10**6)])
    assert disk_only.store(key(2), LAYOUT, fill_with(2), position=2**64 - 1) and disk_only.flush(10)
    hit = disk_only.get(key(2), LAYOUT)
    assert hit is not None and hit.position == 2**64 - 1
    disk_only.release(key(2))
    disk_only.close()


def test_stack_write_through_and_disk_only(tmp_path):
    stack = TierStack(CpuTier(10**6, 1000), [DiskTier(str(tmp_path / "a"), 10**6)], write_through=True)
    stack.store(key(1), LAYOUT, fill_with(1))
    stack.flush()
    assert key(1) in stack.hot and key(1) in stack.cold[0].keys()
    disk_only = TierStack(None, [DiskTier(str(tmp_path / "b"), 10**6)])
    disk_only.store(key(2), LAYOUT, fill_with(2))
    disk_only.flush()
    hit = disk_only.get(key(2), LAYOUT)
    assert hit is not None and torch.equal(hit.data, payload(2))
    disk_only.release(key(2))
    assert disk_only.get(key(3), LAYOUT) is None


def test_write_through_never_drops_a_chunk_the_cpu_tier_would_evict(tmp_path):
    """More chunks than the CPU tier holds, stored while the server is busy: every one
    reaches the disk (the writer's borrowed copy stays pinned until it is written)."""
    idle = IdleSignal()
    disk = DiskTier(str(tmp_path), 10**6, idle=idle, max_delay_s=60)
    stack = TierStack(CpuTier(2000, 1000), [disk], write_through=True)
    for i in range(6):
        assert stack.store(key(i), LAYOUT, fill_with(i))
    assert disk.keys() == []  # busy: nothing written yet
    idle.set()
    assert stack.flush(timeout=10)
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    for i in range(6):
        assert disk.get_into(key(i), LAYOUT, out) == 0 and torch.equal(out, payload(i))
    assert all(e.pins == 0 for e in stack.hot._entries.values())
    assert stack.metrics.snapshot()["dropped_writes_total"] == {}
    disk.close()


def test_writes_wait_for_idle_but_not_longer_than_the_delay(tmp_path):
    idle = IdleSignal()
    disk = DiskTier(str(tmp_path), capacity_bytes=10**6, idle=idle, max_delay_s=1.0)
    disk.put(key(1), LAYOUT, owned(1))
    time.sleep(0.3)
    assert key(1) not in disk.keys()  # busy, and the delay has not run out
    idle.set()
    assert wait_until(lambda: key(1) in disk.keys())
    idle.clear()
    started = time.monotonic()
    disk.put(key(2), LAYOUT, owned(2))
    assert wait_until(lambda: key(2) in disk.keys())  # busy throughout: written once overdue
    assert time.monotonic() - started >= 0.9
    disk.put(key(3), LAYOUT, owned(3))
    assert disk.flush(timeout=5)  # a flush does not wait for idleness
    assert key(3) in disk.keys()
    disk.close()


def test_requests_shorter_than_the_writers_poll_still_keep_writes_back():
    """Back-to-back requests of a few ms each leave the server idle between them only for
    moments: that is not idleness, however the writer's looks fall, so nothing is written
    until the server stays idle for IDLE_SETTLE_S (or the chunk is overdue)."""
    written: list[bytes] = []
    idle = IdleSignal()
    writer = AsyncWriter(lambda items: written.extend(k for k, _, _ in items), name="test", max_bytes=10**6,
                         max_delay_s=30, idle=idle)
    data = torch.zeros(16, dtype=torch.uint8)
    assert writer.submit(key(1), ChunkLayout("bytes", "uint8", (16,)), Payload(data, 16))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a request every 20 ms, each busy for 3 ms
        idle.clear()
        time.sleep(0.003)
        idle.set()
        time.sleep(0.017)
    assert written == []
    assert wait_until(lambda: written == [key(1)])  # now idle for good
    assert writer.close(timeout=5)


def test_writer_threads_run_at_the_creators_priority():
    """A niced writer, descheduled while it held the GIL or a tier's lock, stalled the
    scheduler's loads for tens of milliseconds."""
    seen: list[int] = []

    def sink(items):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    writer = AsyncWriter(sink, name="test", max_bytes=10**6, max_delay_s=10)
    data = torch.zeros(16, dtype=torch.uint8)
    assert writer.submit(key(1), ChunkLayout("bytes", "uint8", (16,)), Payload(data, 16))
    assert writer.close(timeout=5)
    assert seen == [os.getpriority(os.PRIO_PROCESS, threading.get_native_id())]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=12), budget=st.integers(4, 8))
def test_writer_queue_never_holds_more_copies_than_its_budget(sizes, budget):
    """Copies wait for room: queued bytes never exceed the budget, and every chunk is
    written once room is made."""
    unit = 1000
    written, peak, lock = [], [0], threading.Lock()
    writer = None

    def sink(items):
        for k, _, _ in items:
            with lock:
                peak[0] = max(peak[0], writer.queued_bytes)
            time.sleep(0.002)
            written.append(k)

    writer = AsyncWriter(sink, name="test", max_bytes=budget * unit, max_delay_s=10, idle=IdleSignal())
    for i, n in enumerate(sizes):
        data = torch.zeros(n * unit, dtype=torch.uint8)
        assert writer.submit(key(i), ChunkLayout("bytes", "uint8", (n * unit,)), Payload(data, data.numel()))
        assert writer.queued_bytes <= budget * unit
    assert writer.close(timeout=10)
    assert sorted(written) == sorted(key(i) for i in range(len(sizes))) and peak[0] <= budget * unit


def test_close_writes_what_is_queued(tmp_path):
    idle = IdleSignal()  # never set: only the shutdown flush writes
    disk = DiskTier(str(tmp_path), 10**6, idle=idle, max_delay_s=60)
    for i in range(8):
        disk.put(key(i), LAYOUT, owned(i))
    assert disk.close(timeout=10)
    again = DiskTier(str(tmp_path), 10**6)
    assert sorted(again.keys()) == sorted(key(i) for i in range(8))
    again.close()


# ---- the directory is the user's alone -------------------------------------------
def test_disk_directory_and_files_are_private(tmp_path):
    path = tmp_path / "cache"
    disk = DiskTier(str(path), 10**6)
    disk.put(key(1), LAYOUT, owned(1))
    disk.flush()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / (key(1).hex() + ".lmsg")).stat().st_mode) == 0o600
    disk.close()


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o722])
def test_disk_directory_writable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(DiskDirectoryError, match="writable by group or others"):
        DiskTier(str(path), 10**6)


def test_disk_directory_of_another_user_or_a_symlink_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, os.geteuid() + 1, -1) if os.geteuid() == 0 else pytest.skip("needs root to chown")
    with pytest.raises(DiskDirectoryError, match="another user"):
        DiskTier(str(theirs), 10**6)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(DiskDirectoryError, match="not a directory"):
        DiskTier(str(tmp_path / "link"), 10**6)


def test_second_live_owner_of_a_directory_is_refused(tmp_path):
    disk = DiskTier(str(tmp_path), 10**6)
    with pytest.raises(DiskDirectoryError, match="in use by another live process"):
        DiskTier(str(tmp_path), 10**6)
    disk.close()
    DiskTier(str(tmp_path), 10**6).close()  # the lock dies with its owner


def test_reading_asks_read_ahead_of_every_wanted_frame_and_skips_what_it_cannot_open(tmp_path, monkeypatch):
    """reading() advises WILLNEED once per wanted, indexed, regular frame file; a key not
    held, a vanished file and a planted FIFO are skipped without raising or blocking, and
    the frames still read as before."""
    disk = DiskTier(str(tmp_path / "d"), 10**6)
    for i in range(4):
        disk.put(key(i), LAYOUT, owned(i))
    disk.flush()
    os.unlink(disk._file(key(2)))
    os.unlink(disk._file(key(3)))
    os.mkfifo(disk._file(key(3)))
    advised = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    with disk.reading([key(i) for i in range(6)]):
        assert sorted(advised) == sorted((disk._file(key(i)), 0, 0, os.POSIX_FADV_WILLNEED) for i in (0, 1))
        out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
        for i in (0, 1):
            assert disk.get_into(key(i), LAYOUT, out) == 0 and torch.equal(out, payload(i))
        assert disk.get_into(key(2), LAYOUT, out) is None
    disk.close()


def test_planted_fifo_and_symlink_are_never_read(tmp_path):
    """A FIFO named like a frame must not block the server, and a symlinked frame must
    not be served from outside the directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    disk = DiskTier(str(outside), 10**6)
    disk.put(key(1), LAYOUT, owned(1))
    disk.flush()
    disk.close()
    cache = tmp_path / "cache"
    disk = DiskTier(str(cache), 10**6)
    disk.close()
    os.mkfifo(cache / (key(2).hex() + ".lmsg"))
    (cache / (key(1).hex() + ".lmsg")).symlink_to(outside / (key(1).hex() + ".lmsg"))
    disk = DiskTier(str(cache), 10**6)
    assert disk.keys() == []  # neither is indexed at start
    out = torch.empty(LAYOUT.nbytes, dtype=torch.uint8)
    disk._index[key(2)] = 0  # as if planted after start: the read must still refuse them
    disk._index[key(1)] = 0
    done = threading.Event()
    threading.Thread(target=lambda: (disk.get_into(key(2), LAYOUT, out), done.set()), daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"
    assert not disk.get_into(key(1), LAYOUT, out)
    disk.close()
