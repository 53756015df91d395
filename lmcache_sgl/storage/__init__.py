"""Storage tiers: they move and keep bytes, and know nothing of models."""

from .cpu import CpuTier
from .disk import DiskTier
from .stack import TierStack
from .stats import TierStats

__all__ = ["CpuTier", "DiskTier", "TierStack", "TierStats"]
