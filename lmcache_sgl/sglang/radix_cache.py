"""LMCacheRadixCache: SGLang's UnifiedRadixCache with the engine's tiers behind it.

The protocol (SGLang 0.5.23, see mem_cache/base_prefix_cache.py and
managers/schedule_policy.py):
  match_prefix   device hit from the tree, then how far the tiers reach beyond it; the
                 extra tokens are promised as host_hit_length and their chunks are
                 protected in the tiers. No pool side effects: SGLang calls it often.
  init_load_back once the request is admitted: allocate slots, load the promised
                 chunks into them, return exactly the promised length, or 0 (recompute).
  prefix_device_indices  device path + the loaded slots; the request owns them and
                 checkpoint inserts them into the tree like computed KV.
  _evict_device_leaf     before a leaf's slots are freed, its chunks go to the tiers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from ..engine import CacheEngine, Chunk

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

log = logging.getLogger("lmcache_sgl")


@dataclass
class _PendingLoad:
    """A request's promised tier hit: tokens [device_len, hit_len) of `chunks`."""

    chunks: list[Chunk]
    device_len: int
    hit_len: int
    protected_in: list[str] = field(default_factory=list)  # tier of each protected chunk; [] once released
    slots: Optional[torch.Tensor] = None  # set once loaded


def _token_array(token_ids) -> np.ndarray:
    return np.frombuffer(token_ids, dtype=np.int64) if token_ids.itemsize == 8 else np.asarray(token_ids)


