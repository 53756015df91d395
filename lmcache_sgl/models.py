"""Random-weight Hugging Face model directories that SGLang can serve, for tests and benchmarks.

No hub access is needed: the tokenizer is a byte-level BPE trained here on a text
generated from the seed, and the weights are drawn from a seeded torch generator.
Everything written is a pure function of (preset, seed): the same call writes the same
bytes. Outputs are gibberish, but deterministic.

    make_model("/tmp/m", "small", seed=0)   # -> Path; skipped if already complete

Trained presets (:data:`TRAINED`) are committed directories copied as they are (the seed
is not used): ``make_model("/tmp/r", "retrieval")`` is the small model trained on the
task of :mod:`lmcache_sgl.retrieval` (``scripts/train_retrieval.py`` rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # bump when the bytes written for a (preset, seed) change
MARKER = "lmcache_sgl_model.json"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Architecture per preset; vocab_size is also the tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.4M parameters
    "tiny": dict(
        arch="llama",
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
    ),
    # ~63M parameters (12.6M of them in the untied embedding and lm_head)
    "small": dict(
        arch="llama",
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=32768,
    ),
    # DeepSeek-V2 style MLA, all layers dense (no MoE): ~3M parameters
    "mla-tiny": dict(
        arch="deepseek_v2",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=16384,
        # first_k_dense_replace == num_hidden_layers: no layer is a MoE layer
        first_k_dense_replace=3,
        moe_layer_freq=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        # SGLang's CPU path builds MLA's rotary embedding only for (deepseek_)yarn
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=1.0,
            original_max_position_embeddings=16384,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
}


#: Trained models committed in the package, copied by make_model (not random weights).
TRAINED: dict[str, Path] = {"retrieval": Path(__file__).resolve().parent / "data" / "retrieval"}


# ---------------------------------------------------------------- tokenizer corpus

_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "bl",
    "br",
    "ch",
    "cl",
    "cr",
    "dr",
    "fl",
    "fr",
    "gr",
    "pl",
    "pr",
    "qu",
    "sc",
    "sh",
    "sk",
    "sl",
    "sm",
    "sn",
    "sp",
    "st",
    "str",
    "th",
    "tr",
    "wh",
]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "au", "ea", "ee", "ei", "ie", "io", "oa", "oo", "ou", "ua"]
_CODAS = [
    "",
    "",
    "b",
    "ck",
    "d",
    "ft",
    "g",
    "l",
    "ld",
    "m",
    "mp",
    "n",
    "nd",
    "ng",
    "nt",
    "p",
    "r",
    "rd",
    "rk",
    "rn",
    "s",
    "sh",
    "st",
    "t",
    "th",
    "x",
]
_PUNCT = [".", ",", ";", ":", "!", "?", " -", " (", ")", '"']


def _word(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))
    )


def corpus(seed: int, n_words: int = 6000, n_lines: int = 12000) -> list[str]:
    """A deterministic pseudo-English text: Zipf-distributed invented words with
    capitalisation, numbers, punctuation and a little code-like text."""
    rng = random.Random(f"lmcache-sgl-corpus-{seed}")
    lexicon = sorted({_word(rng) for _ in range(n_words)})
    rng.shuffle(lexicon)
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(lexicon))]
    lines = []
    for i in range(n_lines):
        words = rng.choices(lexicon, weights, k=rng.randint(4, 24))
        out = []
        for j, w in enumerate(words):
            r = rng.random()
            if j == 0 or r < 0.05:
                w = w.capitalize()
            elif r < 0.07:
                w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
            elif r < 0.08:
                w = w.upper()
            out.append(w)
            if rng.random() < 0.08:
                out[-1] += rng.choice(_PUNCT)
        line = " ".join(out) + rng.choice([".", ".", ".", "?", "!", ":"])
        if i % 50 == 0:
            line = f"def {words[0]}_{words[-1]}(x, n={i}):\n    return [x * {i % 7} for _ in range(n)]"
        lines.append(line)
    return lines


def build_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE on :func:`corpus` and wrap it as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


# ---------------------------------------------------------------- model


def build_config(preset: str, tok) -> Any:
    spec = dict(PRESETS[preset])
    arch = spec.pop("arch")
    ids = dict(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**spec, **ids)
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**spec, **ids)


def _init_weights(model, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, independent of transformers'
    own init: norms 1, biases 0, matrices N(0, 0.02); lm_head wider so greedy argmax has
    clear margins (robust to tiny numeric differences between attention kernels)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                std = 4.0 / hidden**0.5 if name.startswith("lm_head") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def _write_random(directory: Path, preset: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(PRESETS[preset]["vocab_size"], seed)
    config = build_config(preset, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)


def is_complete(path: str | os.PathLike, preset: str, seed: int) -> bool:
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info == _marker(preset, seed) and all(
        (Path(path) / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")
    )


def _marker(preset: str, seed: int) -> dict:
    if preset in TRAINED:  # a copy: stale once the committed weights change
        digest = hashlib.sha256((TRAINED[preset] / "model.safetensors").read_bytes()).hexdigest()
        return {"preset": preset, "model_sha256": digest, "format_version": FORMAT_VERSION}
    return {"preset": preset, "seed": seed, "format_version": FORMAT_VERSION}


def make_model(path: str | os.PathLike, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a random-weight model of ``preset`` to ``path`` (skipped when ``path``
    already holds that preset and seed), or copy a :data:`TRAINED` one there (``seed``
    unused). The directory is built in a temporary sibling and renamed into place, so a
    crash never leaves a half-written model behind."""
    if preset not in PRESETS and preset not in TRAINED:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS) + sorted(TRAINED)}")
    path = Path(path)
    if not force and is_complete(path, preset, seed):
        return path
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise FileExistsError(f"{path} exists and is not a model written by lmcache-sgl; not overwriting it")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if preset in TRAINED:
            for f in sorted(TRAINED[preset].iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    shutil.copyfile(f, tmp / f.name)
        else:
            _write_random(tmp, preset, seed)
        (tmp / MARKER).write_text(json.dumps(_marker(preset, seed), indent=1) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not is_complete(path, preset, seed):  # else a concurrent maker won: same bytes
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
