"""Blending: the partial forward that makes reused segment KV usable in a new prompt.

A request's blend region is tokens [begin, end) right after its exact prefix: some of
them hold KV loaded from stored segments (re-rotated to their new positions), the rest
(gaps: separators, unseen text) hold nothing yet. `Blender.run` computes, layer by
layer, the tokens the strategy picks and writes their K/V into the pool over the loaded
ones; every other token keeps its loaded KV. Attention reads the whole context [0, end)
from the pool, so the prefix before `begin` must already be there.

Strategies (config `blend_strategy`):
  reuse       only the gaps are computed (recompute ratio 0);
  cacheblend  every token is computed up to the K/V projection of the last of
              `blend_check_layers` (whose fresh K/V all replace the loaded ones); there
              the tokens whose fresh K/V deviate most from the loaded K/V (squared error
              summed over the check layers) are picked, `blend_recompute_ratios` of the
              reused tokens, and only they (and the gaps) go on through that layer's
              attention and MLP and the later layers (CacheBlend, EuroSys 2025). A ratio
              of 1.0 computes everything: a full prefill of the region;
  boundary    the first `blend_boundary_tokens` tokens of each run of reused KV that was
              computed contiguously (and the gaps) are computed at every layer (EPIC).

Supported: Llama-family decoder models (Llama, Mistral, Qwen2) with MHA KV, TP = 1,
page size 1; `blendable` names what is missing otherwise. The sub-modules are called
directly (SGLang's layer forward keeps its residual in the forward batch) and attention
is torch's SDPA over K/V gathered from the pool by slot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import BLEND_STRATEGIES, LMCacheConfig
from ..engine import KVPoolView

SUPPORTED_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QUERY_BLOCK = 1024  # queries per masked attention call: bounds the [heads, queries, keys] scores


def blendable(model, pool: KVPoolView, tp_size: int, page_size: int) -> str | None:
    """Why blending cannot run with this model and pool, or None when it can."""
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        return f"model {name} (blending supports {', '.join(SUPPORTED_MODELS)})"
    if pool.kind != "mha":
        return f"a {pool.kind} KV pool (blending needs plain MHA K/V)"
    if tp_size != 1:
        return f"--tp {tp_size} (blending runs at TP 1)"
    if page_size != 1:
        return f"--page-size {page_size} (blending needs page size 1)"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) != pool.num_layers:
        return "a model whose layers do not match the KV pool (pipeline parallelism?)"
    return None


@dataclass(frozen=True)
class Strategy:
    name: str  # reuse, cacheblend or boundary
    ratio: float = 0.0  # cacheblend
    check_layers: tuple[int, ...] = (1,)  # cacheblend, sorted
    boundary: int = 0  # boundary

    @classmethod
    def from_config(cls, config: LMCacheConfig) -> Strategy:
        return cls(
            config.blend_strategy,
            config.blend_recompute_ratios,
            tuple(sorted(set(config.blend_check_layers))),
            config.blend_boundary_tokens,
        )

    def overridden(self, values: Mapping[str, Any]) -> Strategy:
        """This strategy with a request's overrides (keys strategy, recompute_ratio,
        check_layers, boundary_tokens); ValueError naming a bad one."""
        unknown = set(values) - {"strategy", "recompute_ratio", "check_layers", "boundary_tokens"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        name = values.get("strategy", self.name)
        ratio = values.get("recompute_ratio", self.ratio)
        layers = values.get("check_layers", self.check_layers)
        boundary = values.get("boundary_tokens", self.boundary)
        if name not in BLEND_STRATEGIES:
            raise ValueError(f"strategy {name!r} is not one of {BLEND_STRATEGIES}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"recompute_ratio {ratio!r} is not a number in 0..1")
        if not isinstance(layers, (list, tuple)) or not layers or not all(_is_count(i) for i in layers):
            raise ValueError(f"check_layers {layers!r} is not a list of layers")
        if not _is_count(boundary):
            raise ValueError(f"boundary_tokens {boundary!r} is not an integer >= 0")
        return Strategy(name, float(ratio), tuple(sorted(set(layers))), boundary)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Blender:
    def __init__(self, model, pool: KVPoolView) -> None:
        self.model, self.pool = model, pool
        self.layers = model.model.layers

    @torch.inference_mode()
    def run(
        self,
        strategy: Strategy,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        begin: int,
        reused: torch.Tensor,
        runs: Sequence[int],
    ) -> int:
        """Compute the blend region [begin, len(tokens)) with `strategy`.

        tokens, slots: token ids and pool slots of the context [0, end); reused: bool
        [end - begin], True where the slot holds loaded KV; runs: region offsets where a
        run of contiguously computed reused KV starts. Returns how many region tokens
        were computed at the last layer."""
        if strategy.name == "cacheblend" and strategy.check_layers[-1] >= len(self.layers):
            raise ValueError(f"check layers {list(strategy.check_layers)}: the model has {len(self.layers)} layers")
        device = self.pool.buffers[0].device
        n = len(tokens) - begin
        always = ~reused  # gaps: no KV until computed here
        if strategy.name == "boundary":
            always = always.clone()
            for start in runs:
                always[start : start + strategy.boundary] = True
        full_until = strategy.check_layers[-1] if strategy.name == "cacheblend" else -1
        active = torch.arange(n) if full_until >= 0 else always.nonzero().flatten()
        hidden = self.model.model.embed_tokens(tokens[begin:].to(device)[active.to(device)])
        slots, deviation = slots.to(device), torch.zeros(n, dtype=torch.float32)
        for index, layer in enumerate(self.layers):
            if not len(active):
                break
            checking = strategy.name == "cacheblend" and index in strategy.check_layers
            pick = None
            if index == full_until:

                def pick(deviation: torch.Tensor) -> torch.Tensor:
                    return self._picked(strategy.ratio, deviation, reused, always)

            hidden, active = self._layer(
                layer, index, hidden, slots, begin, active, reused, deviation if checking else None, pick
            )
        return len(active)

    @staticmethod
    def _picked(ratio: float, deviation: torch.Tensor, reused: torch.Tensor, always: torch.Tensor) -> torch.Tensor:
        """The gaps and the `ratio` share of reused tokens that deviate most."""
        count = math.ceil(ratio * int(reused.sum()))
        keep = always.clone()
        if count:
            scores = torch.where(reused, deviation, torch.tensor(-1.0))
            keep[torch.topk(scores, count).indices] = True
        return keep

    def _layer(self, layer, index: int, hidden, slots, begin: int, active, reused, deviation, pick):
        """One decoder layer for the `active` region tokens: their K/V go into the pool.
        With `deviation` (a check layer) the squared error of their fresh K/V against the
        loaded K/V (0 for gaps) is added to it; `pick` (the last check layer) then names
        the region tokens that go on, and only they run this layer's attention and MLP
        (K/V need no more than the projection). Returns the hidden states and positions
        (region offsets) of the tokens that go on."""
        attn = layer.self_attn
        k_buf, v_buf = self.pool.buffers[index], self.pool.buffers[self.pool.num_layers + index]
        positions = (active + begin).to(hidden.device)
        qkv, _ = attn.qkv_proj(layer.input_layernorm.forward_native(hidden))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        k = k.reshape(len(active), *k_buf.shape[1:]).to(k_buf.dtype)
        v = v.reshape(len(active), *v_buf.shape[1:]).to(v_buf.dtype)
        where = slots[begin + active.to(slots.device)]
        if deviation is not None:
            old_k, old_v = k_buf[where].float(), v_buf[where].float()
            error = ((k.float() - old_k) ** 2).sum((1, 2)) + ((v.float() - old_v) ** 2).sum((1, 2))
            deviation[active] += torch.where(reused[active].to(error.device), error, torch.zeros_like(error)).cpu()
        k_buf[where], v_buf[where] = k, v
        if pick is not None:
            rows = pick(deviation)[active]
            device_rows = rows.to(hidden.device)
            q, hidden, positions, active = q[device_rows], hidden[device_rows], positions[device_rows], active[rows]
            if not len(active):
                return hidden, active
        out = self._attend(attn, q, positions, k_buf, v_buf, slots)
        o, _ = attn.o_proj(out)
        hidden = hidden + o
        return hidden + layer.mlp(layer.post_attention_layernorm.forward_native(hidden)), active

    @staticmethod
    def _attend(attn, q, positions, k_buf, v_buf, slots) -> torch.Tensor:
        """Causal attention of the queries (at ascending `positions`) over the context in
        `slots`: a block of queries reads the keys up to its last position only, and
        queries at positions 0, 1, ... (no prefix) take one causal call, as SGLang's own
        extend does."""
        heads, dim = attn.num_heads, attn.head_dim
        keys = int(positions[-1]) + 1
        k = k_buf[slots[:keys]].transpose(0, 1).to(q.dtype)  # [kv_heads, keys, dim]
        v = v_buf[slots[:keys]].transpose(0, 1).to(q.dtype)
        key_pos = torch.arange(keys, device=q.device)
        out = torch.empty(len(q), heads * dim, dtype=q.dtype, device=q.device)
        block = len(q) if keys == len(q) else QUERY_BLOCK  # keys == len(q): positions 0, 1, ...
        for lo in range(0, len(q), block):
            hi = min(lo + block, len(q))
            last = int(positions[hi - 1]) + 1
            query = q[lo:hi].view(hi - lo, heads, dim).transpose(0, 1)
            causal = keys == len(q)
            mask = None if causal or hi - lo == 1 else key_pos[None, :last] <= positions[lo:hi, None]
            o = F.scaled_dot_product_attention(
                query, k[:, :last], v[:, :last], attn_mask=mask, is_causal=causal, scale=attn.scaling, enable_gqa=True
            )
            out[lo:hi] = o.transpose(0, 1).reshape(hi - lo, heads * dim)
        return out
