"""The SGLang plugin (entry point group `sglang.srt.plugins`), run in every SGLang process.

It registers the radix-cache backend `lmcache_sgl` (`--radix-cache-backend lmcache_sgl`),
routes `--enable-lmcache` to it, and on a machine without a GPU installs CPU
development mode's attention fix (cpu_mode.py). It also hooks SGLang's weight updates:
the tiers pause while the weights change and move to the new weights' namespace at the
cache flush that follows. Only SGLang's plugin and hook API is used.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
import weakref

from ..config import load_config
from ..engine import CacheEngine, KVPoolView
from ..metrics import install_exporter
from .blending import blending_for
from .identity import adapter_digest, model_identity
from .pools import kv_dtype_name, pool_view
from .shutdown import flush_on_signals

log = logging.getLogger("lmcache_sgl")
BACKEND = "lmcache_sgl"
SUPPORTED_SGLANG = "0.5.23"

_WEIGHT_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
# Every SchedulerWeightUpdaterManager method after which the served weights may differ.
WEIGHT_CHANGES = (
    "update_weights_from_disk",
    "update_weights_from_distributed",
    "update_weights_from_tensor",
    "update_weights_from_ipc",
    "begin_weight_update",
    "end_weight_update",
    "resume_memory_occupation",
)


def register() -> None:
    """Plugin entry point."""
    found = importlib.metadata.version("sglang")
    if found != SUPPORTED_SGLANG:
        log.error(
            "lmcache-sgl needs sglang==%s but sglang %s is installed: lmcache-sgl is NOT active",
            SUPPORTED_SGLANG,
            found,
        )
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND, build_cache)
    HookRegistry.register(
        "sglang.srt.mem_cache.registry.default_radix_cache_factory", _route_enable_lmcache, HookType.AROUND
    )
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.is_fully_idle", _after_is_fully_idle, HookType.AFTER)
    for method in WEIGHT_CHANGES:
        HookRegistry.register(f"{_WEIGHT_UPDATER}.{method}", _before_weight_change, HookType.BEFORE)
        HookRegistry.register(f"{_WEIGHT_UPDATER}.{method}", _after_weight_change, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.flush_cache", _after_flush_cache, HookType.AFTER)
    from . import cpu_mode

    if cpu_mode.wanted():
        cpu_mode.install_extend_hook()


def _after_is_fully_idle(result, scheduler, *args, **kwargs):
    """The scheduler found nothing to run: let the cold tiers' writers work."""
    engine = getattr(getattr(scheduler, "tree_cache", None), "engine", None)
    if result and engine is not None:
        engine.idle.set()
    return result


def _route_enable_lmcache(original, ctx):
    from sglang.srt.runtime_context import get_memory

    if get_memory().enable_lmcache and not ctx.disable_radix_cache:
        return build_cache(ctx)
    return original(ctx)


# ---- weight updates ------------------------------------------------------------------
def _served_engine(scheduler) -> ServedEngine | None:
    engine = getattr(getattr(scheduler, "tree_cache", None), "engine", None)
    return engine if isinstance(engine, ServedEngine) else None


def _before_weight_change(manager, *args, **kwargs):
    """The weights are about to change: the tiers neither find nor store anything until
    the next successful cache flush (the device tree may hold KV of the old weights)."""
    engine = _served_engine(manager.scheduler)
    if engine is not None:
        engine.paused = True


def _after_weight_change(result, manager, *args, **kwargs):
    engine = _served_engine(manager.scheduler)
    if engine is not None and engine.paused:
        log.warning(
            "lmcache-sgl: the weights changed and the cache was not flushed: "
            "the tiers stay paused until /flush_cache succeeds"
        )
    return result


def _after_flush_cache(flushed, scheduler, *args, **kwargs):
    """A successful flush after a weight change: no KV of the old weights is left on the
    device, so the tiers resume in the namespace of a fresh fingerprint of the weights."""
    engine = _served_engine(scheduler)
    if flushed and engine is not None and engine.paused:
        runner = scheduler.tp_worker.model_runner
        started = time.perf_counter()
        model_id = model_identity(runner.model_config.hf_config, runner.model)
        engine.set_model(model_id)
        engine.paused = False
        log.info(
            "lmcache-sgl: the weights changed: new model fingerprint %s (%.2f s); "
            "KV stored under the old weights is never used",
            model_id.hex(),
            time.perf_counter() - started,
        )
    return flushed


