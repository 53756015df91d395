"""TierStack: the CPU and disk tiers seen as one store of chunks.

lookup answers how many *leading* chunks of a key list are present in some tier. get
returns a chunk pinned in the CPU tier, promoting it from disk when needed. Under
write_back, chunks evicted from the CPU tier are demoted to disk; under write_through,
every store also goes to disk at once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from ..codec import ChunkLayout
from .cpu import CpuTier
from .disk import DiskTier


class TierStack:
    def __init__(self, cpu: CpuTier | None, disk: DiskTier | None, write_through: bool = False) -> None:
        if cpu is None and disk is None:
            raise ValueError("a TierStack needs at least one tier")
        self.cpu, self.disk, self.write_through = cpu, disk, write_through
        if cpu is not None and disk is not None and not write_through:
            cpu.on_evict = self._demote
        self._scratch: dict[bytes, torch.Tensor] = {}  # chunks handed out by a CPU-less stack

    def _demote(self, key: bytes, layout: ChunkLayout, data: torch.Tensor) -> None:
        assert self.disk is not None
        if key not in self.disk:
            self.disk.put(key, layout, data.clone())  # the slab is reused as soon as we return

    def contains(self, key: bytes) -> bool:
        return (self.cpu is not None and key in self.cpu) or (self.disk is not None and key in self.disk)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present in some tier (a hint: a later get may still miss)."""
        for i, key in enumerate(keys):
            if not self.contains(key):
                return i
        return len(keys)

    def protect(self, keys: Sequence[bytes]) -> list[str]:
        """Keep the leading present keys from eviction until unprotect; returns, per key
        protected, the tier that holds it (pass it back to unprotect)."""
        held = []
        for key in keys:
            if self.cpu is not None and self.cpu.protect(key):
                held.append("cpu")
            elif self.disk is not None and self.disk.protect(key):
                held.append("disk")
            else:
                break
        return held

    def unprotect(self, keys: Sequence[bytes], tiers: Sequence[str]) -> None:
        for key, tier in zip(keys, tiers):
            if tier == "cpu":
                assert self.cpu is not None
                self.cpu.unpin(key)
            else:
                assert self.disk is not None
                self.disk.unprotect(key)

    def store(self, key: bytes, layout: ChunkLayout, fill: Callable[[torch.Tensor], None]) -> bool:
        """Store a chunk whose bytes `fill(buffer)` writes; False if it was already stored."""
        if self.contains(key):
            return False
        if self.cpu is not None:
            stored = self.cpu.store(key, layout, fill)
            if stored and self.write_through and self.disk is not None:
                # The writer reads the CPU copy when it gets to it; gone by then means dropped.
                self.disk.put(key, layout, lambda: self.cpu.borrow(key, layout))
            if stored or self.disk is None:
                return stored
        data = torch.empty(layout.nbytes, dtype=torch.uint8)  # no room in CPU memory: straight to disk
        fill(data)
        assert self.disk is not None
        return self.disk.put(key, layout, data)

    def get(self, key: bytes, layout: ChunkLayout, *, parallel: bool = True) -> torch.Tensor | None:
        """The chunk's verified bytes, valid until release(key); None on a miss. A chunk
        read from disk is decoded on every core when `parallel`."""
        if self.cpu is not None:
            data = self.cpu.pin(key, layout)
            if data is not None:
                return data
        if self.disk is None or key not in self.disk:
            return None
        if self.cpu is not None:
            try:
                if self.cpu.store(key, layout, lambda buf: self._read_disk(key, layout, buf, parallel)):
                    return self.cpu.pin(key, layout)
            except _Miss:
                return None
        scratch = torch.empty(layout.nbytes, dtype=torch.uint8)
        if not self.disk.get_into(key, layout, scratch, parallel=parallel):
            return None
        self._scratch[key] = scratch
        return scratch

    def get_many(self, items: Sequence[tuple[bytes, ChunkLayout]]) -> list[torch.Tensor | None]:
        """get() of every (key, layout); chunks that come from disk are read and decoded
        concurrently, each on one core (nesting the block-parallel decode under this cost
        ~10% more). Release each one that is not None."""
        if self.disk is None or len(items) < 2:
            return [self.get(key, layout) for key, layout in items]
        return list(_readers().map(lambda item: self.get(*item, parallel=False), items))

    def _read_disk(self, key: bytes, layout: ChunkLayout, buf: torch.Tensor, parallel: bool) -> None:
        assert self.disk is not None
        if not self.disk.get_into(key, layout, buf, parallel=parallel):
            raise _Miss()

    def release(self, key: bytes) -> None:
        """Undo one get(key)."""
        if self._scratch.pop(key, None) is None:
            assert self.cpu is not None
            self.cpu.unpin(key)

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: tier.stats.as_dict() for name, tier in (("cpu", self.cpu), ("disk", self.disk)) if tier is not None}


_reader_pool: ThreadPoolExecutor | None = None


def _readers() -> ThreadPoolExecutor:
    global _reader_pool
    if _reader_pool is None:
        _reader_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lmcsgl-read")
    return _reader_pool


class _Miss(Exception):
    """A promotion whose disk read failed: the CPU slab is given back."""
