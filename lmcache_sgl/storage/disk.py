"""Disk tier: one verified frame per file, written off the caller's thread.

Files are `<key hex>.lmsg` in one directory. Writes go through a bounded queue to
worker threads (at low priority, and when a gate is given only while it is open, e.g.
while the server is idle) and are atomic (temp file, then rename), so a reader sees a
whole frame or none. The index is rebuilt from the directory at start (LRU order from mtimes), so
the cache survives restarts. The byte budget is never exceeded: room is made, least
recently used first, before a file is written. IO errors (a full or unwritable disk)
are logged and counted and the store is dropped; a frame that fails verification on
read is deleted and reported as a miss.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch

from ..codec import ChunkLayout, FrameError, decode_into, encode
from .stats import TierStats

log = logging.getLogger("lmcache_sgl")
SUFFIX = ".lmsg"
_STOP = object()
IDLE_SETTLE_S = 0.2
WRITER_NICENESS = 19  # encoding and writing yield the CPU to the model's forward
Source = Callable[[], ContextManager[Optional[torch.Tensor]]]


class DiskTier:
    def __init__(
        self, path: str, capacity_bytes: int, codec: str = "zstd", level: int = 1,
        workers: int = 1, queue_depth: int = 1024, gate: threading.Event | None = None,
    ) -> None:
        """gate: when given, writes wait until it is set (the host is idle), unless the
        queue is half full or a flush is waiting."""
        self.gate = gate
        self._open_since: float | None = None  # when the writer first saw the gate open
        self._flushing = threading.Event()
        self.path = path
        self.capacity_bytes = capacity_bytes
        self.codec, self.level = codec, level
        self.stats = TierStats()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, LRU first
        self._pending: set[bytes] = set()  # queued or being written
        self._used = 0  # bytes of indexed files plus reservations of writes in flight
        self._protected: Counter[bytes] = Counter()  # keys that eviction must skip
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        os.makedirs(path, exist_ok=True)
        self._rebuild_index()
        self._threads = [
            threading.Thread(target=self._work, name=f"lmcsgl-disk-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ---- index -------------------------------------------------------------------
    def _file(self, key: bytes) -> str:
        return os.path.join(self.path, key.hex() + SUFFIX)

    def _rebuild_index(self) -> None:
        found = []
        for entry in os.scandir(self.path):
            name = entry.name
            if name.endswith(".tmp"):
                _unlink(entry.path)  # a write cut short by a crash
                continue
            stem = name[: -len(SUFFIX)]
            if not name.endswith(SUFFIX) or len(stem) != 32:
                continue
            try:
                key, st = bytes.fromhex(stem), entry.stat()
            except (ValueError, OSError):
                continue
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size
        while self._used > self.capacity_bytes and self._evict_one():
            pass

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def _evict_one(self) -> bool:
        """Evict the least recently used unprotected file; False if there is none."""
        key = next((k for k in self._index if k not in self._protected), None)
        if key is None:
            return False
        self._used -= self._index.pop(key)
        _unlink(self._file(key))
        self.stats.evictions += 1
        return True

    def protect(self, key: bytes) -> bool:
        """Keep the file from eviction until unprotect(key); False if absent."""
        with self._lock:
            if key in self._index:
                self._protected[key] += 1
                return True
            return False

    def unprotect(self, key: bytes) -> None:
        with self._lock:
            self._protected[key] -= 1
            if self._protected[key] <= 0:
                del self._protected[key]

    def _drop(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
                _unlink(self._file(key))

    # ---- writes ------------------------------------------------------------------
    def put(self, key: bytes, layout: ChunkLayout, data: torch.Tensor | Source) -> bool:
        """Queue a chunk to be written: `data` is a CPU tensor the caller no longer changes,
        or a Source the writer opens when it gets to the chunk (None there: dropped).

        Returns at once: False when the chunk is already here or queued, or the queue is
        full (the store is dropped and counted).
        """
        with self._lock:
            if key in self._index or key in self._pending:
                return False
            self._pending.add(key)
        try:
            self._queue.put_nowait((key, layout, data))
        except queue.Full:
            with self._lock:
                self._pending.discard(key)
            self.stats.dropped += 1
            return False
        return True

    def flush(self) -> None:
        """Wait until every queued write has finished (or failed), gate or not."""
        self._flushing.set()
        try:
            self._queue.join()
        finally:
            self._flushing.clear()

    def _wait_for_turn(self) -> None:
        """Return once the gate has been seen open for IDLE_SETTLE_S without closing (a gap
        between two back-to-back requests is not idleness), or a flush or a half-full queue
        says go. While it stays open, the queued writes then follow each other at once."""
        if self.gate is None:
            return
        while not (self._flushing.is_set() or self._queue.qsize() >= self._queue.maxsize // 2):
            if not self.gate.is_set():
                self._open_since = None
                self.gate.wait(0.05)
                continue
            now = time.monotonic()
            if self._open_since is None:
                self._open_since = now
            if now - self._open_since >= IDLE_SETTLE_S:
                return
            time.sleep(min(0.05, self._open_since + IDLE_SETTLE_S - now))

    def close(self) -> None:
        self.flush()
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except OSError:
            pass
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                key, layout, data = item
                self._wait_for_turn()
                try:
                    with data() if callable(data) else nullcontext(data) as tensor:
                        if tensor is None:
                            self.stats.dropped += 1
                        else:
                            self._write(key, layout, tensor)
                finally:
                    with self._lock:
                        self._pending.discard(key)
            except Exception:  # a bug must not kill the writer: log it, drop the store
                self.stats.write_errors += 1
                log.exception("lmcache-sgl disk tier: a store failed")
            finally:
                self._queue.task_done()

    def _write(self, key: bytes, layout: ChunkLayout, data: torch.Tensor) -> None:
        tmp = self._file(key) + f".{threading.get_ident()}.tmp"
        parts = encode(key, layout, data, self.codec, self.level)
        size = sum(len(memoryview(p).cast("B")) for p in parts)
        with self._lock:
            while self._used + size > self.capacity_bytes and self._evict_one():
                pass
            if self._used + size > self.capacity_bytes:  # too big, or the rest is protected or in flight
                self.stats.dropped += 1
                return
            self._used += size  # reserved, so concurrent writers respect the budget
        try:
            _write_file(tmp, parts)
            os.replace(tmp, self._file(key))
        except OSError as e:
            with self._lock:
                self._used -= size
            _unlink(tmp)
            self.stats.write_errors += 1
            log.warning("lmcache-sgl disk tier: dropped a store to %s: %s", self.path, e)
            return
        with self._lock:
            self._index[key] = size
        self.stats.stores += 1
        self.stats.bytes_stored += size

    # ---- reads -------------------------------------------------------------------
    def get_into(self, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> bool:
        """Read and verify the chunk into `out`; False on a miss or a bad frame. `parallel`:
        see codec.decode_into."""
        with self._lock:
            hit = key in self._index
            if hit:
                self._index.move_to_end(key)
        if not hit:
            self.stats.misses += 1
            return False
        try:
            with open(self._file(key), "rb", buffering=0) as f:
                frame = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(frame)
            decode_into(frame, key, layout, out, parallel=parallel)
        except (OSError, FrameError) as e:
            self._drop(key)
            self.stats.misses += 1
            if isinstance(e, FrameError):
                self.stats.corrupt += 1
                log.warning("lmcache-sgl disk tier: dropped a bad frame %s: %s", self._file(key), e)
            return False
        self.stats.hits += 1
        self.stats.bytes_read += len(frame)
        return True

    def clear(self) -> None:
        """Delete every file of this tier."""
        self.flush()
        with self._lock:
            while self._evict_one():
                pass


def _write_file(path: str, parts: list) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        written = os.writev(fd, views)
        if written != total:  # short write: finish piece by piece
            data = b"".join(views)[written:]
            while data:
                data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