class ServedEngine(CacheEngine):
    """The CacheEngine of a served model: a LoRA adapter is named by a digest of its
    weights, not by its id."""

    def __init__(self, *args, lora_manager=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_manager = lora_manager  # SGLang's LoRAManager, or None without LoRA
        self._adapter_digests: weakref.WeakKeyDictionary[object, bytes] = weakref.WeakKeyDictionary()

    def seed(self, extra_key: str | None = None, cache_salt: str | None = None) -> bytes:
        return super().seed(self._adapter_key(extra_key), cache_salt)

    def _adapter_key(self, extra_key: str | None) -> str | None:
        """SGLang's radix key appends the request's lora_id to extra_key (Req.__init__);
        replace a loaded adapter's id by the digest of that adapter's weights."""
        if extra_key is None or self.lora_manager is None:
            return extra_key
        for lora_id, adapter in list(self.lora_manager.loras.items()):
            if extra_key.endswith(lora_id):
                digest = self._adapter_digests.get(adapter)
                if digest is None:
                    digest = self._adapter_digests[adapter] = adapter_digest(adapter)
                return f"{extra_key[: len(extra_key) - len(lora_id)]}\0lora:{digest.hex()}"
        return extra_key


def served_engine(ctx, config, kvcache, pool: KVPoolView) -> ServedEngine:
    """The engine for the model `ctx` (SGLang's TreeCacheBuildContext) serves: its
    namespace holds a fingerprint of every byte of the weights and the logical KV dtype;
    LoRA adapters are named by their weights."""
    runner = ctx.tp_worker.model_runner
    started = time.perf_counter()
    model_id = model_identity(ctx.model_config.hf_config, runner.model)
    log.info("lmcache-sgl: model fingerprint %s (%.2f s)", model_id.hex(), time.perf_counter() - started)
    return ServedEngine(
        config,
        pool,
        model_id,
        tp_rank=ctx.tp_rank,
        tp_size=ctx.tp_size,
        kv_dtype=kv_dtype_name(kvcache, ctx.server_args),
        device_stream=getattr(runner, "forward_stream", None) if pool.buffers[0].is_cuda else None,
        lora_manager=getattr(runner, "lora_manager", None),
    )


def build_cache(ctx):
    """Radix-cache factory: SGLang's TreeCacheBuildContext -> LMCacheRadixCache."""
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.runtime_context import get_memory

    from .radix_cache import LMCacheRadixCache

    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("lmcache-sgl supports full-attention models only (no sliding-window or Mamba layers)")
    config_file = get_memory().lmcache_config_file
    config = load_config(config_file, page_size=ctx.params.page_size)
    kvcache = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    pool = pool_view(kvcache)
    config.validated(ctx.params.page_size, chunk_bytes=pool.layout(config.chunk_size).nbytes)
    engine = served_engine(ctx, config, kvcache, pool)
    ctx.params.tree_components = (ComponentType.FULL,)
    # Spilling needs each evicted node's tokens; the Rust TreeCore of 0.5.23 does not
    # expose them (node_by_id is not ported), the Python one does.
    ctx.params.tree_core_backend = "python"
    cache = LMCacheRadixCache(ctx.params, engine, blending=blending_for(ctx, config, engine, pool))
    install_exporter(engine.metrics)
    flush_on_signals(engine, config.shutdown_flush_timeout)
    log.info(
        "lmcache-sgl active: config %s, chunk_size %d, layout %s %s, tiers: %s, %s",
        config_file or "(defaults and LMCACHE_* variables)",
        config.chunk_size,
        pool.describe(),
        kv_dtype_name(kvcache, ctx.server_args),
        engine.stack.describe(),
        config.write_policy,
    )
    return cache
