"""CacheEngine: tokens in, chunk keys and KV out.

The engine sees SGLang's KV pool as a list of per-layer buffers (a KVPoolView) and
moves whole chunks between it and the TierStack: `store` gathers the KV of a token
range from pool slots into the tiers, `load` scatters stored chunks back into slots.
Keys are prefix-chained from token 0 (keys.py), so a chunk is only ever found for the
exact tokens that precede it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import ops
from .codec import ChunkLayout
from .config import LMCacheConfig
from .keys import Chunk, Namespace, chunk_keys, chunk_spans
from .lograte import RateLimitedLog
from .metrics import CacheMetrics
from .segments import SegmentIndex
from .storage import IdleSignal, build_stack
from .storage.stack import Hit, Protection

if TYPE_CHECKING:
    from .sglang.rope import RopeSpec

log = logging.getLogger("lmcache_sgl")


@dataclass(frozen=True)
class KVPoolView:
    """SGLang's KV pool as per-layer buffers of [slots, heads, dim].

    kind "mha": buffers = K of every layer, then V of every layer; "mla": one
    latent buffer per layer. A chunk of n tokens has layout (2, L, n, H, D) or (L, n, 1, D).
    """

    kind: str
    buffers: tuple[torch.Tensor, ...]

    @property
    def dtype(self) -> str:
        return str(self.buffers[0].dtype).removeprefix("torch.")

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.buffers[0].shape[1:])

    @property
    def num_layers(self) -> int:
        return len(self.buffers) // (2 if self.kind == "mha" else 1)

    def layout(self, num_tokens: int) -> ChunkLayout:
        lead = (2, self.num_layers) if self.kind == "mha" else (self.num_layers,)
        return ChunkLayout(self.kind, self.dtype, (*lead, num_tokens, *self.row_shape))

    def describe(self) -> str:
        return f"{self.kind}:L{self.num_layers}:" + "x".join(map(str, self.row_shape))


MAX_SEEDS = 4096  # (extra_key, cache_salt) pairs whose namespace digests are kept


class CacheEngine:
    def __init__(
        self,
        config: LMCacheConfig,
        pool: KVPoolView,
        model_id: bytes,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        kv_dtype: str | None = None,
        device_stream=None,
    ) -> None:
        """kv_dtype: the logical KV dtype (SGLang's --kv-cache-dtype; fp8 formats are
        stored as uint8), default the pool's storage dtype. device_stream: the stream
        SGLang's forward runs on (GPU pools); pool reads and writes are ordered on it."""
        self.config = config
        self.device_stream = device_stream
        self.idle = IdleSignal()  # set while the server has nothing to run; cold tiers' writes wait for it
        self.metrics = CacheMetrics()
        self.pool = pool
        self.chunk_size = config.chunk_size
        self.stack = build_stack(
            config,
            pool.layout(config.chunk_size).nbytes,
            metrics=self.metrics,
            idle=self.idle,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.metrics.set_gauges(self._gauges)
        self._namespace = Namespace(model_id, kv_dtype or pool.dtype, pool.describe(), tp_rank, tp_size)
        self._seeds: OrderedDict[tuple[str | None, str | None], bytes] = OrderedDict()  # LRU, at most MAX_SEEDS
        self._errors = RateLimitedLog(log, "lmcache-sgl")
        self._closed = False
        self.segments: SegmentIndex | None = None  # set by start_segments (blending)
        self.paused = False  # while set (e.g. while the weights change), the tiers find and store nothing

    def _gauges(self) -> dict[str, dict[str, float]]:
        usage = self.stack.usage()
        return {
            "usage_bytes": {tier: used for tier, (used, _) in usage.items()},
            "capacity_bytes": {tier: capacity for tier, (_, capacity) in usage.items()},
        }

    def set_model(self, model_id: bytes) -> None:
        """The model's weights changed (e.g. a weight update): from now on keys live in the
        namespace of `model_id`, so nothing stored under the old weights is found again."""
        self._namespace = dataclasses.replace(self._namespace, model=model_id)
        self._seeds.clear()

    def seed(self, extra_key: str | None = None, cache_salt: str | None = None) -> bytes:
        """Namespace digest for one (extra_key, cache_salt) pair; keys never cross namespaces."""
        pair = (extra_key, cache_salt)
        seed = self._seeds.get(pair)
        if seed is None:
            seed = dataclasses.replace(self._namespace, extra_key=extra_key, cache_salt=cache_salt).digest()
            self._seeds[pair] = seed
            if len(self._seeds) > MAX_SEEDS:
                self._seeds.popitem(last=False)
        else:
            self._seeds.move_to_end(pair)
        return seed

    def chunks(self, seed: bytes, tokens: Sequence[int] | np.ndarray, *, partial: bool | None = None) -> list[Chunk]:
        """The chunks of `tokens` from token 0: whole ones, plus the trailing partial one
        when `partial` (default: the config's save_unfull_chunk)."""
        partial = self.config.save_unfull_chunk if partial is None else partial
        keys = chunk_keys(seed, tokens, self.chunk_size, partial=partial)
        spans = chunk_spans(len(tokens), self.chunk_size, partial=partial)
        return [Chunk(key, start, end) for key, (start, end) in zip(keys, spans, strict=True)]

    def hit_length(self, chunks: Sequence[Chunk], known: int = 0, *, record: bool = False) -> int:
        """Tokens from 0 covered by present chunks, trusting the first `known` tokens
        (already on the device) without asking the tiers for them. `record`: count this
        lookup in the metrics (once per request, not once per call). While paused: `known`."""
        if self.paused:
            return known
        first = next((i for i, c in enumerate(chunks) if c.end > known), len(chunks))
        tiers = self.stack.lookup_tiers([c.key for c in chunks[first:]])
        if record and first < len(chunks):
            self.metrics.inc("lookup_requested_tokens_total", chunks[-1].end - known)
            hits: Counter[str] = Counter()  # one increment per tier, not per chunk (this is the match path)
            for c, tier in zip(chunks[first:], tiers, strict=False):  # tiers: the leading hits only
                hits[tier] += c.end - max(c.start, known)
            for tier, tokens in hits.items():
                self.metrics.inc("lookup_hit_tokens_total", tokens, tier=tier)
        return chunks[first + len(tiers) - 1].end if tiers else known

    def protect(self, chunks: Sequence[Chunk]) -> Protection | None:
        """Keep the chunks from eviction until unprotect(handle), so a promised load can
        happen; None (nothing kept) if one of them is gone."""
        return self.stack.protect([c.key for c in chunks])

    def unprotect(self, handle: Protection) -> None:
        self.stack.unprotect(handle)

    # ---- pool <-> tiers -----------------------------------------------------------
    def store(self, chunks: Sequence[Chunk], slots: torch.Tensor, *, lane: str = "prefix") -> int:
        """Store every chunk not yet stored whose tokens all have slots (slots[t] holds
        token t), each with its start as the position its KV was computed at, in the CPU
        tier's `lane` ("prefix", or "segment" for position-independent segments). Returns
        how many were stored; a chunk that fails is skipped, counted and logged, never
        raised. While paused: nothing."""
        if self.paused:
            return 0
        started, stored = time.perf_counter(), 0
        for c in chunks:
            try:
                if c.end > len(slots) or self.stack.contains(c.key):
                    continue
                chunk_slots = slots[c.start : c.end]
                layout = self.pool.layout(c.end - c.start)
                stored += self.stack.store(
                    c.key,
                    layout,
                    lambda buf, chunk_slots=chunk_slots: self._gather(chunk_slots, buf),
                    position=c.start,
                    lane=lane,
                )
            except Exception as e:
                self.metrics.inc("dropped_writes_total", reason="error")
                self._errors.warn("store", "a chunk store failed and was skipped: %r", e)
        if stored:
            self.metrics.observe("store_seconds", time.perf_counter() - started)
        return stored

    def load(self, chunks: Sequence[Chunk], begin: int, slots: torch.Tensor) -> bool:
        """Write the KV of tokens [begin, begin + len(slots)) into `slots` from stored
        chunks. True only if every token was written; on False (a miss, or any failure,
        which is counted and logged, never raised) the slots hold garbage."""
        end = begin + len(slots)

        def part(c: Chunk, hit: Hit, src: torch.Tensor) -> torch.Tensor:
            lo, hi = max(c.start, begin), min(c.end, end)
            return src[:, lo - c.start : hi - c.start]  # a view: scatter_many copies it from the slab

        return self._load_into([c for c in chunks if c.end > begin and c.start < end], slots, part)

    def _load_into(self, wanted: Sequence[Chunk], slots: torch.Tensor, part, lane: str = "prefix") -> bool:
        """Fetch every chunk of `wanted` (a chunk promoted from a cold tier goes into the CPU
        tier's `lane`) and scatter `part(chunk, hit, bytes as [B, n, row])` of each, one
        after another, into `slots`. False on any miss or failure (counted, logged); the
        hits are released either way."""
        started = time.perf_counter()
        hits: list[Hit | None] = []
        pieces: list[torch.Tensor] = []
        try:
            hits = self.stack.get_many([(c.key, self.pool.layout(c.end - c.start)) for c in wanted], lane=lane)
            loaded = [hit for hit in hits if hit is not None]
            if len(loaded) < len(hits):
                self.metrics.inc("failed_loads_total", reason="miss")
                return False
            for c, hit in zip(wanted, loaded, strict=True):
                pieces.append(part(c, hit, hit.data.view(len(self.pool.buffers), c.end - c.start, -1)))
            self._scatter(slots, pieces)
        except Exception as e:
            self.metrics.inc("failed_loads_total", reason="error")
            self._errors.warn("load", "a load failed; its tokens are recomputed: %r", e)
            return False
        finally:
            for c, got in zip(wanted, hits, strict=False):  # hits is empty if get_many raised
                if got is not None:
                    self.stack.release(c.key)
        tokens: Counter[str] = Counter()
        for hit, piece in zip(loaded, pieces, strict=True):
            tokens[hit.tier] += piece.shape[1]
        for tier, count in tokens.items():
            self.metrics.inc("loaded_tokens_total", count, tier=tier)
        self.metrics.observe("load_seconds", time.perf_counter() - started)
        return True

    # ---- segments (non-prefix reuse) ------------------------------------------------
    def start_segments(self, separator: Sequence[int] | None) -> None:
        """Keep and find segments from now on: delimited by the token ids `separator`, or
        (None) found anywhere by rolling hash (segments.py)."""
        self.segments = SegmentIndex(self.chunk_size, self.config.blend_min_tokens, separator)

    def find_segments(self, seed: bytes, tokens: np.ndarray, begin: int, end: int) -> list[Chunk]:
        """The stored segment pieces inside tokens[begin:end], in order (a hint: a later
        load may still miss). None without start_segments or while paused."""
        if self.segments is None or self.paused:
            return []
        return [c for c in self.segments.candidates(seed, tokens, begin, end) if self.stack.lookup([c.key])]

    def store_segments(self, seed: bytes, tokens: np.ndarray, slots: torch.Tensor, skip: Sequence[Chunk] = ()) -> int:
        """Store the segment pieces of a computed prompt (slots[t] holds token t) that are
        not stored yet, except any overlapping a chunk of `skip` (KV that was reused, not
        computed here). Returns how many were stored; never raises."""
        if self.segments is None or self.paused:
            return 0
        pieces = [
            c
            for c in self.segments.storable(seed, tokens)
            if c.end <= len(slots) and not any(c.start < s.end and s.start < c.end for s in skip)
        ]
        stored = self.store(pieces, slots, lane="segment")
        self.segments.remember(tokens, pieces)
        return stored

    def load_segments(self, pieces: Sequence[Chunk], slots: torch.Tensor, rope: RopeSpec) -> list[int] | None:
        """Write the stored KV of each piece into its slots (slots[i] holds the i-th token
        of the pieces, in order), K rotated from the position it was computed at to the
        piece's start. Returns each piece's shift (start - stored position), or None
        (counted, logged, never raised) when any piece was not written."""
        shifts: list[int] = []
        lead = (2, self.pool.num_layers)

        def moved(c: Chunk, hit: Hit, src: torch.Tensor) -> torch.Tensor:
            shift = c.start - hit.position
            shifts.append(shift)
            if shift == 0:
                return src
            kv = src.clone().view(self.pool.buffers[0].dtype).view(*lead, c.end - c.start, *self.pool.row_shape)
            cos, sin = ops.rope_angles(shift, rope.inv_freq)
            ops.rerotate_(kv[0], cos.to(kv.device), sin.to(kv.device), rope.rotary_dim, rope.neox)
            return kv.view(torch.uint8).view(src.shape)

        return shifts if self._load_into(pieces, slots, moved, lane="segment") else None

    def _on_device(self):
        if self.device_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.device_stream)

    def _gather(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        device = self.pool.buffers[0].device
        if device.type == "cpu":
            ops.gather(self.pool.buffers, slots, out)
            return
        with self._on_device():
            staging = torch.empty(out.numel(), dtype=torch.uint8, device=device)
            ops.gather(self.pool.buffers, slots.to(device), staging)
            out.copy_(staging)  # synchronous: the slots may be reused as soon as we return

    def _scatter(self, slots: torch.Tensor, pieces: Sequence[torch.Tensor]) -> None:
        """Write the chunk buffers `pieces`, one after another, into `slots` (distinct)."""
        device = self.pool.buffers[0].device
        if device.type == "cpu":
            ops.scatter_many(self.pool.buffers, slots, pieces)
            return
        with self._on_device():
            slots, start = slots.to(device), 0
            for src in pieces:
                count = src.shape[1]
                ops.scatter(self.pool.buffers, slots[start : start + count], src.to(device).contiguous())
                start += count
            torch.cuda.current_stream(device).synchronize()  # the slabs are released after we return

    def clear(self) -> None:
        """Drop every stored chunk from every tier (protected ones stay)."""
        self.stack.clear()

    def close(self, timeout: float | None = None) -> bool:
        """Write what the cold tiers have queued (at most `timeout` seconds) and stop
        them; False if writes were given up. Only the first call does anything."""
        if self._closed:
            return True
        self._closed = True
        return self.stack.close(timeout)

    def stats(self) -> dict:
        return self.metrics.snapshot()
