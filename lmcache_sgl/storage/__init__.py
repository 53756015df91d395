"""Storage tiers: they move and keep bytes, and know nothing of models."""

from .base import ColdTier, Held, Payload, Tier
from .cpu import CpuTier
from .disk import DiskDirectoryError, DiskTier
from .factory import build_stack
from .stack import Hit, TierStack
from .writer import AsyncWriter, IdleSignal

__all__ = [
    "AsyncWriter",
    "ColdTier",
    "CpuTier",
    "DiskDirectoryError",
    "DiskTier",
    "Held",
    "Hit",
    "IdleSignal",
    "Payload",
    "Tier",
    "TierStack",
    "build_stack",
]
