"""CPU tier: the hot tier, a pre-allocated slab arena with LRU eviction and pins.

One slab holds one chunk, and remembers the position its KV was computed at. The arena
is allocated once (page-locked when CUDA is present; otherwise its pages are faulted in
by a background thread while the server is idle), so the hot path neither allocates nor,
once that is done, takes page faults. Pinned entries (being loaded, protected for a
promised load, or lent to a cold tier's writer) are never evicted. An entry is verified
on every read by its key and layout.

Two lanes keep their own LRU order: "prefix" (prefix-chained chunks) and "segment"
(position-independent segments, reused anywhere in a prompt). With a segment share s,
the segment lane is guaranteed floor(s * slabs) slabs against prefix stores and the
prefix lane the rest against segment stores: a store that needs a slab evicts from its
own lane when that lane holds its share or more, otherwise from the other lane (which,
the arena being full, holds more than its share). In the segment lane an entry never
read (pinned) since it was stored is evicted before any entry that was read, so a scan
of segments used once does not push out the reused ones. With s == 0 (or a share of no
whole slab) there is one lane, a plain LRU.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..codec import ChunkLayout
from ..metrics import CacheMetrics
from .base import Held, Payload
from .writer import IdleSignal

EvictHook = Callable[[bytes, ChunkLayout, torch.Tensor, int], None]  # key, layout, copy, position
LANES = ("prefix", "segment")
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_HUGE_PAGE = 2 << 20
_IDLE_POLL_S = 1.0  # how often a populate waiting for idle time checks that its arena lives


def _populate(arena: Callable[[], torch.Tensor | None], idle: IdleSignal | None = None) -> None:
    """Back the arena `arena()` with transparent huge pages where the kernel allows
    (MADV_HUGEPAGE) and fault its pages in, lowest first, one huge page per call, without
    changing its bytes (MADV_POPULATE_WRITE), so that a first store into a slab takes no
    page faults. Short calls let the process's other threads map memory in between (in
    64 MiB calls a 64 MiB disk load that overlapped them took 0.2-0.8 s instead of
    ~40 ms). Meant for a thread of normal priority: a niced one, descheduled inside a
    call while it holds the memory-map lock, stalled every allocation of the other
    threads (up to 1.2 s for 64 MiB with both cores busy; it had not finished after
    20 s). With `idle`, each call waits until it is set (the server has nothing to run),
    so the populate never takes a core from requests (measured here: a restarted
    server's device and disk hits took 0.2-0.3 s while its 2 GiB populate ran, 0.05 and
    0.08 s after it). `arena()` is None once the arena is gone (a weak reference): it is
    held only during each call, never while waiting, and the populate then stops. Best
    effort: where the kernel lacks either advice, pages fault on first write."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    tensor = arena()
    if tensor is None:
        return
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel()) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    del tensor
    lo = start
    while lo < end:
        while idle is not None and not idle.wait(_IDLE_POLL_S):
            if arena() is None:
                return
        tensor = arena()
        if tensor is None:
            return
        hi = min((lo // _HUGE_PAGE + 1) * _HUGE_PAGE, end)  # the next huge-page boundary
        failed = libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_WRITE) != 0
        del tensor
        if failed:
            return
        lo = hi


@dataclass
class _Entry:
    slab: int
    layout: ChunkLayout
    lane: str
    position: int
    pins: int = 0
    read: bool = False  # pinned by pin() since it was stored


class CpuTier:
    name = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        slab_bytes: int,
        on_evict: EvictHook | None = None,
        *,
        metrics: CacheMetrics | None = None,
        segment_share: float = 0.0,
        idle: IdleSignal | None = None,
    ) -> None:
        """Hold up to capacity_bytes // slab_bytes chunks of at most slab_bytes each, of
        which floor(segment_share * slabs) are the segment lane's share (0 <= share < 1).
        The arena's pages are faulted in while `idle` is set (see _populate), at once
        without it.

        on_evict(key, layout, copy, position) is told of each evicted entry, with a copy
        of its bytes, after the tier's lock is released (so it may block).
        """
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be positive, got {slab_bytes}")
        if not 0 <= segment_share < 1:
            raise ValueError(f"segment_share must be >= 0 and < 1, got {segment_share}")
        self.slab_bytes = slab_bytes
        self.num_slabs = max(capacity_bytes, 0) // slab_bytes
        segment_slabs = math.floor(segment_share * self.num_slabs)
        self._share = {"prefix": self.num_slabs - segment_slabs, "segment": segment_slabs}  # guaranteed slabs
        pin = torch.cuda.is_available()
        self._arena = torch.empty(self.num_slabs * slab_bytes, dtype=torch.uint8, pin_memory=pin)
        if not pin and sys.platform == "linux" and self._arena.numel():
            threading.Thread(
                target=_populate, args=(weakref.ref(self._arena), idle), name="lmcsgl-cpu-populate", daemon=True
            ).start()
        self._free = list(range(self.num_slabs - 1, -1, -1))  # pop() takes the lowest slab: populated first
        self._entries: dict[bytes, _Entry] = {}
        self._lru: dict[str, OrderedDict[bytes, _Entry]] = {lane: OrderedDict() for lane in LANES}  # LRU first
        self._slabs = dict.fromkeys(LANES, 0)  # slabs each lane holds, entries and fills
        self._filling: set[bytes] = set()  # slabs taken, bytes being written
        self._lock = threading.RLock()
        self.on_evict = on_evict
        self._evicted: list[tuple[bytes, ChunkLayout, torch.Tensor, int]] = []  # for on_evict, under the lock
        self.metrics = metrics if metrics is not None else CacheMetrics()

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.layout.nbytes for e in self._entries.values())

    def usage(self) -> tuple[int, int]:
        return self.used_bytes, self.capacity_bytes

    def describe(self) -> str:
        size = f"cpu {self.capacity_bytes / 2**30:.2f} GB"  # GB as in the config: 2**30 bytes
        segments = self._share["segment"]
        return f"{size} ({segments} of {self.num_slabs} slabs kept for segments)" if segments else size

    def _lane(self, lane: str) -> str:
        """The lane a store goes to: "prefix" for everything while there are no lanes."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}: one of {', '.join(LANES)}")
        return lane if self._share["segment"] else "prefix"

    def close(self, timeout: float | None = None) -> bool:
        return True  # nothing runs in the background once the arena is populated

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def count_present(self, keys: Sequence[bytes]) -> int:
        for i, key in enumerate(keys):
            if key not in self._entries:
                return i
        return len(keys)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def _view(self, slab: int, nbytes: int) -> torch.Tensor:
        start = slab * self.slab_bytes
        return self._arena[start : start + nbytes]

    def store(
        self,
        key: bytes,
        layout: ChunkLayout,
        fill: Callable[[torch.Tensor], None],
        *,
        pins: int = 0,
        position: int = 0,
        lane: str = "prefix",
    ) -> bool:
        """Store a chunk whose bytes `fill(buffer)` writes, computed with its first token
        at `position`, in `lane`; False if present or no room.

        Evicts unpinned entries to make room (see the module's docstring). The new entry
        starts with `pins` pins (see lent()).
        """

        def write(buf: torch.Tensor) -> int:
            fill(buf)
            return position

        return self._store(key, layout, write, pins, lane)

    def promote(self, key: bytes, layout: ChunkLayout, read: Callable[[torch.Tensor], int], *, lane: str) -> bool:
        """store() of a chunk read from a cold tier: `read(buffer)` writes its bytes and
        returns the position they were stored with (an exception from it gives the slab
        back and is raised)."""
        return self._store(key, layout, read, 0, lane)

    def _store(
        self, key: bytes, layout: ChunkLayout, write: Callable[[torch.Tensor], int], pins: int, lane: str
    ) -> bool:
        if layout.nbytes > self.slab_bytes:
            raise ValueError(f"chunk of {layout.nbytes} bytes exceeds the slab size {self.slab_bytes}")
        lane = self._lane(lane)
        with self._lock:
            if key in self._entries or key in self._filling:
                if key in self._entries:
                    self._touch(key)
                return False
            slab = self._take_slab(lane)
            if slab is not None:
                self._filling.add(key)
        self._report_evictions()
        if slab is None:
            return False
        try:  # outside the lock: several chunks may be filled at once
            position = write(self._view(slab, layout.nbytes))
        except BaseException:
            with self._lock:
                self._filling.discard(key)
                self._free.append(slab)
                self._slabs[lane] -= 1
            raise
        with self._lock:
            self._filling.discard(key)
            self._entries[key] = self._lru[lane][key] = _Entry(slab, layout, lane, position, pins=pins)
        self.metrics.inc("stored_chunks_total", tier=self.name)
        self.metrics.inc("store_bytes_total", layout.nbytes, tier=self.name)
        return True

    def lent(self, key: bytes) -> Payload:
        """The bytes and position of an entry that the caller pinned (store's `pins`), as a
        Payload for a cold tier's writer: releasing it is the caller's unpin."""
        with self._lock:
            entry = self._entries[key]
            view = self._view(entry.slab, entry.layout.nbytes)
            return Payload(view, 0, lambda: self.unpin(key), position=entry.position)

    def position(self, key: bytes) -> int:
        """The position of an entry the caller holds pinned; KeyError if absent."""
        return self._entries[key].position

    def _touch(self, key: bytes) -> None:
        """Under the lock: `key` becomes its lane's most recently used entry."""
        self._lru[self._entries[key].lane].move_to_end(key)

    def _lru_unpinned(self, lane: str) -> bytes | None:
        """Under the lock: the lane's least recently used unpinned entry; in the segment
        lane, one never read since it was stored if there is any."""
        read_one = None
        for key, entry in self._lru[lane].items():
            if entry.pins:
                continue
            if lane == "prefix" or not entry.read:
                return key
            if read_one is None:
                read_one = key
        return read_one

    def _take_slab(self, lane: str) -> int | None:
        """Under the lock: a free slab for `lane`, or one evicted for it; None if none can be."""
        if self._free:
            slab: int | None = self._free.pop()
        else:
            other = LANES[1 - LANES.index(lane)]
            order = (lane,) if self._slabs[lane] >= self._share[lane] else (other, lane)
            victim = next((k for k in map(self._lru_unpinned, order) if k is not None), None)
            slab = None if victim is None else self._take_slab_of(victim)
        if slab is not None:
            self._slabs[lane] += 1
        return slab

    def pin(self, key: bytes, layout: ChunkLayout) -> torch.Tensor | None:
        """The chunk's bytes, pinned until unpin(key) (its position: position(key)); None
        on a miss or a layout mismatch. The entry counts as read."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.layout != layout:
                if entry is not None:
                    self.metrics.inc("corrupt_frames_total", tier=self.name)
                return None
            entry.pins += 1
            entry.read = True
            self._touch(key)
            return self._view(entry.slab, layout.nbytes)

    def protect(self, keys: Sequence[bytes]) -> Held:
        with self._lock:
            held = tuple(k for k in keys if k in self._entries)
            for key in held:
                self._entries[key].pins += 1
        return Held(held)

    def unprotect(self, held: Held) -> None:
        for key in held.keys:
            self.unpin(key)

    def unpin(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise KeyError(f"unpin of a chunk that is not pinned: {key.hex()}")
            entry.pins -= 1

    def evict_lru(self, lane: str = "prefix") -> bytes | None:
        """Evict the lane's next victim (see the module's docstring) through on_evict;
        its key or None."""
        lane = self._lane(lane)
        with self._lock:
            victim = self._lru_unpinned(lane)
            if victim is not None:
                self._free.append(self._take_slab_of(victim))
        self._report_evictions()
        return victim

    def _drop(self, key: bytes) -> _Entry:
        """Under the lock: forget `key`; its lane no longer holds its slab."""
        entry = self._entries.pop(key)
        del self._lru[entry.lane][key]
        self._slabs[entry.lane] -= 1
        return entry

    def _take_slab_of(self, key: bytes) -> int:
        """Under the lock: evict `key`, keeping a copy for on_evict; its slab."""
        entry = self._drop(key)
        self.metrics.inc("evicted_chunks_total", tier=self.name)
        if self.on_evict is not None:
            copy = self._view(entry.slab, entry.layout.nbytes).clone()
            self._evicted.append((key, entry.layout, copy, entry.position))
        return entry.slab

    def _report_evictions(self) -> None:
        """Outside the lock: hand the copies of evicted entries to on_evict."""
        if not self._evicted or self.on_evict is None:
            return
        with self._lock:
            evicted, self._evicted = self._evicted, []
        for key, layout, copy, position in evicted:
            self.on_evict(key, layout, copy, position)

    def clear(self) -> None:
        """Drop every unpinned entry without calling on_evict."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.pins == 0]:
                self._free.append(self._drop(key).slab)
