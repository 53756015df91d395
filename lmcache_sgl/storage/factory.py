"""The one place that names concrete tiers: builds the TierStack a config asks for."""

from __future__ import annotations

import os

from ..config import GB, LMCacheConfig
from ..metrics import CacheMetrics
from .base import ColdTier
from .cpu import CpuTier
from .disk import DiskTier
from .redis import RedisTier, TlsFiles
from .stack import TierStack
from .writer import IdleSignal


def build_stack(
    config: LMCacheConfig,
    slab_bytes: int,
    *,
    metrics: CacheMetrics,
    idle: IdleSignal | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> TierStack:
    """The tiers of `config` for chunks of at most `slab_bytes`; raises ValueError when no
    tier is enabled. With tp_size > 1 each rank owns the subdirectory `tp<rank>of<size>`
    of the disk tier's directory and 1/tp_size of its budget, so the directory as a whole
    stays within max_local_disk_size. The Redis tier (remote_url) comes after the disk
    tier; TP ranks share it (their keys differ by the rank in the namespace)."""
    share = config.blend_segment_share if config.enable_blending else 0.0  # the CPU tier's segment lane
    hot = (
        CpuTier(config.cpu_bytes, slab_bytes, metrics=metrics, segment_share=share, idle=idle)
        if config.local_cpu
        else None
    )
    cold: list[ColdTier] = []
    if config.disk_path:
        path = config.disk_path if tp_size == 1 else os.path.join(config.disk_path, f"tp{tp_rank}of{tp_size}")
        cold.append(
            DiskTier(
                path,
                config.disk_bytes // tp_size,
                codec=config.disk_codec,
                level=config.zstd_level,
                idle=idle,
                max_queue_bytes=int(config.max_write_queue_size * GB),
                max_delay_s=config.max_disk_write_delay,
                metrics=metrics,
            )
        )
    if config.remote_url:
        cold.append(
            RedisTier(
                config.remote_url,
                serde=config.remote_serde,
                level=config.zstd_level,
                timeout_s=config.remote_timeout,
                ttl_s=config.remote_ttl or None,
                key_prefix=config.remote_key_prefix,
                hmac_key=config.hmac_secret,
                tls=TlsFiles(config.remote_tls_ca_file, config.remote_tls_cert_file, config.remote_tls_key_file),
                idle=idle,
                max_queue_bytes=int(config.max_write_queue_size * GB),
                max_delay_s=config.max_disk_write_delay,
                metrics=metrics,
            )
        )
    if hot is None and not cold:
        raise ValueError("lmcache config enables no tier: set local_cpu, local_disk or remote_url")
    return TierStack(hot, cold, write_through=config.write_policy == "write_through", metrics=metrics)
