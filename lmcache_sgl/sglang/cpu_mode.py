"""CPU development mode: run the real, unmodified SGLang server on a machine with no GPU.

This is a development and CI aid, never a production path. It is active only where no
usable CUDA device exists (see :func:`wanted`), and it does three things:

1. ``sgl_kernel`` (a CUDA-only wheel) links against the NVIDIA driver library
   ``libcuda.so.1``; where no driver is installed its import fails. :func:`ensure_stub`
   compiles ``src/cpu_stub/libcuda_stub.c`` (every entry point answers
   CUDA_ERROR_NO_DEVICE) into ``~/.cache/lmcache-sgl/cpu-stub/libcuda.so.1``, and
   :func:`server_env` puts that directory first on the server's ``LD_LIBRARY_PATH``.
   ``torch.cuda.is_available()`` stays False; no sgl_kernel op is called on CPU.
2. :func:`server_env` / :func:`server_flags` give the environment and flags that make
   SGLang 0.5.23 pick its CPU engine and the torch-native attention backend.
3. :func:`install_extend_hook` replaces ``TorchNativeAttnBackend._run_sdpa_forward_extend``
   (through SGLang's plugin HookRegistry) with one that computes attention for the new
   tokens only. The stock one attends over the full sequence for every row, prefix rows
   included, so on the CPU a radix-cache hit still costs a quadratic attention over the
   whole prompt, unlike on a GPU backend; that would hide the value of any KV reuse.

Environment:
  LMCACHE_SGL_CPU_MODE=1|0     force CPU mode on / off (default: auto-detect)
  LMCACHE_SGL_CPU_EXTEND=0     keep SGLang's stock extend attention (for A/B runs)
  LMCACHE_SGL_CACHE_DIR        cache root (default ~/.cache/lmcache-sgl)
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_MODE = "LMCACHE_SGL_CPU_MODE"
ENV_EXTEND = "LMCACHE_SGL_CPU_EXTEND"
STUB_SOURCE = Path(__file__).resolve().parents[2] / "src" / "cpu_stub" / "libcuda_stub.c"
EXTEND_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"
#: New rows are attended in blocks of this many queries (tests lower it).
EXTEND_BLOCK = 1024
#: Printed (stderr, once per process) the first time the replacement runs.
HOOK_ACTIVE_LINE = "lmcache-sgl: cpu_mode blocked extend attention active"

_SERVER_FLAGS = [
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--sampling-backend",
    "pytorch",
    "--grammar-backend",
    "none",
    "--disable-decode-cuda-graph",
    "--disable-prefill-cuda-graph",
    # An idle scheduler otherwise polls at 100% of a core, which on a small CPU box
    # takes that core from every other process (a second server, background writers).
    "--sleep-on-idle",
]


# ---------------------------------------------------------------- detection


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    if v:
        raise ValueError(f"{name}={os.environ[name]!r}: expected 0 or 1")
    return None


def wanted() -> bool:
    """True when SGLang must run in CPU mode: no usable CUDA device here.

    ``LMCACHE_SGL_CPU_MODE=1/0`` forces the answer. Otherwise: no ``/dev/nvidia*``
    device node means no GPU (cheap, no torch import); with device nodes present the
    answer is ``not torch.cuda.is_available()``.
    """
    forced = _env_flag(ENV_MODE)
    if forced is not None:
        return forced
    if not glob.glob("/dev/nvidia[0-9]*"):
        return True
    import torch

    return not torch.cuda.is_available()


# ---------------------------------------------------------------- libcuda stub


def cache_dir() -> Path:
    root = os.environ.get("LMCACHE_SGL_CACHE_DIR") or os.path.expanduser("~/.cache/lmcache-sgl")
    return Path(root)


def stub_dir() -> Path:
    return cache_dir() / "cpu-stub"


def ensure_stub() -> Path:
    """Build the stub ``libcuda.so.1`` if missing or stale; return its directory.

    The build is keyed by a digest of the C source (kept next to the library), written
    to a temporary file and renamed into place, so concurrent callers are safe.
    """
    src = STUB_SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()
    out_dir = stub_dir()
    lib, stamp = out_dir / "libcuda.so.1", out_dir / "libcuda_stub.sha256"
    if lib.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out_dir
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("cpu_mode: a C compiler (gcc) is needed to build the libcuda stub")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libcuda.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run(
            [
                cc,
                "-O2",
                "-shared",
                "-fPIC",
                "-fvisibility=hidden",
                "-Wl,-soname,libcuda.so.1",
                "-o",
                tmp,
                str(STUB_SOURCE),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"cpu_mode: building the libcuda stub failed:\n{e.stderr}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp_tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
    stamp_tmp.write_text(digest + "\n")
    os.replace(stamp_tmp, stamp)
    return out_dir


# ---------------------------------------------------------------- server process


def server_env(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang server process in CPU mode (builds the stub lazily).
    Refuses where a GPU is usable: the stub would hide the real driver."""
    if not wanted():
        raise RuntimeError(
            f"cpu_mode: a CUDA device is present; not building a CPU-mode environment (set {ENV_MODE}=1 to force)"
        )
    env = dict(os.environ if base_env is None else base_env)
    stub = str(ensure_stub())
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != stub]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([stub, *parts])
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    # Children (scheduler, detokenizer) re-check wanted(): with the stub loaded, torch
    # sees no device anyway, but say it explicitly.
    env[ENV_MODE] = "1"
    return env


