"""The RoPE of a live SGLang model, in the form that re-rotating cached K needs.

K cached at positions p.. and reused at p + delta.. is rotated once more by delta *
inv_freq (ops.rope_angles, ops.rerotate_). That is exact only where the rope's angle is
position * inv_freq (plus a constant) and its cos/sin cache holds plain cos and sin. Those
ropes are accepted by exact class, since a subclass may change either:

- RotaryEmbedding (SGLang's base; its position_start only adds a constant angle):
  inv_freq = _compute_inv_freq(base).
- Llama3RotaryEmbedding: its _compute_inv_freq(base) rescales the frequencies per band,
  still one fixed frequency per pair; the cache is the base class's.
- LinearScalingRotaryEmbedding with one scaling factor s: its cache is built at positions
  p / s, so inv_freq = _compute_inv_freq(base) / s.

Any other rope raises ValueError naming its class, among them:

- YaRN (YaRNScalingRotaryEmbedding, DeepseekScalingRotaryEmbedding, YaRNScalingMRotaryEmbedding)
  and Phi3LongRoPEScaledRotaryEmbedding: their cache multiplies cos and sin by an mscale,
  and their _compute_inv_freq takes a scaling factor or rescale factors, not the base, so
  the spec would be re-derived from each class's internals rather than read from it.
- DynamicNTKScalingRotaryEmbedding, DynamicNTKAlphaRotaryEmbedding: the enlarged base is
  computed inside _compute_cos_sin_cache and kept nowhere, so it would have to be copied.
- LinearScalingRotaryEmbedding with several factors: a per-request offset (LoRA) picks one.
- MRotaryEmbedding and its subclasses (multimodal (t, h, w) positions),
  Llama4VisionRotaryEmbedding (2-D patch positions), DualChunkRotaryEmbedding
  (chunk-relative positions): no single position delta moves a segment.
- Gemma4RotaryEmbedding (cross-mixed halves, zero-padded frequencies), FourierRotaryEmbedding
  (learned mixing of frequencies) and anything not an SGLang RotaryEmbedding (e.g. aiter's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from sglang.srt.layers.rotary_embedding.base import LinearScalingRotaryEmbedding, RotaryEmbedding
from sglang.srt.layers.rotary_embedding.rope_variant import Llama3RotaryEmbedding
from sglang.srt.layers.utils.common import PPMissingLayer


class RopeSpec(NamedTuple):
    """What re-rotation needs: the angle of pair i at position p is p * inv_freq[i]."""

    inv_freq: torch.Tensor  # fp32, CPU, [rotary_dim / 2]
    rotary_dim: int
    neox: bool  # pairs (x[i], x[i + rotary_dim / 2]); else (x[2i], x[2i + 1])


def rope_spec_of(rope: torch.nn.Module) -> RopeSpec:
    """The RopeSpec of one SGLang rotary embedding; ValueError for a rope it cannot describe."""
    kind = type(rope).__name__
    if type(rope) in (RotaryEmbedding, Llama3RotaryEmbedding):
        scale = 1.0
    elif type(rope) is LinearScalingRotaryEmbedding:
        if len(rope.scaling_factors) != 1:
            raise ValueError(
                f"{kind} with scaling factors {rope.scaling_factors}: a per-request offset picks one, "
                "so cached K cannot be re-rotated"
            )
        scale = float(rope.scaling_factors[0])
    else:
        raise ValueError(
            f"RoPE type {kind} is not supported for re-rotating cached K (supported: RotaryEmbedding, "
            "Llama3RotaryEmbedding, LinearScalingRotaryEmbedding with one factor)"
        )
    inv_freq = rope._compute_inv_freq(rope.base).detach().to("cpu", torch.float64) / scale
    return RopeSpec(inv_freq.float(), int(rope.rotary_dim), bool(rope.is_neox_style))


def rope_spec(model: torch.nn.Module) -> RopeSpec:
    """The RopeSpec of a live SGLang Llama-family model, read from every layer's
    model.model.layers[i].self_attn.rotary_emb (layers of other pipeline ranks are skipped).

    Raises ValueError when the layout is not that, a rope is refused (see the module
    docstring), or two layers' specs differ.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama-family layouts are read")
    spec, first = None, -1
    for i, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):
            continue
        rope = getattr(getattr(layer, "self_attn", None), "rotary_emb", None)
        if rope is None:
            raise ValueError(f"{type(model).__name__} layer {i} has no self_attn.rotary_emb")
        this = rope_spec_of(rope)
        if spec is None:
            spec, first = this, i
        elif (this.rotary_dim, this.neox) != (spec.rotary_dim, spec.neox) or not torch.equal(
            this.inv_freq, spec.inv_freq
        ):
            raise ValueError(f"layers {first} and {i} of {type(model).__name__} have different RoPE")
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no layers on this rank")
    return spec
