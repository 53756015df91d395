"""Warnings that cannot flood the log: a failure repeated per chunk is one line, then a
count at most once per interval."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, prefix: str, interval_s: float = 60.0) -> None:
        self.logger, self.prefix, self.interval_s = logger, prefix, interval_s
        self._last: dict[str, float] = {}  # kind -> when its last line was written
        self._suppressed: dict[str, int] = {}  # kind -> occurrences since then
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args) -> bool:
        """Log `msg % args` if no line of this `kind` was written in the last interval
        (with the count of those suppressed since); True if a line was written."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            more = self._suppressed.pop(kind, 0)
        tail = f" ({more} more of this kind since the last report)" if more else ""
        self.logger.warning("%s: " + msg + "%s", self.prefix, *args, tail)
        return True
