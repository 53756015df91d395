"""The asynchronous writer every cold tier shares.

A cold tier hands each chunk to its AsyncWriter and returns at once; worker threads pass
the chunks, oldest first, to the tier's `sink`. Writes wait for the server to be idle, so
they do not compete with the model for the CPU, but never longer than `max_delay_s` after
the chunk was queued, and not at all while a flush or a caller waiting for room is
blocked. The workers run at the server's priority: a niced thread descheduled while it
holds a lock the scheduler needs (the GIL, the CPU tier's) stalls the scheduler (measured
on 2 cores: CPU-tier hits took up to 2.5 times a device hit beside a niced writer,
1.1-1.3 times beside one at normal priority). The bytes of copies held in the queue never exceed
`max_bytes`: a caller with a copy waits for room (at most `max_delay_s`, then the chunk
is dropped and counted). Borrowed payloads (pinned CPU-tier slabs) cost no queue room.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from ..codec import ChunkLayout
from .base import Payload

log = logging.getLogger("lmcache_sgl")
IDLE_SETTLE_S = 0.2  # the server must stay idle this long: a gap between two requests is not idleness
Sink = Callable[[list[tuple[bytes, ChunkLayout, Payload]]], None]


class IdleSignal(threading.Event):
    """Set while the server has nothing to run (the SGLang adapter sets it when the
    scheduler is idle and clears it when a request arrives); writers wait for it.

    `idle_for()` is how long it has been set without a break, so a waiter that looks now
    and then still sees a request that came and went between two of its looks."""

    def __init__(self) -> None:
        super().__init__()
        self._idle_since = 0.0  # time.monotonic() of the last set after a clear

    def set(self) -> None:
        if not self.is_set():
            self._idle_since = time.monotonic()
        super().set()

    def idle_for(self) -> float:
        """Seconds since the server last became idle; 0 while it is busy."""
        since = self._idle_since
        return time.monotonic() - since if self.is_set() else 0.0


class _Item(NamedTuple):
    key: bytes
    layout: ChunkLayout
    payload: Payload
    queued_at: float


class AsyncWriter:
    def __init__(
        self,
        sink: Sink,
        *,
        name: str,
        max_bytes: int,
        max_delay_s: float,
        idle: IdleSignal | None = None,
        on_drop: Callable[[str], None] = lambda reason: None,
        workers: int = 1,
        max_batch: int = 1,
    ) -> None:
        """sink([(key, layout, payload), ...]) writes up to `max_batch` chunks (bytes and
        position; the writer releases the payloads) whose turn has come, oldest first (it
        counts its own failures; an exception from it is logged and each chunk counted as
        a drop). on_drop(reason) is told of every chunk given up."""
        self.sink, self.name, self.idle, self.max_batch = sink, name, idle, max_batch
        self.max_bytes, self.max_delay_s, self.on_drop = max_bytes, max_delay_s, on_drop
        self._items: deque[_Item] = deque()
        self._pending: set[bytes] = set()  # queued or being written
        self.queued_bytes = 0  # owned bytes of queued and in-flight payloads
        self._urgent = 0  # flushes and callers waiting for room: write now, idle or not
        self._stopping = False
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"lmcsgl-{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def pending(self, key: bytes) -> bool:
        with self._cond:
            return key in self._pending

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, key: bytes, layout: ChunkLayout, payload: Payload) -> bool:
        """Queue a chunk; False (and the payload released) if it is queued already or no
        room was found in time."""
        with self._cond:
            if key in self._pending or self._stopping:
                payload.release()
                return False
            if not self._wait_for_room(payload.owned_bytes):
                payload.release()
                self.on_drop("queue_full")
                return False
            self._pending.add(key)
            self.queued_bytes += payload.owned_bytes
            self._items.append(_Item(key, layout, payload, time.monotonic()))
            self._cond.notify_all()
        return True

    def _wait_for_room(self, nbytes: int) -> bool:
        """Under the lock: wait until `nbytes` more fit (a payload larger than the whole
        budget fits an empty queue); False after max_delay_s."""

        def fits() -> bool:
            return self.queued_bytes + nbytes <= self.max_bytes or self.queued_bytes == 0

        if fits():
            return True
        self._urgent += 1
        self._cond.notify_all()
        try:
            return self._cond.wait_for(fits, timeout=self.max_delay_s)
        finally:
            self._urgent -= 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has finished (or failed), idle or not; False if
        `timeout` seconds ran out first."""
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._pending, timeout=timeout)
            finally:
                self._urgent -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Flush (at most `timeout` seconds), then stop the workers; chunks still queued
        are dropped and counted. True if nothing was dropped."""
        flushed = self.flush(timeout)
        with self._cond:
            self._stopping = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        for item in left:
            self._finish(item, dropped="shutdown")
        for t in self._threads:
            t.join(timeout=1.0)
        return flushed and not left

    # ---- workers -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next()
            if not batch:
                return
            dropped = None
            try:
                self.sink([(item.key, item.layout, item.payload) for item in batch])
            except Exception:  # a bug must not kill the writer: log it, drop the chunks
                dropped = "error"
                log.exception("lmcache-sgl %s writer: a write failed", self.name)
            for item in batch:
                self._finish(item, dropped)

    def _next(self) -> list[_Item]:
        """The oldest items (at most max_batch), once it is their turn; [] when stopping.
        An idle period must last IDLE_SETTLE_S before the first write; while it lasts,
        writes follow at once."""
        with self._cond:
            while True:
                if self._stopping:
                    return []
                if not self._items:
                    self._cond.wait()
                    continue
                settled = self.idle is None or self.idle.idle_for() >= IDLE_SETTLE_S
                overdue = time.monotonic() - self._items[0].queued_at >= self.max_delay_s
                if settled or self._urgent or overdue:
                    return [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]
                self._cond.wait(0.05)

    def _finish(self, item: _Item, dropped: str | None) -> None:
        item.payload.release()
        if dropped is not None:
            self.on_drop(dropped)
        with self._cond:
            self._pending.discard(item.key)
            self.queued_bytes -= item.payload.owned_bytes
            self._cond.notify_all()
