#!/usr/bin/env python
"""Train the retrieval model (lmcache_sgl.retrieval) from scratch and save it, on CPU.

    .venv/bin/python scripts/train_retrieval.py               # -> lmcache_sgl/data/retrieval/
    .venv/bin/python scripts/train_retrieval.py --out /tmp/m  # elsewhere

Deterministic: fixed torch and data seeds, deterministic algorithms, a fixed thread count
(2); the same arguments on the same machine and torch give the same weights.

The model: Llama, 4 layers, hidden 256, 4 heads, 2.8M parameters. Training sequences
hold 4 fresh documents of the train split (their aliases mostly retargeted to a key of an
earlier document, see retrieval.training_sequence) and up to 16 questions (up to a third
alias and a third updated ones where the documents have enough, the rest single), each
followed by its answer and </s>; the loss is on those. What makes the model learn the
retrieval in minutes rather than hours on a CPU (the first three found necessary for the
earlier 2-layer model here):

* a curriculum (LEVELS): documents of 1 fact first, larger each time the training
  answers are 90% right, up to the task's 12-22 facts;
* an auxiliary loss: a linear probe, discarded afterwards, must read the key from the
  first layer's output at each document value (and alias target) and at each question's
  "?"; it breaks the chicken-and-egg of key matching (a later layer can only match keys
  that the first has moved next to the values, and the first only learns to move them
  once matching pays off);
* embeddings N(0, 1) and matrices at PyTorch's Linear scale instead of transformers'
  N(0, 0.02), which settle into a copy-any-value plateau;
* a second probe: an alias's target (``K1`` of ``K2 is K1``) must carry the resolved
  value after the second layer, so aliases are resolved where they stand (by attention
  to the earlier document) and the question finds a value there as at any fact. It also
  decides what the model shows in bench/rag.py: a document's alias resolution lives in
  its own KV from layer 2 up, which reusing it in another order leaves stale.

Every --eval-every steps 300 prompts of the valid split (100 per question type, one
question each, as at inference) are scored; training stops at the first evaluation at
full document size where every type reaches --target (or at --steps). The saved weights
are bf16; the test split is then scored with them in a bf16 forward, per type, and the
figures go to training.json next to the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmcache_sgl import retrieval as R  # noqa: E402


def config(args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=-(-len(R.VOCAB) // 64) * 64,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=R.BOS_ID,
        eos_token_id=R.EOS_ID,
        pad_token_id=R.PAD_ID,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def batch(rng: random.Random, size: int, n_questions: int, facts: tuple[int, int]):
    seqs = [R.training_sequence(rng, n_questions, facts) for _ in range(size)]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((size, width), R.PAD_ID, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, (s, lab) in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        labels[row, : len(s)] = torch.tensor(lab)
        mask[row, : len(s)] = 1
    return ids, labels, mask


#: The curriculum: facts per document, from 1 up to the task's 12-22. Training moves to
#: the next level when the answers of the last --level-window steps are --level-up right:
#: an in-context retrieval circuit forms far sooner over 4 facts than over 70.
LEVELS = [(1, 1), (1, 2), (2, 4), (3, 6), (4, 8), (6, 12), (8, 16), (10, 20), (R.MIN_FACTS, R.MAX_FACTS)]


def probe_targets(ids: torch.Tensor) -> torch.Tensor:
    """Per position, the key the first layer's output should carry (-100 where none):
    at a document's value (``K is V``: the key two back), at an alias's target (``K2 is
    K1``: K2, two back) and at a question's ``?`` (``what is K ?``: the key one back)."""
    T = R.TOKEN_ID
    out = torch.full_like(ids, -100)
    values = torch.tensor(sorted(R.VALUE_IDS))
    keys = torch.tensor(sorted(R.KEY_IDS))
    objects = torch.isin(ids[:, 2:], values) | (torch.isin(ids[:, 2:], keys) & torch.isin(ids[:, :-2], keys))
    at_value = objects & (ids[:, 1:-1] == T["is"])
    out[:, 2:][at_value] = ids[:, :-2][at_value]
    at_q = ids[:, 1:] == T["?"]
    out[:, 1:][at_q] = ids[:, :-1][at_q]
    return out


def alias_targets(ids: torch.Tensor) -> torch.Tensor:
    """Per position, the value an alias's target should carry after --alias-layer layers
    (-100 where none): at ``K1`` of ``K2 is K1``, K1's value stated last before it (an
    earlier document's), where there is one."""
    T = R.TOKEN_ID
    out = torch.full_like(ids, -100)
    for row, seq in enumerate(ids.tolist()):
        last: dict[int, int] = {}
        for i in range(2, len(seq)):
            if seq[i - 1] != T["is"] or seq[i - 2] not in R.KEY_IDS:
                continue
            if seq[i] in R.VALUE_IDS:
                last[seq[i - 2]] = seq[i]
            elif seq[i] in R.KEY_IDS and seq[i] in last:
                out[row, i] = last[seq[i]]
    return out


