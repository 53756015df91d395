"""Non-prefix reuse for LMCacheRadixCache: which requests blend, and doing it.

`Blending.find` (from match_prefix: cheap, no pool side effects) names the stored segment
pieces after a request's exact prefix; `Blending.apply` (from init_load_back, once the
request is admitted and its slots are allocated) loads them at their new positions and
runs the strategy's partial forward (blend.py). Built at start by `blending_for`, which
refuses a model or setting blending cannot serve, naming it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..config import LMCacheConfig
from ..engine import CacheEngine, Chunk, KVPoolView
from ..lograte import RateLimitedLog
from .blend import Blender, Strategy, blendable
from .rope import RopeSpec, rope_spec

log = logging.getLogger("lmcache_sgl")


OVERRIDE = "lmcache_blend"  # the key of a request's strategy overrides in sampling_params.custom_params


class Blending:
    def __init__(self, engine: CacheEngine, blender: Blender, rope: RopeSpec, strategy: Strategy) -> None:
        self.engine, self.blender, self.rope, self.strategy = engine, blender, rope, strategy
        self._errors = RateLimitedLog(log, "lmcache-sgl")

    def strategy_for(self, req) -> Strategy:
        """The server's strategy, with the request's `custom_params["lmcache_blend"]`
        overrides; bad overrides are counted and logged, and the server's is used."""
        custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
        values = custom.get(OVERRIDE) if isinstance(custom, dict) else None
        if values is None:
            return self.strategy
        try:
            if not isinstance(values, dict):
                raise ValueError(f"must be an object, not {values!r}")
            return self.strategy.overridden(values)
        except ValueError as e:
            self.engine.metrics.inc("blend_requests_total", reason="bad_override")
            self._errors.warn(
                "blend_override", "request %s: %s: %s; the server's strategy is used", req.rid, OVERRIDE, e
            )
            return self.strategy

    @staticmethod
    def eligible(req) -> bool:
        """Requests whose KV the token ids alone decide (no input embeddings, no images)."""
        return getattr(req, "input_embeds", None) is None and not getattr(req, "multimodal_inputs", None)

    def find(self, seed: bytes, tokens: np.ndarray, begin: int, end: int) -> list[Chunk]:
        """Stored segment pieces inside tokens[begin:end], in order."""
        return self.engine.find_segments(seed, tokens, begin, end)

    def apply(
        self, strategy: Strategy, tokens: np.ndarray, slots: torch.Tensor, begin: int, pieces: list[Chunk]
    ) -> bool:
        """Blend the region [begin, len(tokens)) of a context whose tokens [0, begin) are in
        the pool: slots[t] holds token t. False (the slots hold garbage) if a piece could
        not be loaded; raises on other failures."""
        end, started = len(tokens), time.perf_counter()
        piece_slots = torch.cat([slots[c.start : c.end] for c in pieces])
        shifts = self.engine.load_segments(pieces, piece_slots, self.rope)
        metrics = self.engine.metrics
        if shifts is None:
            metrics.inc("blend_requests_total", reason="segment_load_failed")
            return False
        loaded = time.perf_counter()
        reused = torch.zeros(end - begin, dtype=torch.bool)
        for c in pieces:
            reused[c.start - begin : c.end - begin] = True
        runs = [
            c.start - begin
            for i, c in enumerate(pieces)
            if i == 0 or pieces[i - 1].end != c.start or shifts[i - 1] != shifts[i]
        ]
        token_ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        computed = self.blender.run(strategy, token_ids, slots, begin, reused, runs)
        metrics.inc("blend_requests_total", reason="blended")
        metrics.inc("blend_recomputed_tokens_total", computed)
        metrics.inc("blend_reused_tokens_total", max(0, end - begin - computed))
        log.info(
            "lmcache-sgl: blend %s of tokens %d..%d: %d reused tokens loaded in %.1f ms, "
            "%d computed through the last layer in %.1f ms",
            strategy.name,
            begin,
            end,
            int(reused.sum()),
            1e3 * (loaded - started),
            computed,
            1e3 * (time.perf_counter() - loaded),
        )
        return True


def blending_for(ctx, config: LMCacheConfig, engine: CacheEngine, pool: KVPoolView) -> Blending | None:
    """The Blending of a server (SGLang's TreeCacheBuildContext) with enable_blending, or
    None without it; raises ValueError naming what blending cannot serve."""
    if not config.enable_blending:
        return None
    model = ctx.tp_worker.model_runner.model
    why = blendable(model, pool, ctx.tp_size, ctx.params.page_size)
    if why is not None:
        raise ValueError(f"lmcache-sgl: enable_blending does not support {why}; set enable_blending: false")
    try:
        rope = rope_spec(model)
    except ValueError as e:
        raise ValueError(f"lmcache-sgl: enable_blending does not support {e}; set enable_blending: false") from e
    separator = None
    if config.blend_separator is not None:
        separator = _separator_ids(getattr(ctx.tp_worker, "tokenizer", None), config.blend_separator)
    engine.start_segments(separator)
    strategy = Strategy.from_config(config)
    if strategy.check_layers[-1] >= pool.num_layers:
        raise ValueError(
            f"lmcache config key 'blend_check_layers' = {list(strategy.check_layers)}: "
            f"the model has {pool.num_layers} layers"
        )
    log.info(
        "lmcache-sgl blending: strategy %s, segments %s",
        strategy,
        f"separated by {config.blend_separator!r} = tokens {separator}" if separator else "found by rolling hash",
    )
    return Blending(engine, Blender(model, pool), rope, strategy)


def _separator_ids(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError(
            "lmcache-sgl: blend_special_str needs the model's tokenizer (--skip-tokenizer-init is set); "
            "set blend_special_str: null to find segments without a separator"
        )
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"lmcache-sgl: blend_special_str {text!r} tokenizes to nothing")
    return ids
