"""TierStack: a hot tier and an ordered list of cold tiers seen as one store of chunks.

lookup answers how many *leading* chunks of a key list are present in some tier. get
returns a chunk pinned in the hot tier, promoting it from the first cold tier that has
it (or, without a hot tier, in a scratch buffer). Under write_through every store also
goes to every cold tier (the writer borrows the hot tier's copy, which stays pinned
until it is written, so no chunk is dropped because the hot tier evicted it first);
under write_back, chunks the hot tier evicts are demoted to the cold tiers. Every chunk
keeps, in every tier, the position its first token had when its KV was computed; a get
returns it. A store or get names the hot tier's lane ("prefix" or "segment", cpu.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from ..codec import ChunkLayout
from ..lograte import RateLimitedLog
from ..metrics import CacheMetrics
from .base import ColdTier, Held, Payload, Tier
from .cpu import CpuTier

log = logging.getLogger("lmcache_sgl")


class Hit(NamedTuple):
    data: torch.Tensor  # the chunk's verified bytes, valid until release(key)
    tier: str  # where they came from
    position: int  # the first token's position when the KV was computed


class Protection(NamedTuple):
    """Opaque handle of TierStack.protect."""

    held: tuple[tuple[Tier, Held], ...]


class TierStack:
    def __init__(
        self,
        hot: CpuTier | None,
        cold: Sequence[ColdTier] = (),
        *,
        write_through: bool = True,
        metrics: CacheMetrics | None = None,
    ) -> None:
        if hot is None and not cold:
            raise ValueError("a TierStack needs at least one tier")
        self.hot, self.cold, self.write_through = hot, list(cold), write_through
        self.tiers: list[Tier] = [hot, *self.cold] if hot is not None else [*self.cold]
        self.metrics = metrics if metrics is not None else CacheMetrics()
        if hot is not None and self.cold and not write_through:
            hot.on_evict = self._demote
        self._scratch: dict[bytes, torch.Tensor] = {}  # chunks handed out by a stack without a hot tier
        self._errors = RateLimitedLog(log, "lmcache-sgl tiers")

    def _demote(self, key: bytes, layout: ChunkLayout, copy: torch.Tensor, position: int) -> None:
        for tier in self.cold:
            tier.put(key, layout, Payload(copy, copy.numel(), position=position))

    def contains(self, key: bytes) -> bool:
        return any(key in tier for tier in self.tiers)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present in some tier (a hint: a later get may still miss)."""
        return len(self.lookup_tiers(keys))

    def lookup_tiers(self, keys: Sequence[bytes]) -> list[str]:
        """For each leading key present in some tier, the name of a tier holding it."""
        found: list[str] = []
        stops = [-1] * len(self.tiers)  # where each tier's last answer ended: it lacks that key
        while len(found) < len(keys):
            rest, step, best = keys[len(found) :], 0, 0
            for i, tier in enumerate(self.tiers):
                if stops[i] == len(found):
                    continue  # not asked twice about a key it lacks (a remote tier's round trip)
                n = tier.count_present(rest)
                stops[i] = len(found) + n
                if n > step:
                    step, best = n, i
            if step == 0:
                break
            found += [self.tiers[best].name] * step
        return found

    def protect(self, keys: Sequence[bytes]) -> Protection | None:
        """Keep every key from eviction, each in the first tier that holds it, until
        unprotect(handle); None (and nothing kept) if some key is in no tier or a tier
        raised."""
        held, rest = [], list(keys)
        try:
            for tier in self.tiers:
                if not rest:
                    break
                got = tier.protect(rest)
                if got.keys:
                    held.append((tier, got))
                    taken = set(got.keys)
                    rest = [k for k in rest if k not in taken]
            complete = not rest
        except Exception as e:  # a broken tier: keep nothing, promise nothing
            self._errors.warn("protect", "protecting chunks failed, counted as a miss: %r", e)
            complete = False
        handle = Protection(tuple(held))
        if not complete:
            self.unprotect(handle)
            return None
        return handle

    def unprotect(self, handle: Protection) -> None:
        for tier, held in handle.held:
            tier.unprotect(held)

    def store(self, key: bytes, layout: ChunkLayout, fill, *, position: int = 0, lane: str = "prefix") -> bool:
        """Store a chunk whose bytes `fill(buffer)` writes, computed with its first token at
        `position`, in the hot tier's `lane`; False if it was already stored or no tier
        took it."""
        if self.contains(key):
            return False
        through = self.cold if self.write_through else []
        if self.hot is not None and self.hot.store(key, layout, fill, pins=len(through), position=position, lane=lane):
            for tier in through:  # each write borrows the CPU copy, pinned until written
                tier.put(key, layout, self.hot.lent(key))
            return True
        if not self.cold:
            self.metrics.inc("dropped_writes_total", reason="cpu_full")
            return False
        copy = torch.empty(layout.nbytes, dtype=torch.uint8)  # no room in the hot tier: a copy for the cold ones
        fill(copy)
        return any([tier.put(key, layout, Payload(copy, layout.nbytes, position=position)) for tier in self.cold])

    def get(self, key: bytes, layout: ChunkLayout, *, parallel: bool = True, lane: str = "prefix") -> Hit | None:
        """The chunk's verified bytes and position, valid until release(key); None on a
        miss. A chunk read from a cold tier is promoted into the hot one's `lane`, with
        the position the cold tier stored (decoded on every core when `parallel`)."""
        if self.hot is not None:
            data = self.hot.pin(key, layout)
            if data is not None:
                return self._hit(Hit(data, self.hot.name, self.hot.position(key)), layout)
        for tier in self.cold:
            if not tier.count_present([key]):
                continue
            if self.hot is not None:
                read = functools.partial(self._read, tier, key, layout, parallel=parallel)
                try:
                    if self.hot.promote(key, layout, read, lane=lane):
                        data = self.hot.pin(key, layout)
                        if data is not None:
                            return self._hit(Hit(data, tier.name, self.hot.position(key)), layout)
                        continue
                except _Miss:
                    continue
            scratch = torch.empty(layout.nbytes, dtype=torch.uint8)  # no hot tier, or no room in it
            position = tier.get_into(key, layout, scratch, parallel=parallel)
            if position is not None:
                self._scratch[key] = scratch
                return self._hit(Hit(scratch, tier.name, position), layout)
        return None

    def _hit(self, hit: Hit, layout: ChunkLayout) -> Hit:
        self.metrics.inc("load_bytes_total", layout.nbytes, tier=hit.tier)
        return hit

    @staticmethod
    def _read(tier: ColdTier, key: bytes, layout: ChunkLayout, buf: torch.Tensor, parallel: bool) -> int:
        position = tier.get_into(key, layout, buf, parallel=parallel)
        if position is None:
            raise _Miss()
        return position

    def get_many(self, items: Sequence[tuple[bytes, ChunkLayout]], *, lane: str = "prefix") -> list[Hit | None]:
        """get() of every (key, layout), promoted into `lane`; a tier that raises costs that
        chunk (None, logged). Chunks that come from cold tiers are read and decoded
        concurrently, each on one core, after this thread pinned the hot tier's; each cold
        tier is first asked to fetch, at once, the keys no tier above it holds
        (ColdTier.reading). Release each one that is not None."""
        with contextlib.ExitStack() as batch:
            missing = [key for key, _ in items if self.hot is None or key not in self.hot]
            wanted = missing
            for tier in self.cold:  # each cold tier fetches, at once, what the tiers above it lack
                batch.enter_context(tier.reading(wanted))
                wanted = [key for key in wanted if key not in tier]
            # The hot tier's chunks are pinned here first, so promotions cannot evict them;
            # two or more from cold tiers are then fetched by the readers, one per core.
            cold = set(missing) if self.cold and len(missing) > 1 else set()
            here = iter([self._get_or_none(key, layout, True, lane) for key, layout in items if key not in cold])
            fetch = [(key, layout) for key, layout in items if key in cold]
            fetched = iter(list(_readers().map(lambda item: self._get_or_none(item[0], item[1], False, lane), fetch)))
            return [next(fetched) if key in cold else next(here) for key, _ in items]

    def _get_or_none(self, key: bytes, layout: ChunkLayout, parallel: bool, lane: str) -> Hit | None:
        try:
            return self.get(key, layout, parallel=parallel, lane=lane)
        except Exception as e:  # a broken tier is a miss, never data and never a crash
            self._errors.warn("get", "a chunk read failed, counted as a miss: %r", e)
            return None

    def release(self, key: bytes) -> None:
        """Undo one get(key) that returned a Hit."""
        if self._scratch.pop(key, None) is None:
            assert self.hot is not None
            self.hot.unpin(key)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the cold tiers' queued writes; False if `timeout` ran out."""
        return all([tier.flush(timeout) for tier in self.cold])

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()

    def close(self, timeout: float | None = None) -> bool:
        """Flush the cold tiers (at most `timeout` seconds each) and stop them."""
        return all([tier.close(timeout) for tier in self.cold])

    def usage(self) -> dict[str, tuple[int, int]]:
        return {tier.name: tier.usage() for tier in self.tiers}

    def describe(self) -> str:
        return ", ".join(tier.describe() for tier in self.tiers)


_reader_pool: ThreadPoolExecutor | None = None


def _readers() -> ThreadPoolExecutor:
    global _reader_pool
    if _reader_pool is None:
        _reader_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lmcsgl-read")
    return _reader_pool


class _Miss(Exception):
    """A promotion whose read failed: the hot tier's slab is given back."""
