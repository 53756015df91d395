"""The contracts between the TierStack and its tiers.

A tier keeps chunks: byte strings of a known ChunkLayout, named by a 16-byte key. The
stack has one hot tier (the CPU arena, `CpuTier`, which hands out pinned views of its
memory) and an ordered list of cold tiers (disk, Redis), which copy into a
caller's buffer on read and write asynchronously. Every method of every tier is
thread-safe. Tiers know nothing of models, of SGLang or of each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from ..codec import ChunkLayout


class Held(NamedTuple):
    """Opaque handle of protect(): the keys a tier keeps from eviction until unprotect."""

    keys: tuple[bytes, ...]


@dataclass
class Payload:
    """A chunk's bytes on their way to a cold tier. The tier calls `release()` exactly once,
    when it no longer reads `tensor` (written, refused or dropped). `owned_bytes` is the
    memory the payload holds on its own (a copy), 0 when it borrows memory that someone
    else bounds (a pinned CPU-tier slab). `position`: the first token's position when the
    KV was computed; the frame records it."""

    tensor: torch.Tensor
    owned_bytes: int
    release: Callable[[], None] = field(default=lambda: None)
    position: int = 0


class Tier(Protocol):
    """What every tier offers."""

    name: str  # the metrics label: "cpu", "disk", ...

    def __contains__(self, key: bytes) -> bool:
        """Whether the tier holds the chunk or is writing it."""

    def count_present(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the tier holds. A hint (a later read may still miss);
        changes nothing."""

    def protect(self, keys: Sequence[bytes]) -> Held:
        """Keep every key of `keys` that the tier holds from eviction until
        unprotect(handle); the handle names those keys."""

    def unprotect(self, held: Held) -> None:
        """Undo one protect()."""

    def clear(self) -> None:
        """Drop every unprotected chunk."""

    def usage(self) -> tuple[int, int]:
        """(bytes used, capacity in bytes)."""

    def describe(self) -> str:
        """One line for the start-up log: kind, where, capacity."""

    def close(self, timeout: float | None = None) -> bool:
        """Finish what is queued (at most `timeout` seconds) and stop background threads;
        False if queued writes were given up."""


class ColdTier(Tier, Protocol):
    """A tier below the hot one: copies on read, writes in the background."""

    def get_into(self, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> int | None:
        """Read and verify the chunk into `out` (layout.nbytes bytes); the position it was
        stored with (Payload.position) on a hit, None on a miss or a bad entry (corrupt, or
        a frame of an earlier version: dropped and counted, never returned). Refreshes
        recency. `parallel`: the tier may use every core for this one read."""

    def reading(self, keys: Sequence[bytes]) -> AbstractContextManager[None]:
        """get_into and count_present calls for `keys` follow (from any thread) until the
        context exits: a remote tier fetches them all now, in one round trip, and answers
        those calls from what it fetched. Never raises; a tier with cheap reads does nothing."""

    def put(self, key: bytes, layout: ChunkLayout, data: Payload) -> bool:
        """Queue the chunk (its bytes and position) for writing and return at once; the
        tier owns `data` from now on (and releases it). False when the chunk is present
        or queued already, or the write was refused (counted)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has finished; False if `timeout` ran out first."""
