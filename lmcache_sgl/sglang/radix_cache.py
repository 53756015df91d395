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

A request that already holds a KV row (a streaming session's lent row, a later chunk)
takes its prefix from that row, so the tiers are never offered for it.

Failures: nothing raised in these paths (by the engine or here) reaches the scheduler.
A lookup that fails is a miss, a load that fails frees its slots and is a recompute, a
store or spill that fails is skipped; each is counted in the engine's metrics
(`adapter_failures_total{reason}`) and logged at most once a minute per kind.

Tensor parallelism: the TP ranks of one scheduler run these calls identically (SGLang
broadcasts the requests and schedules them the same way on every rank: the same
match_prefix calls in the same order, and init_load_back, checkpoint and on_release
are rank_consensus points), but each rank has its own tiers. The promised hit length
and each load's success are therefore agreed by a MIN over the TP group before they
are acted on, so every rank builds the same batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from ..engine import CacheEngine, Chunk
from ..lograte import RateLimitedLog
from .shutdown import close_engine

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from ..storage.stack import Protection
    from .blend import Strategy
    from .blending import Blending

log = logging.getLogger("lmcache_sgl")


class TPGroup:
    """The TP ranks that share one scheduler's decisions (SGLang's CPU group of them,
    `CacheInitParams.tp_cache_group`). `min` is a collective: every rank must call it at
    the same point; with one rank (or no group) it exchanges nothing."""

    def __init__(self, group: torch.distributed.ProcessGroup | None) -> None:
        self.group = group
        self.size = 1 if group is None else torch.distributed.get_world_size(group=group)

    def min(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())


@dataclass
class _PendingLoad:
    """A request's agreed tier hit: tokens [device_len, hit_len) of `chunks`, for keys of
    up to `key_len` tokens; the chunks stay protected while `protection` is held. With
    blending, the stored segment pieces found after hit_len (protected while
    `segment_protection` is held) extend the promise to their end."""

    chunks: list[Chunk]
    device_len: int
    hit_len: int
    key_len: int
    protection: Protection | None
    slots: torch.Tensor | None = None  # set once loaded
    segments: list[Chunk] = field(default_factory=list)
    segment_protection: Protection | None = None
    tokens: np.ndarray | None = None  # the key's token ids, with segments
    strategy: Strategy | None = None  # the request's blend strategy, with segments
    blended: bool = False  # set once blended: approximate KV, never inserted or stored as a prefix

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else self.hit_len


def _token_array(token_ids) -> np.ndarray:
    return np.frombuffer(token_ids, dtype=np.int64) if token_ids.itemsize == 8 else np.asarray(token_ids)


class LMCacheRadixCache(UnifiedRadixCache):
    def __init__(
        self, params: CacheInitParams, engine: CacheEngine, tp: TPGroup | None = None, blending: Blending | None = None
    ) -> None:
        """tp: the ranks to agree with; default SGLang's group in `params.tp_cache_group`.
        blending: non-prefix reuse (enable_blending), at TP 1 only."""
        self.engine = engine
        self.blending = blending
        self.tp = tp if tp is not None else TPGroup(params.tp_cache_group)
        self._pending: dict[str, _PendingLoad] = {}  # by request id
        self._errors = RateLimitedLog(log, "lmcache-sgl")
        super().__init__(params)  # calls reset()

    @property
    def failures(self) -> dict[str, float]:
        """Failures so far by kind (lookup, load, store, spill, ...)."""
        return self.engine.metrics.snapshot()["adapter_failures_total"]

    @property
    def failed_loads(self) -> int:
        """Promised loads that were declined (the request recomputed those tokens)."""
        return int(self.failures.get("load", 0))

    def _failed(self, kind: str, error) -> None:
        """Count a failure of this kind (snake_case); log it (at most one line a minute per kind)."""
        self.engine.metrics.inc("adapter_failures_total", reason=kind)
        self._errors.warn(kind, "%s failed: %r", kind.replace("_", " "), error)

    def _agree(self, value: int, kind: str) -> int:
        """MIN of `value` over the TP ranks; 0 (no hit, no load) if the exchange fails."""
        try:
            return self.tp.min(value)
        except Exception as e:
            self._failed(f"tp_agreement_on_{kind}", e)
            return 0

    def _busy(self) -> None:
        """A request is here: background writes step aside."""
        try:
            self.engine.idle.clear()
        except Exception as e:
            self._failed("idle_signal", e)

    # ---- lookup ------------------------------------------------------------------
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req, key = params.req, params.key
        if req is None or self.disable or key.is_bigram:
            return result
        self._busy()
        pending = self._pending.get(req.rid)
        if pending is not None and pending.slots is not None:
            return result  # loaded already; the slots reach the request through prefix_device_indices
        if req.kv.holds_kv:  # its row holds its prefix (a lent session row, a later chunk)
            self._forget(req.rid)
            return result
        device_len = result.device_prefix_len
        if pending is None or pending.device_len != device_len or pending.key_len < len(key):
            self._forget(req.rid)
            pending = self._agreed_hit(key, device_len)
            if self.blending is not None and self.blending.eligible(req):
                pending = self._with_segments(req, key, device_len, pending)
            if pending is not None:
                self._pending[req.rid] = pending
        hit = device_len if pending is None else min(pending.end, len(key))
        hit -= hit % self.page_size
        if hit <= device_len:
            return result
        return result._replace(
            last_host_node=result.last_device_node,
            best_match_node=result.last_device_node,
            host_hit_length=hit - device_len,
            full_kv_hit_length=max(result.full_kv_hit_length, hit),
        )

    def _agreed_hit(self, key, device_len: int) -> _PendingLoad | None:
        """The hit beyond `device_len` that the tiers of every TP rank hold, its chunks
        protected here; None (nothing protected) if there is none. A collective."""
        pending = None
        try:
            chunks = self._chunks(key)
            hit = self._tier_hit(chunks, len(key), device_len)
            if hit > device_len:
                pending = self._protect(chunks, device_len, hit, len(key))
        except Exception as e:
            self._failed("lookup", e)
        agreed = self._agree(device_len if pending is None else pending.hit_len, "hit_length")
        if pending is not None and agreed <= device_len:
            self._unprotect(pending)
            return None
        if pending is not None:
            pending.hit_len = agreed  # chunks past it stay protected until the request is done
        return pending

    def _with_segments(self, req: Req, key, device_len: int, pending: _PendingLoad | None) -> _PendingLoad | None:
        """`pending` extended by the stored segment pieces after its hit, protected."""
        assert self.blending is not None
        begin = device_len if pending is None else pending.hit_len
        try:
            tokens = _token_array(key.token_ids).copy()  # kept: a view would pin SGLang's growing array
            found = self.blending.find(self.engine.seed(key.extra_key, key.cache_salt), tokens, begin, len(key))
            protection = self.engine.protect(found) if found else None
        except Exception as e:
            self._failed("segment_lookup", e)
            return pending
        if protection is None:
            return pending
        if pending is None:
            pending = _PendingLoad([], device_len, device_len, len(key), None)
        pending.segments, pending.segment_protection, pending.tokens = found, protection, tokens
        pending.strategy = self.blending.strategy_for(req)
        return pending

    def _chunks(self, key) -> list[Chunk]:
        seed = self.engine.seed(key.extra_key, key.cache_salt)
        return self.engine.chunks(seed, _token_array(key.token_ids))

    def _tier_hit(self, chunks: list[Chunk], limit: int, device_len: int) -> int:
        """Page-aligned prefix length (within the key's limit) that device + tiers cover.
        Counted in the lookup metrics: a request is looked up again only when its device
        hit changes or its key grows (match_prefix reuses the agreed hit otherwise)."""
        hit = min(self.engine.hit_length(chunks, known=device_len, record=True), limit)
        return hit - hit % self.page_size

    def _protect(self, chunks: list[Chunk], device_len: int, hit: int, key_len: int) -> _PendingLoad | None:
        needed = [c for c in chunks if c.end > device_len and c.start < hit]
        protection = self.engine.protect(needed)
        if protection is None:  # a chunk vanished since the lookup
            return None
        return _PendingLoad(needed, device_len, hit, key_len, protection)

    def _unprotect(self, pending: _PendingLoad) -> None:
        handles = (pending.protection, pending.segment_protection)
        pending.protection = pending.segment_protection = None
        for handle in handles:
            if handle is not None:
                try:
                    self.engine.unprotect(handle)
                except Exception as e:
                    self._failed("unprotect", e)

    def _forget(self, rid: str) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None:
            self._unprotect(pending)

    # ---- load --------------------------------------------------------------------
    def init_load_back(self, params: InitLoadBackParams):
        req, count = params.req, params.host_hit_length
        pending = self._pending.get(req.rid) if req is not None else None
        if pending is None or pending.slots is not None or not 0 < count <= pending.end - pending.device_len:
            return 0, params.best_match_node
        started = time.perf_counter()
        slots, loaded = self._load(pending, count, params.best_match_node)
        loaded = self._agree(int(loaded), "load") == 1  # every rank loaded, or none uses its load
        self._unprotect(pending)
        if not loaded:
            self._free(slots)
            self._pending.pop(req.rid, None)
            self._failed("load", f"{count} tokens for request {req.rid}, recomputed")
            return 0, params.best_match_node
        pending.slots, pending.hit_len = slots, min(pending.hit_len, pending.device_len + count)
        log.info(
            "lmcache-sgl: %s %d tokens after a device hit of %d for request %s (%.1f ms)",
            "blended" if pending.blended else "loaded",
            count,
            pending.device_len,
            req.rid,
            1e3 * (time.perf_counter() - started),
        )
        return count, params.best_match_node

    def _load(self, pending: _PendingLoad, count: int, node) -> tuple[torch.Tensor | None, bool]:
        """Allocate `count` slots and fill them: the prefix chunks from this rank's tiers,
        then (blending) the segment region after them. (slots or None, success)."""
        allocator, slots = self.token_to_kv_pool_allocator, None
        prefix = min(count, pending.hit_len - pending.device_len)
        try:
            if allocator.available_size() < count:
                self.evict(EvictParams(num_tokens=count))
            slots = allocator.alloc(count)
            if slots is None:
                return None, False
            if prefix and not self.engine.load(pending.chunks, pending.device_len, slots[:prefix]):
                return slots, False
            if count > prefix:
                return slots, self._blend(pending, count, node, slots)
            return slots, True
        except Exception as e:
            self._failed("load_attempt", e)
            return slots, False

    def _blend(self, pending: _PendingLoad, count: int, node, slots: torch.Tensor) -> bool:
        """Load the segment pieces that end within the first `count` promised tokens and
        blend the region after the prefix hit (blending.py)."""
        assert self.blending is not None and pending.tokens is not None and pending.strategy is not None
        end = pending.device_len + count
        pieces = [c for c in pending.segments if c.end <= end]
        if not pieces:
            return False
        path = self.path_device_indices(node)[: pending.device_len].to(torch.int64)
        context = torch.cat([path.to(slots.device), slots.to(torch.int64)])
        pending.blended = self.blending.apply(pending.strategy, pending.tokens[:end], context, pending.hit_len, pieces)
        return pending.blended

    def _free(self, slots: torch.Tensor | None) -> None:
        if slots is None:
            return
        try:
            self.token_to_kv_pool_allocator.free(slots)
        except Exception as e:
            self._failed("free_slots", e)

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
        self._busy()
        pending = self._pending.get(req.rid)
        if pending is not None and pending.blended:
            self._checkpoint_blended(req, pending, up_to)
            return
        if pending is not None and pending.slots is not None:
            self._reuse_stored_tail(req, pending.hit_len, up_to)
        try:
            self._store_request(req, up_to)
        except Exception as e:
            self._failed("store", e)
        super().checkpoint(req, up_to=up_to, **kwargs)
        pending = self._pending.get(req.rid)
        if pending is not None and pending.slots is not None:
            del self._pending[req.rid]  # the loaded slots are the tree's now

    def _checkpoint_blended(self, req: Req, pending: _PendingLoad, up_to: int) -> None:
        """Blended KV is approximate: nothing of this request enters the tree or the prefix
        tiers (as with a disabled tree, only a finished request's components are cleaned
        up; release frees its slots). The segments it computed itself (not the reused
        ones) are stored."""
        try:
            self._store_segments(req, min(up_to, len(req.origin_input_ids)), skip=pending.segments)
        except Exception as e:
            self._failed("segment_store", e)
        if req.finished():
            for component in self._components_tuple:
                component.cleanup_after_caching_req(req, is_finished=True)

    def _store_segments(self, req: Req, limit: int, skip: list[Chunk]) -> None:
        if self.blending is None or self.disable or req.kv.req_pool_idx is None:
            return
        seed = self.engine.seed(req.extra_key, req.cache_salt)
        tokens = np.asarray(req.full_untruncated_fill_ids[:limit], dtype=np.int64)
        slots = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :limit].to(torch.int64)
        self.engine.store_segments(seed, tokens, slots, skip)

    def _reuse_stored_tail(self, req: Req, begin: int, up_to: int) -> None:
        """After a device hit, SGLang's checkpoint points the tokens it recomputed past the
        hit that the tree already holds (the prompt's last token, computed again for its
        logits) at the tree's KV. Do the same after a tier hit: write the KV the tiers hold
        for tokens [begin, up_to) over the recomputed KV in the request's slots, so decode
        attends over the KV a device hit gives, bit for bit. Up to the page-aligned end
        SGLang inserts; the length is agreed over the TP ranks (a collective). A failure
        keeps the recomputed KV (valid, not bit-identical); a partial write mixes valid KV."""
        chunks, end, limit = [], begin, up_to - up_to % self.page_size
        try:
            if limit > begin:
                seed = self.engine.seed(req.extra_key, req.cache_salt)
                chunks = self.engine.chunks(seed, np.asarray(req.full_untruncated_fill_ids[:up_to], dtype=np.int64))
                end = min(self.engine.hit_length(chunks, known=begin), limit)
        except Exception as e:
            self._failed("stored_tail_lookup", e)
        end = self._agree(end, "stored_tail")
        if end <= begin:
            return
        slots = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, begin:end].to(torch.int64)
        if not self.engine.load(chunks, begin, slots):
            self._failed("stored_tail_load", f"tokens {begin}..{end} of request {req.rid} stay recomputed")

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
        self._store_segments(req, min(limit, prompt_len), skip=[])

    def _evict_device_leaf(self, node_id, tracker):
        try:
            self._spill(node_id)
        except Exception as e:  # a failed spill costs a recompute later, never the eviction
            self._failed("spill", e)
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
        try:
            super().on_release(req, checkpointed=checkpointed)
        finally:
            self._forget(req.rid)

    def release_aborted_request(self, handle) -> None:
        try:
            super().release_aborted_request(handle)
        finally:
            self._forget(handle.rid)

    def reset(self) -> None:
        """Empty the device tree (e.g. /flush_cache); the tiers keep their data."""
        for rid in list(getattr(self, "_pending", {})):
            self._forget(rid)
        super().reset()

    def release_host_resources(self) -> None:
        """A graceful shutdown: write what the cold tiers have queued, in bounded time."""
        super().release_host_resources()
        close_engine(self.engine, self.engine.config.shutdown_flush_timeout, "graceful shutdown")

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