def server_flags() -> list[str]:
    """SGLang server flags for CPU mode (size the KV pool with --max-total-tokens)."""
    return list(_SERVER_FLAGS)


# ---------------------------------------------------------------- extend attention


def extend_attention(
    self,
    query,
    output,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    extend_prefix_lens,
    extend_seq_lens,
    encoder_lens=None,
    scaling=None,
    enable_gqa=False,
    causal=False,
    is_cross_attn=False,
    sliding_window_size=None,
    *,
    _stock=None,
    block: int | None = None,
):
    """Drop-in for ``TorchNativeAttnBackend._run_sdpa_forward_extend`` that attends
    from the new tokens only.

    For each sequence with a prefix, its ``extend_seq_lens[i]`` new query rows are split
    into blocks of ``EXTEND_BLOCK``; a block of rows at absolute positions [a, b) attends
    to the keys [0, b) with a lower-right-aligned causal mask (row at position p sees keys
    <= p), so the work is ~ new * (prefix + new/2 + block/2) instead of the stock
    (prefix + new)^2 / 2. A sequence without a prefix is one ``is_causal=True`` call, as
    in the stock method. Non-causal, cross/encoder and sliding-window attention go to
    ``_stock`` unchanged. Writes ``output`` and returns it.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if (
        not causal
        or is_cross_attn
        or encoder_lens is not None
        or (sliding_window_size is not None and sliding_window_size > -1)
    ):
        if _stock is None:
            raise NotImplementedError("cpu_mode extend: case not covered and no stock fallback")
        return _stock(
            self,
            query,
            output,
            k_cache,
            v_cache,
            req_to_token,
            req_pool_indices,
            seq_lens,
            extend_prefix_lens,
            extend_seq_lens,
            encoder_lens,
            scaling=scaling,
            enable_gqa=enable_gqa,
            causal=causal,
            is_cross_attn=is_cross_attn,
            sliding_window_size=sliding_window_size,
        )
    _announce()
    block = block or EXTEND_BLOCK
    n = seq_lens.shape[0]
    assert extend_prefix_lens.shape[0] == n and extend_seq_lens.shape[0] == n
    seq_l, pre_l, ext_l = seq_lens.tolist(), extend_prefix_lens.tolist(), extend_seq_lens.tolist()
    rows = req_pool_indices.tolist()
    q_all = query.movedim(0, -2)  # [heads, tokens, dim]
    start = 0
    for i in range(n):
        prefix, new, total = pre_l[i], ext_l[i], seq_l[i]
        if new == 0:
            continue
        slots = req_to_token[rows[i], :total]
        key = k_cache[slots].movedim(0, -2)  # [kv_heads, total, dim]
        value = v_cache[slots].movedim(0, -2)
        if key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        # No prefix: one causal SDPA over the new rows (the stock computation, which
        # then has no redundant rows; the kernel skips the masked-out half).
        step = new if prefix == 0 else block
        for b0 in range(0, new, step):
            b1 = min(b0 + step, new)
            q = q_all[:, start + b0 : start + b1, :]
            kv_end = prefix + b1
            if prefix == 0:
                mask, is_causal = None, True
            elif b1 - b0 == 1:  # one row at the end sees every key
                mask, is_causal = None, False
            else:
                q_pos = torch.arange(prefix + b0, kv_end, device=query.device).unsqueeze(1)
                k_pos = torch.arange(kv_end, device=query.device).unsqueeze(0)
                mask, is_causal = k_pos <= q_pos, False
            out = sdpa(
                q.unsqueeze(0),
                key[:, :kv_end].unsqueeze(0),
                value[:, :kv_end].unsqueeze(0),
                attn_mask=mask,
                is_causal=is_causal,
                scale=scaling,
                enable_gqa=enable_gqa,
            )
            output[start + b0 : start + b1] = out.squeeze(0).movedim(-2, 0)
        start += new
    return output


_announced = False


def _announce() -> None:
    global _announced
    if not _announced:
        _announced = True
        import sys

        print(f"{HOOK_ACTIVE_LINE} (block={EXTEND_BLOCK}, pid={os.getpid()})", file=sys.stderr, flush=True)


def _around(original, *args, **kwargs):
    return extend_attention(*args, _stock=original, **kwargs)


MLA_DISPATCH_TARGET = "sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry.get_handler"


def _mla_dispatch_around(original, cls, backend_name):
    """DeepSeek (MLA) models pick an attention method per backend; torch_native has no
    entry and falls back to triton's, which runs a no-prefix extend as plain MHA over
    (qk_head_dim, v_head_dim) K/V. The torch-native backend ignores the K/V it is given
    and reads the pool, which holds the compressed latent (kv_lora_rank + rope dims):
    the shapes clash and the server dies at warm-up. Route torch_native to the absorbed
    MLA method, which attends over the latent pool and which it does handle."""
    if backend_name == "torch_native" and "torch_native" not in cls._handlers:
        from sglang.srt.models.deepseek_common.attention_backend_handler import _dispatch_mla_subtype

        return _dispatch_mla_subtype
    return original(cls, backend_name)


_install_lock = threading.Lock()
_installed = False


def install_extend_hook(force: bool = False) -> bool:
    """Register CPU mode's attention fixes on SGLang's HookRegistry; True if this call
    registered anything.

    - the blocked extend attention, AROUND the stock ``_run_sdpa_forward_extend`` (which
      stays the fallback), unless ``LMCACHE_SGL_CPU_EXTEND=0``;
    - torch_native -> absorbed-MLA method dispatch for DeepSeek-style models (see
      :func:`_mla_dispatch_around`; stock SGLang 0.5.23 cannot serve them otherwise).

    No-op unless CPU mode is wanted (or ``force``); idempotent within a process. Meant to
    be called from an ``sglang.srt.plugins`` entry point, whose registrations
    ``load_plugins()`` applies; called from anywhere else (no plugin being loaded), it
    applies the hooks itself right away.
    """
    global _installed
    if not force and not wanted():
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType, _current_plugin_source

    with _install_lock:
        if _installed:
            return False
        _installed = True
        HookRegistry.register(MLA_DISPATCH_TARGET, _mla_dispatch_around, HookType.AROUND)
        if _env_flag(ENV_EXTEND) is not False:
            HookRegistry.register(EXTEND_TARGET, _around, HookType.AROUND)
            logger.info("lmcache-sgl: CPU mode: blocked extend attention on %s", EXTEND_TARGET)
        else:
            logger.info("lmcache-sgl: CPU mode: stock extend attention (%s=0)", ENV_EXTEND)
    if _current_plugin_source.get() is None:
        HookRegistry.apply_hooks()
    return True


def plugin() -> None:
    """An ``sglang.srt.plugins`` entry point doing only CPU mode's part (for setups that
    run SGLang in CPU mode without the lmcache_sgl cache plugin)."""
    install_extend_hook()
