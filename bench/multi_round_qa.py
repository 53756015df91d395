"""Multi-user, multi-round chat benchmark against any OpenAI-compatible server.

Each user has the shared system prompt, a private history, and asks `--num-rounds`
questions; every answer is appended to that user's conversation, so later rounds
resend a growing prefix that a KV cache can reuse. Requests are issued at `--qps`
(a user waits for its previous answer). Every request is streamed to measure TTFT.

    python bench/multi_round_qa.py --base-url http://127.0.0.1:30000/v1 --model default \
        --num-users 8 --num-rounds 5 --qps 1 --shared-system-prompt 1000 \
        --user-history-prompt 2000 --answer-len 64 --output out/mrqa.csv

Writes a CSV of every request and a PNG next to it (TTFT per round, CDF of TTFT);
prints a summary (JSON with --json). Prompt lengths are in words of a deterministic
vocabulary: about 3.2 tokens each with the built-in models' tokenizer, ~1-2 with
common ones. bench/workload.py imports `add_workload_args`, `run`, `write_csv`, `plot`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass

import aiohttp
from plotting import pyplot, save
from tqdm import tqdm

WORDS = [
    f"{a}{b}"
    for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "to", "vu", "ze")
    for b in ("ba", "de", "fi", "go", "hu", "jy", "ko", "le", "mo", "ny")
]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Record:
    user: int
    round: int
    start_s: float
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ok: bool


class User:
    def __init__(self, uid: int, system: str, args: argparse.Namespace) -> None:
        rng = random.Random(args.seed * 1000 + uid)
        self.uid, self.rng = uid, rng
        self.messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": "My notes: " + text(rng, args.user_history_prompt)},
            {"role": "assistant", "content": "Noted."},
        ]
        self.round = 0

    def next_question(self) -> list[dict]:
        self.messages.append({"role": "user", "content": f"Question {self.round}: " + text(self.rng, 20)})
        return self.messages


async def ask(session: aiohttp.ClientSession, args: argparse.Namespace, url: str, user: User, t0: float) -> Record:
    """One streamed chat completion for the user's next question; its answer joins the
    conversation. Failed: an HTTP or stream error, or no content token at all."""
    body = {
        "model": args.model,
        "messages": user.next_question(),
        "max_tokens": args.answer_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    start = time.perf_counter()
    ttft, answer, usage, ok = None, [], {}, True
    try:
        async with session.post(f"{url}/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        answer.append(piece)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
        ok = False
    latency = time.perf_counter() - start
    user.messages.append({"role": "assistant", "content": "".join(answer) or "..."})
    details = (usage or {}).get("prompt_tokens_details") or {}
    record = Record(
        user.uid,
        user.round,
        start - t0,
        ttft if ttft is not None else latency,
        latency,
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        details.get("cached_tokens", 0) or 0,
        ok and ttft is not None,
    )
    user.round += 1
    return record


async def run(args: argparse.Namespace, url: str, desc: str = "requests") -> list[Record]:
    """Drive the whole workload of `args` (add_workload_args' flags, plus model and json)
    against the OpenAI API at `url`; every request's record, in start order. A progress
    bar named `desc` unless args.json."""
    system = text(random.Random(args.seed), args.shared_system_prompt)
    users = [User(i, system, args) for i in range(args.num_users)]
    total = args.num_users * args.num_rounds
    records: list[Record] = []
    busy: set[int] = set()
    tasks: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    t0 = time.perf_counter()
    with tqdm(total=total, desc=desc, disable=args.json) as bar:
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(user: User) -> None:
                records.append(await ask(session, args, url, user, t0))
                busy.discard(user.uid)
                bar.update(1)

            issued, cursor = 0, 0
            while issued < total:
                ready = [u for u in users if u.uid not in busy and u.round < args.num_rounds]
                if ready:
                    user = min(ready, key=lambda u: (u.uid - cursor) % len(users))
                    cursor = user.uid + 1
                    busy.add(user.uid)
                    task = asyncio.create_task(one(user))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    issued += 1
                    await asyncio.sleep(1.0 / args.qps)
                else:
                    await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.start_s)


def write_csv(rows: list[dict], path: str) -> None:
    """One row per dict (the first one's keys are the header), directories created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def round_means(records: list[Record]) -> list[float | None]:
    """Mean TTFT of the successful requests of each round, by round index."""
    rounds = range(max((r.round for r in records), default=-1) + 1)
    return [mean([r.ttft_s for r in records if r.ok and r.round == k]) for k in rounds]


def cached_fraction(records: list[Record]) -> float:
    """Cached / prompt tokens over the successful requests (the server's usage report)."""
    good = [r for r in records if r.ok]
    return sum(r.cached_tokens for r in good) / max(1, sum(r.prompt_tokens for r in good))


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest lower rank."""
    return sorted(values)[int(q * (len(values) - 1))] if values else None


def plot(series: dict[str, list[Record]], path: str) -> None:
    """Left: TTFT of every request per round (dots) and the round means (line), one
    colour per series. Right: the CDF of TTFT of each series."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, records) in enumerate(series.items()):
        ok = [r for r in records if r.ok]
        color = f"C{i}"
        left.scatter(
            [r.round + (i - (len(series) - 1) / 2) * 0.08 for r in ok],
            [r.ttft_s for r in ok],
            s=10,
            alpha=0.35,
            color=color,
        )
        means = round_means(records)
        left.plot(
            [k for k, m in enumerate(means) if m is not None],
            [m for m in means if m is not None],
            "o-",
            color=color,
            label=f"{name} mean",
        )
        ttfts = sorted(r.ttft_s for r in ok)
        right.step(ttfts, [(k + 1) / len(ttfts) for k in range(len(ttfts))], where="post", color=color, label=name)
    left.set_xticks(range(max((r.round for rs in series.values() for r in rs), default=0) + 1))
    left.set_xlabel("round")
    left.set_ylabel("TTFT (s)")
    left.set_title("TTFT per round")
    left.legend()
    right.set_xlabel("TTFT (s)")
    right.set_ylabel("fraction of requests")
    right.set_title("CDF of TTFT")
    right.legend()
    _log_seconds(left, "y")
    _log_seconds(right, "x")
    save(fig, path)


def _log_seconds(ax, which: str) -> None:
    """Axis `which` ("x" or "y") of `ax` on a log scale, labelled at 1, 2 and 5 times each
    power of ten in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def add_workload_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The workload's flags (those of LMCache's multi-round QA benchmark, plus seed and
    request timeout); `defaults` overrides the defaults by destination name."""
    p.add_argument("--num-users", type=int, default=8)
    p.add_argument("--num-rounds", type=int, default=5)
    p.add_argument("--qps", type=float, default=1.0, help="requests issued per second (a user waits for its answer)")
    p.add_argument("--shared-system-prompt", type=int, default=1000, help="words in the system prompt all users share")
    p.add_argument("--user-history-prompt", type=int, default=2000, help="words of private history per user")
    p.add_argument("--answer-len", type=int, default=64, help="tokens generated per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600, help="seconds one request may take")
    p.set_defaults(**defaults)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--model", default="default")
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--output", default="bench/out/multi_round_qa.csv", help="CSV path; the PNG goes next to it")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args()

    records = asyncio.run(run(args, args.base_url))
    write_csv([asdict(r) for r in records], args.output)
    png = os.path.splitext(args.output)[0] + ".png"
    plot({"ttft": records}, png)
    good = [r for r in records if r.ok]
    summary = {
        "requests": len(records),
        "failed": len(records) - len(good),
        "mean_ttft_s": mean([r.ttft_s for r in good]),
        "p90_ttft_s": percentile([r.ttft_s for r in good], 0.9),
        "mean_ttft_first_round_s": mean([r.ttft_s for r in good if r.round == 0]),
        "mean_ttft_later_rounds_s": mean([r.ttft_s for r in good if r.round > 0]),
        "cached_token_fraction": cached_fraction(records),
        "csv": args.output,
        "png": png,
    }
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>26}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