def loss_fn(model, probes, ids, labels, mask, args):
    """Cross-entropy of the labelled tokens (predicted from the position before each),
    plus two auxiliary losses of linear probes (discarded after training):

    * ``--probe`` times: ``probes[0]`` reads the key from the first layer's output at the
      positions of :func:`probe_targets`. Without it the later layers' key matching has
      nothing to match on until the first layer moves the keys, which it only learns once
      matching pays: a plateau of thousands of steps; with it, retrieval appears within a
      few hundred.
    * ``--alias-probe`` times: ``probes[1]`` reads an alias's resolved value from the
      output of layer ``--alias-layer`` at the alias's target (:func:`alias_targets`): it
      makes the model resolve an alias where it stands, by attention to the earlier
      document, so that the question's lookup finds a value there as at any fact (the
      same one-hop circuit twice instead of a two-hop one to discover)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        logits = model.lm_head(out.last_hidden_state[rows, cols]).float()
    targets = labels[rows, cols + 1]
    loss = torch.nn.functional.cross_entropy(logits, targets)
    is_value = targets != R.EOS_ID
    right = (logits[is_value].argmax(-1) == targets[is_value]).float().mean().item()
    for weight, probe, layer, fn in (
        (args.probe, probes[0], 1, probe_targets),
        (args.alias_probe, probes[1], args.alias_layer, alias_targets),
    ):
        targets = fn(ids)
        sel = targets != -100
        if weight > 0 and sel.any():
            aux = torch.nn.functional.cross_entropy(probe(out.hidden_states[layer][sel].float()), targets[sel])
            loss = loss + weight * aux
    return loss, right


def init_weights(model, seed: int) -> None:
    """Embeddings N(0, 1), every matrix N(0, 1/(3 fan_in)) (PyTorch's own Linear scale),
    norms 1: token identities dominate the residual stream at the start, which retrieval
    needs (transformers' N(0, 0.02) everywhere trains into a copy-any-value plateau)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (3 * p.shape[1]) ** 0.5)


def evaluate(model, prompts) -> dict[str, float]:
    model.eval()
    acc = R.accuracy(prompts, R.predict(model, prompts))
    model.train()
    return acc


def fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=R.MODEL_DIR)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1600, help="at most this many steps (the cosine schedule's length)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--questions", type=int, default=16, help="questions per training sequence")
    ap.add_argument("--level-window", type=int, default=20, help="curriculum: steps averaged")
    ap.add_argument("--level-up", type=float, default=0.9, help="curriculum: accuracy that moves to the next level")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probe", type=float, default=1.0, help="weight of the auxiliary key-probe loss (0: none)")
    ap.add_argument("--alias-probe", type=float, default=1.0, help="weight of the alias probe's loss (0: none)")
    ap.add_argument(
        "--alias-layer", type=int, default=2, help="the alias probe reads hidden state N (N layers' output)"
    )
    ap.add_argument("--bf16", type=int, default=1, help="1: train under bf16 autocast (0: fp32)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.95, help="stop when every type reaches this on valid")
    ap.add_argument("--test-prompts", type=int, default=500, help="test prompts per question type at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    cfg = config(args)
    model = LlamaForCausalLM(cfg).float().train()
    init_weights(model, args.seed)
    probes = [torch.nn.Linear(cfg.hidden_size, cfg.vocab_size) for _ in range(2)]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}", flush=True
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2] + [p.weight for p in probes]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2] + [p.bias for p in probes]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    valid = [p for t in R.QTYPES for p in R.sample_prompts(100, "valid", t)]
    rng = random.Random(f"lmcache-sgl-retrieval-train-sequences-{args.seed}")
    start, smooth, step, level, rights = time.monotonic(), None, 0, 0, []
    history = []
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, right = loss_fn(model, probes, *batch(rng, args.batch, args.questions, LEVELS[level]), args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        rights.append(right)
        if level < len(LEVELS) - 1 and len(rights) >= args.level_window:
            if sum(rights[-args.level_window :]) / args.level_window >= args.level_up:
                level, rights = level + 1, []
                print(
                    f"step {step:5d}  {time.monotonic() - start:6.0f} s  level {level}: facts {LEVELS[level]}",
                    flush=True,
                )
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, valid)
            history.append(
                {"step": step, "level": level, "loss": round(smooth, 4), **{k: round(v, 4) for k, v in acc.items()}}
            )
            print(
                f"step {step:5d}  {time.monotonic() - start:6.0f} s  level {level}  loss {smooth:.4f}"
                f"  lr {lr_at(step):.2e}  train {sum(rights[-20:]) / max(1, len(rights[-20:])):.3f}  valid: {fmt(acc)}",
                flush=True,
            )
            if level == len(LEVELS) - 1 and all(acc[t] >= args.target for t in R.QTYPES):
                break
    train_s = time.monotonic() - start

    model = model.to(torch.bfloat16).eval()
    test = [p for t in R.QTYPES for p in R.sample_prompts(args.test_prompts, "test", t)]
    acc = R.accuracy(test, R.predict(model, test))
    print(f"trained {step} steps in {train_s:.0f} s; test ({len(test)} prompts, bf16): {fmt(acc)}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        R.build_tokenizer().save_pretrained(tmp)
        digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        record = {
            "script": "scripts/train_retrieval.py",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "parameters": n_params,
            "steps": step,
            "train_seconds": round(train_s),
            "torch": torch.__version__,
            "test_accuracy_bf16": {k: round(v, 4) for k, v in acc.items()},
            "test_prompts_per_type": args.test_prompts,
            "valid_history": history,
            "model_sha256": digest,
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {args.out} (model.safetensors sha256 {digest})", flush=True)


if __name__ == "__main__":
    main()
