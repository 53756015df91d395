"""Counters kept by every tier."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    bytes_stored: int = 0
    bytes_read: int = 0
    evictions: int = 0
    corrupt: int = 0  # entries that failed verification and were dropped
    dropped: int = 0  # stores given up (no room, queue full)
    write_errors: int = 0  # stores that failed on IO (disk full, unwritable)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
