"""The SGLang plugin (entry point group `sglang.srt.plugins`), run in every SGLang process.

It registers the radix-cache backend `lmcache_sgl` (`--radix-cache-backend lmcache_sgl`),
routes `--enable-lmcache` to it, and on a machine without a GPU installs CPU
development mode's attention fix (cpu_mode.py). Only SGLang's plugin and hook API is used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging

import torch

from ..config import load_config
from ..engine import CacheEngine, KVPoolView, mark_idle
from ..keys import model_fingerprint
from ..metrics import install_exporter

log = logging.getLogger("lmcache_sgl")
BACKEND = "lmcache_sgl"
SUPPORTED_SGLANG = "0.5.23"


def register() -> None:
    """Plugin entry point."""
    found = importlib.metadata.version("sglang")
    if found != SUPPORTED_SGLANG:
        log.error("lmcache-sgl needs sglang==%s but sglang %s is installed: lmcache-sgl is NOT active", SUPPORTED_SGLANG, found)
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND, build_cache)
    HookRegistry.register("sglang.srt.mem_cache.registry.default_radix_cache_factory", _route_enable_lmcache, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.is_fully_idle", _after_is_fully_idle, HookType.AFTER)
    from . import cpu_mode

    if cpu_mode.wanted():
        cpu_mode.install_extend_hook()


def _after_is_fully_idle(result, *args, **kwargs):
    """The scheduler found nothing to run: let the disk writer work."""
    if result:
        mark_idle()
    return result


def _route_enable_lmcache(original, ctx):
    from sglang.srt.runtime_context import get_memory

    if get_memory().enable_lmcache and not ctx.disable_radix_cache:
        return build_cache(ctx)
    return original(ctx)


def pool_view(kvcache) -> KVPoolView:
    """The engine's view of SGLang's KV pool (MHA or MLA)."""
    if hasattr(kvcache, "k_buffer") and hasattr(kvcache, "v_buffer"):
        return KVPoolView("mha", tuple(kvcache.k_buffer) + tuple(kvcache.v_buffer))
    if hasattr(kvcache, "kv_buffer"):
        return KVPoolView("mla", tuple(kvcache.kv_buffer))
    raise ValueError(f"lmcache-sgl does not support the KV pool {type(kvcache).__name__}")


def model_identity(hf_config, model: torch.nn.Module) -> bytes:
    """Fingerprint of the model: its config (minus paths), its weights' names and shapes,
    and a sample of each weight's values (so two fine-tunes of one architecture differ)."""
    config = {k: v for k, v in hf_config.to_dict().items() if k not in ("_name_or_path", "_commit_hash", "transformers_version")}
    shapes, sample = {}, hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shapes[name] = tuple(param.shape)
            head = param.detach().reshape(-1)[:64].to("cpu", torch.float32)
            sample.update(name.encode() + head.numpy().tobytes())
    shapes["__values__"] = (sample.hexdigest(),)
    return model_fingerprint(config, shapes)


def build_cache(ctx):
    """Radix-cache factory: SGLang's TreeCacheBuildContext -> LMCacheRadixCache."""
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.runtime_context import get_memory

    from .radix_cache import LMCacheRadixCache

    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("lmcache-sgl supports full-attention models only (no sliding-window or Mamba layers)")
    config_file = get_memory().lmcache_config_file
    config = load_config(config_file, page_size=ctx.params.page_size)
    pool = pool_view(ctx.params.token_to_kv_pool_allocator.get_kvcache())
    runner = ctx.tp_worker.model_runner
    on_gpu = pool.buffers[0].is_cuda
    engine = CacheEngine(
        config, pool, model_identity(ctx.model_config.hf_config, runner.model),
        tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, device_stream=getattr(runner, "forward_stream", None) if on_gpu else None,
    )
    ctx.params.tree_components = (ComponentType.FULL,)
    # Spilling needs each evicted node's tokens; the Rust TreeCore of 0.5.23 does not
    # expose them (node_by_id is not ported), the Python one does.
    ctx.params.tree_core_backend = "python"
    cache = LMCacheRadixCache(ctx.params, engine)
    install_exporter(engine.metrics)
    stack = engine.stack
    tiers = []
    if stack.cpu is not None:
        tiers.append(f"cpu {stack.cpu.capacity_bytes / 1e9:.2f} GB")
    if stack.disk is not None:
        tiers.append(f"disk {stack.disk.path} {stack.disk.capacity_bytes / 1e9:.2f} GB ({len(stack.disk)} chunks found)")
    log.info(
        "lmcache-sgl active: config %s, chunk_size %d, layout %s %s, tiers: %s, %s",
        config_file or "(defaults and LMCACHE_* variables)", config.chunk_size, pool.describe(), pool.dtype,
        ", ".join(tiers), config.write_policy,
    )
    return cache