class LMCacheRadixCache(UnifiedRadixCache):
    def __init__(self, params: CacheInitParams, engine: CacheEngine) -> None:
        self.engine = engine
        self._pending: dict[str, _PendingLoad] = {}  # by request id
        self.failed_loads = 0
        super().__init__(params)  # calls reset()

    # ---- lookup ------------------------------------------------------------------
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req, key = params.req, params.key
        if req is None or self.disable or key.is_bigram:
            return result
        self.engine.idle.clear()  # a request is here: background writes step aside
        pending = self._pending.get(req.rid)
        if pending is not None and pending.slots is not None:
            return result  # loaded already; the slots reach the request through prefix_device_indices
        device_len = result.device_prefix_len
        chunks = self._chunks(key)
        hit = self._tier_hit(chunks, len(key), device_len)
        if pending is not None and (pending.device_len, pending.hit_len) != (device_len, hit):
            self._forget(req.rid)
            pending = None
        if hit <= device_len:
            return result
        if pending is None:
            pending = self._protect(chunks, device_len, hit)
            if pending is None:
                return result
            self._pending[req.rid] = pending
        return result._replace(
            last_host_node=result.last_device_node,
            best_match_node=result.last_device_node,
            host_hit_length=pending.hit_len - device_len,
            full_kv_hit_length=max(result.full_kv_hit_length, pending.hit_len),
        )

    def _chunks(self, key) -> list[Chunk]:
        seed = self.engine.seed(key.extra_key, key.cache_salt)
        return self.engine.chunks(seed, _token_array(key.token_ids))

    def _tier_hit(self, chunks: list[Chunk], limit: int, device_len: int) -> int:
        """Page-aligned prefix length (within the key's limit) that device + tiers cover."""
        hit = min(self.engine.hit_length(chunks, known=device_len), limit)
        return hit - hit % self.page_size

    def _protect(self, chunks: list[Chunk], device_len: int, hit: int) -> Optional[_PendingLoad]:
        needed = [c for c in chunks if c.end > device_len and c.start < hit]
        keys = [c.key for c in needed]
        tiers = self.engine.stack.protect(keys)
        if len(tiers) < len(keys):  # a chunk vanished since the lookup
            self.engine.stack.unprotect(keys, tiers)
            return None
        return _PendingLoad(needed, device_len, hit, tiers)

    def _unprotect(self, pending: _PendingLoad) -> None:
        self.engine.stack.unprotect([c.key for c in pending.chunks], pending.protected_in)
        pending.protected_in = []

    def _forget(self, rid: str) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None:
            self._unprotect(pending)

    # ---- load --------------------------------------------------------------------
    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        pending = self._pending.get(req.rid) if req is not None else None
        if pending is None or pending.slots is not None or params.host_hit_length != pending.hit_len - pending.device_len:
            return 0, params.best_match_node
        count = params.host_hit_length
        allocator = self.token_to_kv_pool_allocator
        started = time.perf_counter()
        if allocator.available_size() < count:
            self.evict(EvictParams(num_tokens=count))
        slots = allocator.alloc(count)
        allocated = time.perf_counter()
        loaded = slots is not None and self.engine.load(pending.chunks, pending.device_len, slots)
        self._unprotect(pending)
        if not loaded:
            if slots is not None:
                allocator.free(slots)
            self._pending.pop(req.rid, None)
            self.failed_loads += 1
            log.warning("lmcache-sgl: could not load %d tokens for request %s; recomputing them", count, req.rid)
            return 0, params.best_match_node
        pending.slots = slots
        log.info(
            "lmcache-sgl: loaded %d tokens after a device hit of %d for request %s (allocation %.1f ms, load %.1f ms)",
            count, pending.device_len, req.rid, 1e3 * (allocated - started), 1e3 * (time.perf_counter() - allocated),
        )
        return count, params.best_match_node

    def load_back_is_cache_owned(self) -> bool:
        return False  # loaded slots belong to the request until checkpoint inserts them

    def prefix_device_indices(self, req: Req) -> torch.Tensor:
        path = self.path_device_indices(req.last_node)
        pending = self._pending.get(req.rid)
        if len(path) < req.prefix_len and pending is not None and pending.slots is not None:
            path = torch.cat([path[: pending.device_len], pending.slots.to(path.device, path.dtype)])
        assert len(path) >= req.prefix_len, (req.rid, len(path), req.prefix_len)
        return path[: req.prefix_len]

    # ---- store -------------------------------------------------------------------
    def checkpoint(self, req: Req, *, up_to: int, **kwargs) -> None:
        self.engine.idle.clear()
        self._store_request(req, up_to)
        super().checkpoint(req, up_to=up_to, **kwargs)
        pending = self._pending.get(req.rid)
        if pending is not None and pending.slots is not None:
            del self._pending[req.rid]  # the loaded slots are the tree's now

    def _store_request(self, req: Req, up_to: int) -> None:
        """Once the prompt is computed, store its trailing partial chunk (so a revisit of
        the same prompt hits up to its last token); with save_on_checkpoint, also every
        whole chunk (of prompt and decode tokens with save_decode_cache)."""
        if self.disable or req.kv.req_pool_idx is None:
            return
        config, prompt_len = self.engine.config, len(req.origin_input_ids)
        limit = up_to if config.save_decode_cache else min(up_to, prompt_len)
        if not config.save_on_checkpoint and limit < prompt_len:
            return
        seed = self.engine.seed(req.extra_key, req.cache_salt)
        chunks = self.engine.chunks(seed, np.asarray(req.full_untruncated_fill_ids[:limit], dtype=np.int64))
        if not config.save_on_checkpoint:
            chunks = [c for c in chunks[-1:] if c.end - c.start < self.engine.chunk_size]
        if chunks:
            slots = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :limit].to(torch.int64)
            self.engine.store(chunks, slots)

    def _evict_device_leaf(self, node_id, tracker):
        try:
            self._spill(node_id)
        except Exception:  # a failed spill costs a recompute later, never the eviction
            log.exception("lmcache-sgl: spilling an evicted node failed")
        return super()._evict_device_leaf(node_id, tracker)

    def _spill(self, node_id) -> None:
        """Hand the chunks of the leaf's path that reach into the leaf to the engine."""
        node = self.tree_core.node_by_id(node_id)
        if node.key is None or node.key.is_bigram:
            return
        parts, walk = [], node
        while walk is not None and walk.key is not None and len(walk.key) > 0:
            parts.append(_token_array(walk.key.raw_token_ids()))
            walk = walk.parent
        tokens = np.concatenate(parts[::-1]) if parts else np.empty(0, np.int64)
        node_start = len(tokens) - len(parts[0]) if parts else 0
        seed = self.engine.seed(node.key.extra_key, node.key.cache_salt)
        chunks = [c for c in self.engine.chunks(seed, tokens) if c.end > node_start]
        if chunks:
            self.engine.store(chunks, self.path_device_indices(node_id))

    # ---- lifecycle ---------------------------------------------------------------
    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._forget(req.rid)

    def release_aborted_request(self, handle) -> None:
        super().release_aborted_request(handle)
        self._forget(handle.rid)

    def reset(self) -> None:
        """Empty the device tree (e.g. /flush_cache); the tiers keep their data."""
        for rid in list(getattr(self, "_pending", {})):
            self._forget(rid)
        super().reset()

    def clear_storage_backend(self) -> bool:
        """Empty the tiers (SGLang's /clear_hicache_storage_backend)."""
        self.engine.clear()
        return True

    # With --enable-lmcache the scheduler drives an asynchronous storage prefetch; the
    # tiers are local, so lookups are answered in match_prefix and these are no-ops.
    def prefetch_from_storage(self, *args, **kwargs) -> None:
        return None

    def check_prefetch_progress(self, handle) -> bool:
        return True

    def check_hicache_events(self) -> None:
        return None

    def has_pending_cache_operations(self) -> bool:
        return False

    def is_backuped(self, node_id) -> bool:
        return True
