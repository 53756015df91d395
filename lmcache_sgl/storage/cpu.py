"""CPU tier: the hot tier, a pre-allocated slab arena with LRU eviction and pins.

One slab holds one chunk. The arena is allocated once (page-locked when CUDA is
present; otherwise its pages are faulted in by a background thread at start), so the
hot path neither allocates nor takes page faults. Pinned entries (being loaded,
protected for a promised load, or lent to a cold tier's writer) are never evicted. An
entry is verified on every read by its key and layout.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..codec import ChunkLayout
from ..metrics import CacheMetrics
from .base import Held, Payload

EvictHook = Callable[[bytes, ChunkLayout, torch.Tensor], None]
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _populate(arena: torch.Tensor, step: int = 64 << 20) -> None:
    """Fault in the arena's pages, lowest first, without changing its bytes
    (MADV_POPULATE_WRITE), so that a first store into a slab does not pay ~1 ms of page
    faults per 2 MiB. Best effort: where the kernel lacks it, pages fault on first write."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-arena.data_ptr() // page) * page
    end = (arena.data_ptr() + arena.numel()) // page * page
    for lo in range(start, end, step):
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(min(step, end - lo)), _MADV_POPULATE_WRITE) != 0:
            return


@dataclass
class _Entry:
    slab: int
    layout: ChunkLayout
    pins: int = 0


class CpuTier:
    name = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        slab_bytes: int,
        on_evict: EvictHook | None = None,
        *,
        metrics: CacheMetrics | None = None,
    ) -> None:
        """Hold up to capacity_bytes // slab_bytes chunks of at most slab_bytes each.

        on_evict(key, layout, copy) is told of each evicted entry, with a copy of its
        bytes, after the tier's lock is released (so it may block).
        """
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be positive, got {slab_bytes}")
        self.slab_bytes = slab_bytes
        self.num_slabs = max(capacity_bytes, 0) // slab_bytes
        pin = torch.cuda.is_available()
        self._arena = torch.empty(self.num_slabs * slab_bytes, dtype=torch.uint8, pin_memory=pin)
        if not pin and sys.platform == "linux" and self._arena.numel():
            threading.Thread(target=_populate, args=(self._arena,), name="lmcsgl-cpu-populate", daemon=True).start()
        self._free = list(range(self.num_slabs - 1, -1, -1))  # pop() takes the lowest slab: populated first
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU first
        self._filling: set[bytes] = set()  # slabs taken, bytes being written
        self._lock = threading.RLock()
        self.on_evict = on_evict
        self._evicted: list[tuple[bytes, ChunkLayout, torch.Tensor]] = []  # copies for on_evict, under the lock
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
        return f"cpu {self.capacity_bytes / 2**30:.2f} GB"  # GB as in the config: 2**30 bytes

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

    def store(self, key: bytes, layout: ChunkLayout, fill: Callable[[torch.Tensor], None], *, pins: int = 0) -> bool:
        """Store a chunk whose bytes `fill(buffer)` writes; False if present or no room.

        Evicts unpinned entries, least recently used first, to make room. The new entry
        starts with `pins` pins (see lent()).
        """
        if layout.nbytes > self.slab_bytes:
            raise ValueError(f"chunk of {layout.nbytes} bytes exceeds the slab size {self.slab_bytes}")
        with self._lock:
            if key in self._entries or key in self._filling:
                if key in self._entries:
                    self._entries.move_to_end(key)
                return False
            slab = self._take_slab()
            if slab is not None:
                self._filling.add(key)
        self._report_evictions()
        if slab is None:
            return False
        try:  # outside the lock: several chunks may be filled at once
            fill(self._view(slab, layout.nbytes))
        except BaseException:
            with self._lock:
                self._filling.discard(key)
                self._free.append(slab)
            raise
        with self._lock:
            self._filling.discard(key)
            self._entries[key] = _Entry(slab, layout, pins=pins)
        self.metrics.inc("stored_chunks_total", tier=self.name)
        self.metrics.inc("store_bytes_total", layout.nbytes, tier=self.name)
        return True

    def lent(self, key: bytes) -> Payload:
        """The bytes of an entry that the caller pinned (store's `pins`), as a Payload for
        a cold tier's writer: releasing it is the caller's unpin."""
        with self._lock:
            entry = self._entries[key]
            return Payload(self._view(entry.slab, entry.layout.nbytes), 0, lambda: self.unpin(key))

    def _lru_unpinned(self) -> bytes | None:
        return next((k for k, e in self._entries.items() if e.pins == 0), None)

    def _take_slab(self) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self._lru_unpinned()
        return None if victim is None else self._take_slab_of(victim)

    def pin(self, key: bytes, layout: ChunkLayout) -> torch.Tensor | None:
        """The chunk's bytes, pinned until unpin(key); None on a miss or a layout mismatch."""
        view = self._pinned_view(key, layout)
        if view is not None:
            with self._lock:
                self._entries.move_to_end(key)
        return view

    def _pinned_view(self, key: bytes, layout: ChunkLayout) -> torch.Tensor | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.layout != layout:
                if entry is not None:
                    self.metrics.inc("corrupt_frames_total", tier=self.name)
                return None
            entry.pins += 1
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

    def evict_lru(self) -> bytes | None:
        """Evict the least recently used unpinned entry (through on_evict); its key or None."""
        with self._lock:
            victim = self._lru_unpinned()
            if victim is not None:
                self._free.append(self._take_slab_of(victim))
        self._report_evictions()
        return victim

    def _take_slab_of(self, key: bytes) -> int:
        """Under the lock: evict `key`, keeping a copy for on_evict; its slab."""
        entry = self._entries.pop(key)
        self.metrics.inc("evicted_chunks_total", tier=self.name)
        if self.on_evict is not None:
            self._evicted.append((key, entry.layout, self._view(entry.slab, entry.layout.nbytes).clone()))
        return entry.slab

    def _report_evictions(self) -> None:
        """Outside the lock: hand the copies of evicted entries to on_evict."""
        if not self._evicted or self.on_evict is None:
            return
        with self._lock:
            evicted, self._evicted = self._evicted, []
        for key, layout, copy in evicted:
            self.on_evict(key, layout, copy)

    def clear(self) -> None:
        """Drop every unpinned entry without calling on_evict."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.pins == 0]:
                self._free.append(self._entries.pop(key).slab)
