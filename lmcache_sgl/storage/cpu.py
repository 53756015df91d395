"""CPU tier: a pre-allocated slab arena with LRU eviction and pins.

One slab holds one chunk. The arena is allocated once (page-locked when CUDA is
present; otherwise its pages are faulted in by a background thread at start), so the
hot path neither allocates nor takes page faults. Pinned entries (being loaded) are never
evicted. An entry is verified on every read by its key and layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..codec import ChunkLayout
from .stats import TierStats

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
    def __init__(self, capacity_bytes: int, slab_bytes: int, on_evict: EvictHook | None = None) -> None:
        """Hold up to capacity_bytes // slab_bytes chunks of at most slab_bytes each.

        on_evict(key, layout, data) sees each evicted entry before its slab is reused.
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
        self.stats = TierStats()

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.layout.nbytes for e in self._entries.values())

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def _view(self, slab: int, nbytes: int) -> torch.Tensor:
        start = slab * self.slab_bytes
        return self._arena[start : start + nbytes]

    def store(self, key: bytes, layout: ChunkLayout, fill: Callable[[torch.Tensor], None]) -> bool:
        """Store a chunk whose bytes `fill(buffer)` writes; False if present or no room.

        Evicts unpinned entries, least recently used first, to make room.
        """
        if layout.nbytes > self.slab_bytes:
            raise ValueError(f"chunk of {layout.nbytes} bytes exceeds the slab size {self.slab_bytes}")
        with self._lock:
            if key in self._entries or key in self._filling:
                if key in self._entries:
                    self._entries.move_to_end(key)
                return False
            slab = self._take_slab()
            if slab is None:
                self.stats.dropped += 1
                return False
            self._filling.add(key)
        try:  # outside the lock: several chunks may be filled at once
            fill(self._view(slab, layout.nbytes))
        except BaseException:
            with self._lock:
                self._filling.discard(key)
                self._free.append(slab)
            raise
        with self._lock:
            self._filling.discard(key)
            self._entries[key] = _Entry(slab, layout)
            self.stats.stores += 1
            self.stats.bytes_stored += layout.nbytes
        return True

    def _lru_unpinned(self) -> bytes | None:
        return next((k for k, e in self._entries.items() if e.pins == 0), None)

    def _take_slab(self) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self._lru_unpinned()
        return None if victim is None else self._take_slab_of(victim)

    def pin(self, key: bytes, layout: ChunkLayout) -> torch.Tensor | None:
        """The chunk's bytes, pinned until unpin(key); None on a miss or a layout mismatch."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.layout != layout:
                self.stats.misses += 1
                if entry is not None:
                    self.stats.corrupt += 1
                return None
            entry.pins += 1
            self._entries.move_to_end(key)
            self.stats.hits += 1
            self.stats.bytes_read += layout.nbytes
            return self._view(entry.slab, layout.nbytes)

    def protect(self, key: bytes) -> bool:
        """Pin the entry without reading it (so it survives until a later load); False if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
            return entry is not None

    @contextlib.contextmanager
    def borrow(self, key: bytes, layout: ChunkLayout) -> Iterator[torch.Tensor | None]:
        """The chunk's bytes, pinned for the `with` block (no hit counted); None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            ok = entry is not None and entry.layout == layout
            if ok:
                entry.pins += 1
        try:
            yield self._view(entry.slab, layout.nbytes) if ok else None
        finally:
            if ok:
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
            return victim

    def _take_slab_of(self, key: bytes) -> int:
        entry = self._entries.pop(key)
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key, entry.layout, self._view(entry.slab, entry.layout.nbytes))
        return entry.slab

    def clear(self) -> None:
        """Drop every unpinned entry without calling on_evict."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.pins == 0]:
                self._free.append(self._entries.pop(key).slab)
