"""RAG with blending: TTFT and answer fidelity of non-prefix KV reuse on real SGLang servers.

A RAG prompt is a system prompt, documents and a question, joined by the separator
" # # ". The same documents come back in new prompts in another order, so no exact prefix
beyond the system prompt exists; with `enable_blending` lmcache-sgl reuses their stored KV
anyway (approximate) with one of three strategies, chosen per request through
`sampling_params.custom_params = {"lmcache_blend": {...}}`, so one server measures all:

  reuse          the loaded KV as is (only separators and the question are computed)
  cacheblend R   every token through the check layers, then the R share of reused tokens
                 whose KV deviates most (and the gaps) through the rest
  boundary K     the first K tokens of each reused document recomputed at every layer

Part 1, TTFT, on the built-in `small` model (random weights): ~8K-token prompts of a
system prompt and 4 documents of 1900 random token ids each (ids of its vocabulary, never
the separator's), separated by the model's tokenization of " # # ", and a 32-token
question. Each sample is the client-side wall time of one /generate with
max_new_tokens=1; every setting runs the same queries (each a new order of the documents
whose first document was never first in a stored prompt), interleaved per query, and
the figure is the median:

  full_ttft_s         stock SGLang (no lmcache), cache flushed before each query
  prefix_only_ttft_s  stock SGLang's radix cache holding only the system prompt (flush,
                      then the system prompt alone)
  reuse_ttft_s, blend_ttft_s (cacheblend 0.15), boundary_ttft_s (boundary 16): ours
                      (--enable-lmcache, enable_blending, CPU tier only) after a warm-up
                      that stored every document (prompts in other orders), tree holding
                      only the system prompt as for prefix-only; each query must be
                      blended (the server's "lmcache-sgl: blended" line for its request id,
                      a device hit of at most the system prompt and its separator, and
                      cached_tokens covering the documents), or the benchmark fails
  *_ttft_ratio        each / full_ttft_s. Targets: blend <= 0.45, boundary <= 0.15,
                      reuse <= 0.1 (reported in `targets_met`, not enforced)

Part 2, fidelity, on the trained retrieval model (lmcache_sgl/retrieval.py,
lmcache_sgl/data/retrieval/): held-out prompts (`sample_prompts(n, "test")`, 4 documents
of the test pool in a random order per query, one question of type "single", "updated"
or "alias", in turn), each generating 16 greedy tokens (ignore_eos) with the whole first-token
distribution (return_logprob, top_logprobs_num = the model's vocab size). Settings:
full prefill (stock, a cache_salt of its own per query, so nothing is shared), prefix-only
(stock radix cache after the same warm-up prompts as ours: exact reuse of the system
prompt and, for some queries, of a first document), and on ours, after a warm-up that
stored every document of the test pool (16 prompts of 4 documents) and a flush, each
query blended with no device hit (checked as above): cacheblend at 0, 0.05, 0.15, 0.3,
1.0, boundary at 4, 16, 64, and reuse (--quick: reuse, cacheblend 0.15, boundary 16),
cacheblend with the server's default check layers ([1]); and `cacheblend_0.15_checklayer2`
(check layer [2]): the retrieval model resolves an alias at the alias, in layer 1 (its
recipe makes it), so a reused document's stale resolution shows in the K/V of layers 2
and up, not in layer 1's, which depend on layer 0's (local) output. Requests go
--concurrency at a time (SGLang batches them: on a CPU a decode step's fixed cost
dominates); batch composition moves bf16 logprobs by up to ~1e-2, which can flip a
near-tie, so prefix-only's agreement with full prefill is the floor of this noise. Per setting:

  accuracy          fraction of queries whose first generated token is the answer
                    (also per question type)
  top1_agreement    fraction of queries whose first greedy token equals full prefill's
                    (also per question type)
  seq16_agreement   fraction of queries whose 16 greedy tokens all equal full prefill's
  token16_agreement mean over queries of the fraction of the 16 positions whose token
                    equals full prefill's at that position
  first_token_kl    mean over queries of KL(full || setting) of the first-token
                    distribution, in nats

    python bench/rag.py [--quick] [--json] [--png bench/out/rag.png] [--keep]

In CPU mode every server runs with OMP_NUM_THREADS=1 (--threads): with two threads, any
other busy process on a 2-core machine stalls their parallel regions (a batch of
fidelity requests took 13 times as long here), and timings would follow the neighbours.

--json prints one JSON object (the keys above for the default settings: full_accuracy,
reuse_accuracy, blend_accuracy, boundary_accuracy, blend_top1_agreement,
blend_first_token_kl, ..., and `fidelity` with every setting). Without --json: the TTFT
figures and a fidelity table. Writes a PNG (--png): TTFT per strategy and accuracy per
setting.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import permutations

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from plotting import pyplot, save  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lmcache_sgl import retrieval  # noqa: E402
from lmcache_sgl.cli import default_model_dir  # noqa: E402
from lmcache_sgl.config import LMCacheConfig  # noqa: E402
from lmcache_sgl.models import make_model  # noqa: E402
from lmcache_sgl.server import SGLangServer  # noqa: E402
from lmcache_sgl.sglang import cpu_mode  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SEPARATOR = " # # "
BLENDED = re.compile(r"lmcache-sgl: blended (\d+) tokens after a device hit of (\d+) for request (\S+) \(([\d.]+) ms\)")
LMCACHE = dict(chunk_size=256, local_cpu=True, max_local_cpu_size=1.0, enable_blending=True)
NEW_TOKENS = 16  # greedy tokens per fidelity query
POOL_TOKENS = 20000  # device pool of every server: one ~8K prompt and its neighbours

# Ours' settings: name -> the request's lmcache_blend override.
DEFAULT = {"reuse": "reuse", "blend": "cacheblend_0.15", "boundary": "boundary_16"}
SETTINGS = {
    "reuse": {"strategy": "reuse"},
    **{f"cacheblend_{r:g}": {"strategy": "cacheblend", "recompute_ratio": r} for r in (0.0, 0.05, 0.15, 0.3, 1.0)},
    **{f"boundary_{k}": {"strategy": "boundary", "boundary_tokens": k} for k in (4, 16, 64)},
}
CHECK2 = "cacheblend_0.15_checklayer2"  # cacheblend 0.15 checking layer 2 instead of the default [1]


def fidelity_settings(layers: int) -> dict[str, dict]:
    """The fidelity settings for a model of `layers` layers: SETTINGS (cacheblend at the
    server's default check layers) and CHECK2. A check layer must leave a layer after
    it (at the last one every token's K/V is fresh at every layer, whatever the ratio):
    SystemExit on a model of 3 layers or fewer."""
    if layers <= 3:
        raise SystemExit(f"the fidelity model has {layers} layers; check layers [1] and [2] need 4 or more")
    return {**SETTINGS, CHECK2: {"strategy": "cacheblend", "recompute_ratio": 0.15, "check_layers": [2]}}


TARGETS = {"blend_ttft_ratio": 0.45, "boundary_ttft_ratio": 0.15, "reuse_ttft_ratio": 0.1}


# ---------------------------------------------------------------- servers


class Servers:
    """Servers started one at a time, each stopped before the next (and all at exit);
    `threads`: their OMP_NUM_THREADS (None: unset)."""

    def __init__(self, workdir: str, threads: int | None) -> None:
        self.workdir, self.live = workdir, []
        self.env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}

    def start(self, model: str, name: str, lmcache: dict | None = None) -> SGLangServer:
        args = ["--max-total-tokens", str(POOL_TOKENS), "--log-level", "info"]
        if lmcache is not None:
            config = os.path.join(self.workdir, f"{name}.yaml")
            with open(config, "w") as f:
                yaml.safe_dump(lmcache, f)
            args += ["--enable-lmcache", "--lmcache-config-file", config]
        log = os.path.join(self.workdir, f"{name}.log")
        server = SGLangServer(model, extra_args=args, env_overrides=self.env, log_path=log)
        self.live.append(server)
        server.start()
        server.wait_healthy(timeout=600)
        return server

    def stop(self, server: SGLangServer) -> None:
        server.stop()
        self.live.remove(server)

    def stop_all(self) -> None:
        for server in self.live:
            server.stop()
        self.live.clear()


def generate(
    server: SGLangServer,
    ids,
    max_new_tokens: int,
    blend: dict | None = None,
    top_logprobs: int = 0,
    salt: str | None = None,
) -> tuple[dict, float]:
    """One greedy /generate (ignore_eos; with `blend` as the request's lmcache_blend
    override, the whole top-`top_logprobs` distributions, a cache_salt) and its
    client-side wall time in seconds."""
    params: dict = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    if max_new_tokens > 1:
        params["ignore_eos"] = True
    if blend is not None:
        params["custom_params"] = {"lmcache_blend": blend}
    payload: dict = {"input_ids": list(map(int, ids)), "sampling_params": params}
    if top_logprobs:
        payload.update(return_logprob=True, top_logprobs_num=top_logprobs)
    if salt is not None:
        payload["cache_salt"] = salt
    start = time.perf_counter()
    reply = server.request("/generate", payload)
    return reply, time.perf_counter() - start


def blend_lines(server: SGLangServer) -> dict[str, tuple[int, int, float]]:
    """The server's "lmcache-sgl: blended" lines by request id: (promised tokens, device
    hit, milliseconds)."""
    text = server.log_path.read_text(errors="replace")
    return {m[3]: (int(m[1]), int(m[2]), float(m[4])) for m in BLENDED.finditer(text)}


def check_blended(
    server: SGLangServer, reply: dict, what: str, max_device: int, min_cached: int, lines: dict | None = None
) -> tuple[int, float]:
    """Fail loudly unless the request was blended with a device hit of at most
    `max_device` tokens and at least `min_cached` cached tokens; (device hit, blend ms).
    lines: blend_lines(server) read after the reply came (default: read now)."""
    rid, cached = reply["meta_info"]["id"], reply["meta_info"]["cached_tokens"]
    line = (lines or {}).get(rid)
    for _ in range(20):  # the scheduler's log line is written before the reply, but be patient
        if line is not None:
            break
        line = blend_lines(server).get(rid)
        time.sleep(0.05)
    if line is None:
        raise RuntimeError(f"{what}: request {rid} was not blended (no 'blended' line for it in {server.log_path})")
    if line[1] > max_device or cached < min_cached:
        raise RuntimeError(
            f"{what}: request {rid}: device hit {line[1]} (at most {max_device} expected), "
            f"cached_tokens {cached} (at least {min_cached} expected); log {server.log_path}"
        )
    return line[1], line[2]


# ---------------------------------------------------------------- part 1: TTFT


def ttft_part(opts, servers: Servers, progress) -> dict:
    model = opts.model_dir or str(make_model(default_model_dir("small", 0), "small", 0))
    tok = AutoTokenizer.from_pretrained(model)
    sep = list(tok.encode(SEPARATOR, add_special_tokens=False))
    vocab = tok.vocab_size if hasattr(tok, "vocab_size") else len(tok)
    rng = random.Random(0)
    banned = set(sep) | set(tok.all_special_ids)
    allowed = [t for t in range(10, vocab) if t not in banned]

    def text(n):
        return [rng.choice(allowed) for _ in range(n)]

    n_docs, doc_tokens, question_tokens = 4, opts.doc_tokens, 32
    system_tokens = opts.prompt_tokens - n_docs * doc_tokens - (n_docs + 1) * len(sep) - question_tokens
    if system_tokens < 16:
        raise SystemExit(f"--prompt-tokens {opts.prompt_tokens} leaves no room for a system prompt")
    system = text(system_tokens)
    docs = [text(doc_tokens) for _ in range(n_docs)]

    def prompt(order, question):
        ids = list(system)
        for d in order:
            ids += sep + docs[d]
        return ids + sep + question

    # Warm-up: [0 1 2 3] computes and stores every document (and is the only prompt in
    # ours' prefix tiers); [3 2 1 0] is blended once per strategy (first-call costs).
    # Measured orders never start with document 0, so nothing beyond the system prompt
    # is an exact prefix of anything stored.
    warm = [(0, 1, 2, 3), (3, 2, 1, 0)]
    orders = [o for o in permutations(range(n_docs)) if o[0] != 0 and o not in warm]
    random.Random(1).shuffle(orders)
    n = 3 if opts.quick else opts.ttft_queries
    queries = [prompt(o, text(question_tokens)) for o in orders[:n]]
    doc_total = n_docs * doc_tokens
    samples: dict[str, list[float]] = {}
    cached: dict[str, list[int]] = {}
    blend_ms: dict[str, list[float]] = {}

    def record(name, reply, seconds):
        samples.setdefault(name, []).append(seconds)
        cached.setdefault(name, []).append(reply["meta_info"]["cached_tokens"])
        progress.set_postfix_str(f"ttft {name}")
        progress.update()

    stock = servers.start(model, "ttft-stock")
    generate(stock, prompt(warm[1], text(question_tokens)), 1)  # warm-up
    for i, q in enumerate(queries):
        for name in ("full", "prefix_only")[:: 1 if i % 2 == 0 else -1]:
            stock.flush_cache()
            if name == "prefix_only":
                generate(stock, system, 1)
            reply, seconds = generate(stock, q, 1)
            hit = reply["meta_info"]["cached_tokens"]
            expected = (0, 0) if name == "full" else (system_tokens - 1, system_tokens)
            if not expected[0] <= hit <= expected[1]:
                raise RuntimeError(f"ttft {name}: cached_tokens {hit} (system prompt: {system_tokens} tokens)")
            record(name, reply, seconds)
    servers.stop(stock)

    ours = servers.start(model, "ttft-ours", {**LMCACHE, "max_local_cpu_size": opts.cpu_gb})
    strategies = {key: SETTINGS[DEFAULT[key]] for key in ("reuse", "blend", "boundary")}
    generate(ours, prompt(warm[0], text(question_tokens)), 1)
    for name, blend in strategies.items():
        ours.flush_cache()
        generate(ours, system, 1)
        reply, _ = generate(ours, prompt(warm[1], text(question_tokens)), 1, blend)
        check_blended(ours, reply, f"ttft warm-up {name}", system_tokens + len(sep), system_tokens + doc_total)
    names = list(strategies)
    for i, q in enumerate(queries):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            ours.flush_cache()
            generate(ours, system, 1)
            reply, seconds = generate(ours, q, 1, strategies[name])
            _, ms = check_blended(ours, reply, f"ttft {name}", system_tokens + len(sep), system_tokens + doc_total)
            blend_ms.setdefault(name, []).append(ms)
            record(name, reply, seconds)
    servers.stop(ours)

    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "full_ttft_s": med["full"],
        "prefix_only_ttft_s": med["prefix_only"],
        "reuse_ttft_s": med["reuse"],
        "blend_ttft_s": med["blend"],
        "boundary_ttft_s": med["boundary"],
        **{f"{k}_ttft_ratio": med[k] / med["full"] for k in ("blend", "boundary", "reuse", "prefix_only")},
        "ttft_prompt_tokens": len(queries[0]),
        "ttft_queries": n,
        "ttft_cached_tokens": {k: min(v) for k, v in cached.items()},
        "blend_server_ms": {k: statistics.median(v) for k, v in blend_ms.items()},
        "ttft_samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }
    result["targets_met"] = {k: result[k] <= limit for k, limit in TARGETS.items()}
    return result


# ---------------------------------------------------------------- part 2: fidelity


@dataclass
class Outcome:
    """One setting's answers to the queries, in query order."""

    tokens: list[list[int]] = field(default_factory=list)  # 16 greedy tokens per query
    first_logprobs: list[np.ndarray] = field(default_factory=list)  # [vocab] per query
    cached: list[int] = field(default_factory=list)


def first_token_logprobs(reply: dict, vocab: int) -> np.ndarray:
    """The whole first-token distribution of a reply (log probabilities, -inf where absent)."""
    lp = np.full(vocab, -np.inf)
    for value, token, *_ in reply["meta_info"]["output_top_logprobs"][0]:
        lp[int(token)] = value
    return lp


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """KL(p || q) in nats from log probabilities."""
    p = np.exp(p_log)
    terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return float(terms.sum())


def retrieval_model(path: str | None) -> str:
    """`path`, or a copy of the committed retrieval model (make_model's "retrieval"
    preset), so retraining it in place cannot change a running benchmark's weights."""
    if path is None:
        path = str(make_model(default_model_dir("retrieval", 0), "retrieval"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"no retrieval model at {path}; build it: .venv/bin/python scripts/train_retrieval.py")
    return path


def warmup_prompts() -> list[retrieval.Prompt]:
    """Prompts that together hold every document of the test pool: the pool shuffled,
    4 documents each, asking the first askable key."""
    pool = retrieval.document_pool("test")
    order = list(range(len(pool)))
    random.Random("rag-warmup").shuffle(order)
    out = []
    for i in range(0, len(order), retrieval.N_DOCS):
        docs = [pool[j] for j in order[i : i + retrieval.N_DOCS]]
        keys = retrieval.keys_by_type(docs)
        out.append(retrieval.build_prompt(docs, (keys["single"] + keys["updated"])[0]))
    return out


def fidelity_part(opts, servers: Servers, progress) -> dict:
    model = retrieval_model(opts.retrieval_model)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    vocab = config["vocab_size"]
    n = opts.fidelity_queries or (100 if opts.quick else 400)
    prompts = retrieval.sample_prompts(n, "test")
    warm = warmup_prompts()
    layers = config["num_hidden_layers"]
    overrides = fidelity_settings(layers)
    settings = [k for k in overrides if not opts.quick or k in DEFAULT.values() or k == CHECK2]
    outcomes: dict[str, Outcome] = {}
    blend_ms: dict[str, list[float]] = {}

    def ask_all(server, name, blend=None, salted=False):
        """Every prompt, `opts.concurrency` requests in flight; the replies in order."""

        def one(i):
            salt = f"rag-{name}-{i}" if salted else None
            return generate(server, prompts[i].input_ids, NEW_TOKENS, blend, top_logprobs=vocab, salt=salt)[0]

        replies = []
        with concurrent.futures.ThreadPoolExecutor(opts.concurrency) as pool:
            for reply in pool.map(one, range(n)):
                replies.append(reply)
                progress.set_postfix_str(f"fidelity {name}")
                progress.update()
        o = outcomes[name] = Outcome()
        for reply in replies:
            o.tokens.append(reply["output_ids"])
            o.first_logprobs.append(first_token_logprobs(reply, vocab))
            o.cached.append(reply["meta_info"]["cached_tokens"])
        return replies

    stock = servers.start(model, "fidelity-stock")
    # Full prefill: a cache_salt of its own per query, so nothing is shared.
    for i, reply in enumerate(ask_all(stock, "full", salted=True)):
        if reply["meta_info"]["cached_tokens"]:
            raise RuntimeError(f"fidelity full: query {i} had {reply['meta_info']['cached_tokens']} cached tokens")
    with concurrent.futures.ThreadPoolExecutor(opts.concurrency) as pool:
        list(pool.map(lambda p: generate(stock, p.input_ids, 1), warm))
    ask_all(stock, "prefix_only")
    servers.stop(stock)

    ours = servers.start(model, "fidelity-ours", {**LMCACHE, "max_local_cpu_size": 0.5})
    for p in warm:  # one at a time: each stores its documents before the next looks
        generate(ours, p.input_ids, 1)
    ours.flush_cache()  # the tree empty: no query has a device hit, every document is blended
    for name in settings:
        replies = ask_all(ours, name, overrides[name])
        lines = blend_lines(ours)
        for p, reply in zip(prompts, replies, strict=True):
            docs = sum(e - s for s, e in p.doc_spans)
            _, ms = check_blended(ours, reply, f"fidelity {name}", 0, docs, lines)
            blend_ms.setdefault(name, []).append(ms)
    servers.stop(ours)

    full = outcomes["full"]
    per_setting = {}
    for name in ["full", "prefix_only", *settings]:
        o = outcomes[name]
        firsts = [t[0] for t in o.tokens]
        row = {f"accuracy_{k}" if k != "all" else "accuracy": v for k, v in retrieval.accuracy(prompts, firsts).items()}
        pairs = list(zip(o.tokens, full.tokens, strict=True))
        row["top1_agreement"] = float(np.mean([a[0] == b[0] for a, b in pairs]))
        for t in retrieval.QTYPES:
            same = [a[0] == b[0] for (a, b), p in zip(pairs, prompts, strict=True) if p.qtype == t]
            if same:
                row[f"top1_agreement_{t}"] = float(np.mean(same))
        row["seq16_agreement"] = float(np.mean([a == b for a, b in pairs]))
        row["token16_agreement"] = float(np.mean([np.mean(np.equal(a, b)) for a, b in pairs]))
        divergences = [kl(f, q) for f, q in zip(full.first_logprobs, o.first_logprobs, strict=True)]
        row["first_token_kl"] = float(np.mean(divergences))
        row["cached_token_fraction"] = sum(o.cached) / sum(len(p.input_ids) for p in prompts)
        if name in blend_ms:
            row["blend_server_ms"] = statistics.median(blend_ms[name])
        per_setting[name] = row
    mass = [float(np.exp(lp).sum()) for lp in full.first_logprobs]
    if not all(abs(m - 1) < 1e-2 for m in mass):
        raise RuntimeError(f"the first-token distributions do not sum to 1 (e.g. {mass[0]}): not the whole vocabulary?")
    blend, boundary, reuse = (per_setting[DEFAULT[k]] for k in ("blend", "boundary", "reuse"))
    return {
        "full_accuracy": per_setting["full"]["accuracy"],
        "prefix_only_accuracy": per_setting["prefix_only"]["accuracy"],
        "reuse_accuracy": reuse["accuracy"],
        "blend_accuracy": blend["accuracy"],
        "boundary_accuracy": boundary["accuracy"],
        "blend_top1_agreement": blend["top1_agreement"],
        "blend_first_token_kl": blend["first_token_kl"],
        "boundary_top1_agreement": boundary["top1_agreement"],
        "boundary_first_token_kl": boundary["first_token_kl"],
        "reuse_top1_agreement": reuse["top1_agreement"],
        "reuse_first_token_kl": reuse["first_token_kl"],
        "prefix_only_top1_agreement": per_setting["prefix_only"]["top1_agreement"],
        "fidelity_queries": n,
        "fidelity_model_layers": layers,
        "fidelity_check_layers": list(LMCacheConfig.blend_check_layers),
        "fidelity": per_setting,
    }


# ---------------------------------------------------------------- output


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return [rounded(v) for v in value] if isinstance(value, list) else value


def table(fidelity: dict[str, dict]) -> str:
    """The fidelity figures of every setting as a text table."""
    cols = [
        ("accuracy", "acc"),
        ("accuracy_single", "acc single"),
        ("accuracy_updated", "acc updated"),
        ("accuracy_alias", "acc alias"),
        ("top1_agreement", "top-1 agree"),
        ("seq16_agreement", "16-tok same"),
        ("token16_agreement", "tok agree"),
        ("first_token_kl", "KL(full||s)"),
        ("blend_server_ms", "blend ms"),
    ]
    width = max(len(n) for n in fidelity) + 2
    lines = ["setting".ljust(width) + "".join(f"{h:>13}" for _, h in cols)]
    for name, row in fidelity.items():
        cells = [f"{row[k]:>13.4f}" if k in row else f"{'-':>13}" for k, _ in cols]
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Left: median TTFT per strategy (log scale, ratio to full on each bar, samples as
    dots). Middle: answer accuracy per fidelity setting (bars, full prefill's as a line)
    and the top-1 agreement with full prefill (dots), on an axis zoomed to the values.
    Right: mean first-token KL(full || setting) per setting (log scale)."""
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2, 3, 3]})
    names = ["full", "prefix_only", "blend", "boundary", "reuse"]
    labels = ["full", "prefix only", "cacheblend 0.15", "boundary 16", "reuse"]
    values = [result[f"{n}_ttft_s"] for n in names]
    colors = ["tab:gray", "tab:gray", "tab:blue", "tab:blue", "tab:blue"]
    left.bar(range(len(names)), values, color=colors, alpha=0.7)
    for i, n in enumerate(names):
        left.scatter([i] * len(result["ttft_samples_s"][n]), result["ttft_samples_s"][n], color="black", s=8, zorder=3)
        left.annotate(
            f"{values[i] / values[0]:.2f}x", (i, values[i]), textcoords="offset points", xytext=(0, 6), ha="center"
        )
    left.set_xticks(range(len(names)), labels, rotation=25, ha="right")
    left.set_yscale("log")
    left.set_ylim(top=max(values) * 2)
    left.set_ylabel("TTFT (s)")
    left.set_title(f"TTFT, {result['ttft_prompt_tokens']}-token prompts (small model)")
    fidelity = result["fidelity"]
    settings = list(fidelity)
    ticks = [s.replace("_", " ") for s in settings]
    colors = ["tab:gray"] * 2 + ["tab:blue"] * (len(settings) - 2)
    acc = [fidelity[s]["accuracy"] for s in settings]
    agree = [fidelity[s]["top1_agreement"] for s in settings]
    middle.bar(range(len(settings)), acc, color=colors, alpha=0.7, label="accuracy")
    middle.axhline(fidelity["full"]["accuracy"], color="tab:gray", linestyle="--", linewidth=1)
    middle.plot(range(len(settings)), agree, "o", color="tab:red", label="top-1 agreement with full prefill")
    middle.set_ylim(max(0.0, min(acc + agree) - 0.05), 1.005)
    middle.set_xticks(range(len(settings)), ticks, rotation=35, ha="right")
    middle.set_ylabel("fraction of queries")
    middle.set_title(f"retrieval model, {result['fidelity_queries']} test prompts")
    middle.legend(loc="lower right", fontsize=8)
    kls = [fidelity[s]["first_token_kl"] for s in settings[1:]]
    right.bar(range(len(kls)), [max(k, 1e-7) for k in kls], color=colors[1:], alpha=0.7)
    right.set_yscale("log")
    right.set_xticks(range(len(kls)), ticks[1:], rotation=35, ha="right")
    right.set_ylabel("mean KL(full || setting), nats")
    right.set_title("first-token distribution")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 TTFT queries per setting, 100 fidelity queries, default settings only (under 10 minutes)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object; no progress bar")
    parser.add_argument("--prompt-tokens", type=int, default=8192, help="TTFT prompt length (default: %(default)s)")
    parser.add_argument("--doc-tokens", type=int, default=1900, help="TTFT tokens per document (default: %(default)s)")
    parser.add_argument("--ttft-queries", type=int, default=7, help="TTFT queries per setting without --quick")
    parser.add_argument("--fidelity-queries", type=int, default=None, help="default: 100 with --quick, else 400")
    parser.add_argument("--concurrency", type=int, default=8, help="fidelity requests in flight (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every server; 0: unset (default: 1 in CPU mode, where other processes "
        "on the machine otherwise stall the servers' parallel regions, else unset)",
    )
    parser.add_argument("--cpu-gb", type=float, default=1.0, help="ours' CPU tier for TTFT, GB (default: %(default)s)")
    parser.add_argument("--model-dir", default=None, help="TTFT model (default: the built-in small model)")
    parser.add_argument("--retrieval-model", default=None, help="fidelity model (default: a copy of the committed one)")
    parser.add_argument("--skip-ttft", action="store_true", help="only the fidelity part")
    parser.add_argument("--skip-fidelity", action="store_true", help="only the TTFT part")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    parser.add_argument("--png", default=os.path.join(OUT, "rag.png"), help="the figure (default: %(default)s)")
    opts = parser.parse_args()

    os.makedirs(OUT, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="rag-", dir=OUT)
    threads = opts.threads if opts.threads is not None else (1 if cpu_mode.wanted() else 0)
    servers = Servers(workdir, threads or None)
    progress = tqdm(desc="rag requests", unit="req", disable=opts.json or not sys.stderr.isatty())
    result: dict = {}
    started = time.monotonic()
    try:
        if not opts.skip_ttft:
            result.update(ttft_part(opts, servers, progress))
        if not opts.skip_fidelity:
            result.update(fidelity_part(opts, servers, progress))
    finally:
        progress.close()
        servers.stop_all()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["quick"] = opts.quick
    result["server_threads"] = threads or None
    result["wall_s"] = time.monotonic() - started
    png = None
    if "fidelity" in result and "full_ttft_s" in result:
        png = opts.png
        plot(result, png)
    if opts.json:
        print(json.dumps(rounded(result)))
        return
    for key, value in rounded(result).items():
        if key not in ("fidelity", "ttft_samples_s"):
            print(f"{key:>28}: {value}")
    if "fidelity" in result:
        print("\nfidelity (vs full prefill; KL in nats)\n" + table(result["fidelity"]))
    if png:
        print(f"\nfigure: {png}")
    if opts.keep:
        print(f"server logs: {workdir}")


if __name__ == "__main__":
    main()
