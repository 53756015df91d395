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
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import ops
from .codec import ChunkLayout
from .config import LMCacheConfig
from .keys import Namespace, chunk_keys, chunk_spans
from .storage import CpuTier, DiskTier, TierStack

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


_ENGINES: "weakref.WeakSet[CacheEngine]" = weakref.WeakSet()


def mark_idle() -> None:
    """The server has nothing to run: background disk writes may use the CPU (until the
    next request reaches the cache, which clears the flag)."""
    for engine in list(_ENGINES):
        engine.idle.set()


@dataclass(frozen=True)
class Chunk:
    key: bytes
    start: int  # first token
    end: int  # one past the last token


def build_tier_stack(config: LMCacheConfig, slab_bytes: int, idle: threading.Event | None = None) -> TierStack:
    """The tiers the config asks for; at least one must be enabled. Disk writes wait for
    `idle` (when given) so they do not compete with the model for the CPU."""
    cpu = CpuTier(config.cpu_bytes, slab_bytes) if config.local_cpu and config.cpu_bytes >= slab_bytes else None
    disk = None
    if config.disk_path:
        disk = DiskTier(config.disk_path, config.disk_bytes, codec=config.disk_codec, level=config.zstd_level, gate=idle)
    if cpu is None and disk is None:
        raise ValueError(
            "lmcache config enables no tier: set local_cpu with max_local_cpu_size of at least one chunk "
            f"({slab_bytes / 1e9:.3f} GB), or local_disk"
        )
    return TierStack(cpu, disk, write_through=config.write_policy == "write_through")


class CacheEngine:
    def __init__(
        self, config: LMCacheConfig, pool: KVPoolView, model_id: bytes, *, tp_rank: int = 0, tp_size: int = 1,
        kv_dtype: str | None = None, stack: TierStack | None = None, device_stream=None,
    ) -> None:
        """kv_dtype: the logical KV dtype (SGLang's --kv-cache-dtype; fp8 formats are
        stored as uint8), default the pool's storage dtype. device_stream: the stream
        SGLang's forward runs on (GPU pools); pool reads and writes are ordered on it."""
        self.config = config
        self.device_stream = device_stream
        self.idle = threading.Event()  # set while the server has nothing to run (mark_idle)
        _ENGINES.add(self)
        self.pool = pool
        self.chunk_size = config.chunk_size
        self.stack = stack or build_tier_stack(config, pool.layout(config.chunk_size).nbytes, self.idle)
        self._namespace = Namespace(model_id, kv_dtype or pool.dtype, pool.describe(), tp_rank, tp_size)
        self._seeds: dict[tuple[str | None, str | None], bytes] = {}
        self.loaded_chunks = 0
        self.stored_chunks = 0
        self.failed_loads = 0

    def set_model(self, model_id: bytes) -> None:
        """The model's weights changed (e.g. a weight update): from now on keys live in the
        namespace of `model_id`, so nothing stored under the old weights is found again."""
        self._namespace = dataclasses.replace(self._namespace, model=model_id)
        self._seeds.clear()

    def seed(self, extra_key: str | None = None, cache_salt: str | None = None) -> bytes:
        """Namespace digest for one (extra_key, cache_salt) pair; keys never cross namespaces."""
        pair = (extra_key, cache_salt)
        if pair not in self._seeds:
            ns = Namespace(**{**self._namespace.__dict__, "extra_key": extra_key, "cache_salt": cache_salt})
            self._seeds[pair] = ns.digest()
        return self._seeds[pair]

    def chunks(self, seed: bytes, tokens: Sequence[int] | np.ndarray, *, partial: bool | None = None) -> list[Chunk]:
        """The chunks of `tokens` from token 0: whole ones, plus the trailing partial one
        when `partial` (default: the config's save_unfull_chunk)."""
        partial = self.config.save_unfull_chunk if partial is None else partial
        keys = chunk_keys(seed, tokens, self.chunk_size, partial=partial)
        spans = chunk_spans(len(tokens), self.chunk_size, partial=partial)
        return [Chunk(key, start, end) for key, (start, end) in zip(keys, spans)]

    def hit_length(self, chunks: Sequence[Chunk], known: int = 0) -> int:
        """Tokens from 0 covered by present chunks, trusting the first `known` tokens
        (already on the device) without asking the tiers for them."""
        first = next((i for i, c in enumerate(chunks) if c.end > known), len(chunks))
        present = self.stack.lookup([c.key for c in chunks[first:]])
        return chunks[first + present - 1].end if present else known

    # ---- pool <-> tiers -----------------------------------------------------------
    def store(self, chunks: Sequence[Chunk], slots: torch.Tensor) -> int:
        """Store every chunk not yet stored whose tokens all have slots (slots[t] holds
        token t). Returns how many were stored."""
        stored = 0
        for c in chunks:
            if c.end > len(slots) or self.stack.contains(c.key):
                continue
            chunk_slots = slots[c.start : c.end]
            if self.stack.store(c.key, self.pool.layout(c.end - c.start), lambda buf: self._gather(chunk_slots, buf)):
                stored += 1
        self.stored_chunks += stored
        return stored

    def load(self, chunks: Sequence[Chunk], begin: int, slots: torch.Tensor) -> bool:
        """Write the KV of tokens [begin, begin + len(slots)) into `slots` from stored
        chunks. True only if every token was written; on False, the slots hold garbage."""
        end = begin + len(slots)
        wanted = [c for c in chunks if c.end > begin and c.start < end]
        datas = self.stack.get_many([(c.key, self.pool.layout(c.end - c.start)) for c in wanted])
        try:
            if any(data is None for data in datas):
                self.failed_loads += 1
                return False
            pieces = []
            for c, data in zip(wanted, datas):
                lo, hi = max(c.start, begin), min(c.end, end)
                src = data.view(len(self.pool.buffers), c.end - c.start, -1)
                pieces.append(src if (lo, hi) == (c.start, c.end) else src[:, lo - c.start : hi - c.start].contiguous())
            self._scatter(slots, pieces)
            self.loaded_chunks += len(wanted)
            return True
        finally:
            for c, data in zip(wanted, datas):
                if data is not None:
                    self.stack.release(c.key)

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
                ops.scatter(self.pool.buffers, slots[start : start + count], src.to(device))
                start += count
            torch.cuda.current_stream(device).synchronize()  # the slabs are released after we return

    def clear(self) -> None:
        """Drop every stored chunk from every tier."""
        if self.stack.cpu is not None:
            self.stack.cpu.clear()
        if self.stack.disk is not None:
            self.stack.disk.clear()

    def stats(self) -> dict:
        return {
            "loaded_chunks": self.loaded_chunks,
            "stored_chunks": self.stored_chunks,
            "failed_loads": self.failed_loads,
            "tiers": self.stack.stats(),
        }
