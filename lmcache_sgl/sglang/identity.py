"""Identities of what changes KV bytes: a model's weights and a LoRA adapter's.

Every byte counts: a fingerprint is xxh3-128 over the config and every byte of every
parameter, buffer and KV scale, so two models that differ anywhere never share keys.
"""

from __future__ import annotations

import json

import torch
import xxhash

from ..keys import model_fingerprint

_SLICE_BYTES = 64 << 20  # bytes of a device tensor copied to the CPU at a time
_KV_SCALES = ("k_scale", "v_scale", "k_scale_float", "v_scale_float")  # RadixAttention's fp8 KV scales


def tensors_digest(named_tensors) -> bytes:
    """xxh3-128 of the names, dtypes, shapes and every byte of (name, tensor) pairs, in
    order. CPU tensors are hashed in place; others are copied to the CPU in slices of
    64 MiB (CUDA: through two pinned buffers, so one slice copies while the last hashes)."""
    h, staging = xxhash.xxh3_128(), None
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        h.update(len(header).to_bytes(8, "little") + header)
        data = tensor.reshape(-1).view(torch.uint8)
        if data.device.type == "cpu":
            h.update(data.numpy())
        elif data.device.type == "cuda":
            if staging is None:
                torch.cuda.synchronize(data.device)  # the weights may just have been written on another stream
                staging = [torch.empty(_SLICE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            _hash_cuda(h, data, staging)
        else:
            for start in range(0, data.numel(), _SLICE_BYTES):
                h.update(data[start : start + _SLICE_BYTES].cpu().numpy())
    return h.digest()


def _hash_cuda(h, data: torch.Tensor, staging: list[torch.Tensor]) -> None:
    pending = None  # (pinned slice, its copy's event)
    with torch.cuda.device(data.device):
        for i, start in enumerate(range(0, data.numel(), _SLICE_BYTES)):
            piece = data[start : start + _SLICE_BYTES]
            buf = staging[i % 2][: piece.numel()]
            buf.copy_(piece, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            if pending is not None:
                pending[1].synchronize()
                h.update(pending[0].numpy())
            pending = (buf, event)
        if pending is not None:
            pending[1].synchronize()
            h.update(pending[0].numpy())


def _kv_scales(model: torch.nn.Module):
    """(name, tensor) of the KV scales attention layers hold outside their parameters
    (floats, or tensors set by load_kv_cache_scales)."""
    for module_name, module in model.named_modules():
        for attr in _KV_SCALES:
            value = getattr(module, attr, None)
            if isinstance(value, (int, float)):
                value = torch.tensor(float(value), dtype=torch.float64)
            if isinstance(value, torch.Tensor):
                yield f"{module_name}.{attr}", value


def model_identity(hf_config, model: torch.nn.Module) -> bytes:
    """Fingerprint of the model: its config (minus paths) and every byte of every
    parameter, buffer and KV scale; any change to one of them changes it."""
    config = {
        k: v
        for k, v in hf_config.to_dict().items()
        if k not in ("_name_or_path", "_commit_hash", "transformers_version")
    }
    with torch.no_grad():
        named = [(f"param:{n}", t) for n, t in model.named_parameters()]
        named += [(f"buffer:{n}", t) for n, t in model.named_buffers()]
        named += [(f"kv_scale:{n}", t) for n, t in _kv_scales(model)]
        return model_fingerprint(config, tensors_digest(named))


def adapter_digest(adapter) -> bytes:
    """Digest of a loaded SGLang LoRAAdapter: its PEFT config, scaling and every byte of
    its weights (held on the CPU by SGLang)."""
    named = [(f"{i}.{n}", t) for i, layer in enumerate(adapter.layers) for n, t in sorted(layer.weights.items())]
    named += sorted(adapter.embedding_layers.items()) + sorted(adapter.added_tokens_embeddings.items())
    config = {"config": adapter.config.hf_config, "scaling": adapter.scaling}
    return model_fingerprint(config, tensors_digest(named))
