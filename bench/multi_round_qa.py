"""Multi-user, multi-round chat benchmark against any OpenAI-compatible server.

Each user has the shared system prompt, a private history, and asks `--num-rounds`
questions; every answer is appended to that user's conversation, so later rounds
resend a growing prefix that a KV cache can reuse. Requests are issued at `--qps`
(a user waits for its previous answer). Every request is streamed to measure TTFT.

    python bench/multi_round_qa.py --base-url http://127.0.0.1:30000/v1 --model default \
        --num-users 8 --num-rounds 5 --qps 1 --shared-system-prompt 1000 \
        --user-history-prompt 2000 --answer-len 64 --output out/mrqa.csv

Writes a CSV of every request and a PNG of TTFT per round next to it; prints a summary
(JSON with --json). Prompt lengths are in words of a deterministic vocabulary (about
one token each with the built-in tokenizers).
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
from tqdm import tqdm

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "to", "vu", "ze") for b in ("ba", "de", "fi", "go", "hu", "jy", "ko", "le", "mo", "ny")]


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


async def ask(session: aiohttp.ClientSession, args: argparse.Namespace, user: User, t0: float) -> Record:
    body = {
        "model": args.model, "messages": user.next_question(), "max_tokens": args.answer_len,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    start = time.perf_counter()
    ttft, answer, usage, ok = None, [], {}, True
    try:
        async with session.post(f"{args.base_url}/chat/completions", json=body) as resp:
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
        user.uid, user.round, start - t0, ttft if ttft is not None else latency, latency,
        usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), details.get("cached_tokens", 0) or 0, ok,
    )
    user.round += 1
    return record


async def run(args: argparse.Namespace) -> list[Record]:
    system = text(random.Random(args.seed), args.shared_system_prompt)
    users = [User(i, system, args) for i in range(args.num_users)]
    total = args.num_users * args.num_rounds
    records: list[Record] = []
    busy: set[int] = set()
    tasks: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    t0 = time.perf_counter()
    with tqdm(total=total, desc="requests", disable=args.json) as bar:
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(user: User) -> None:
                records.append(await ask(session, args, user, t0))
                busy.discard(user.uid)
                bar.update(1)

            issued, cursor = 0, 0
            while issued < total:
                ready = [u for u in users if u.uid not in busy and u.round < args.num_rounds]
                if ready:
                    user = min(ready, key=lambda u: ((u.uid - cursor) % len(users)))
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


def plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({r.round for r in records})
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r.round for r in records], [r.ttft_s for r in records], s=10, alpha=0.4, label="request")
    ax.plot(rounds, [statistics.mean(r.ttft_s for r in records if r.round == k) for k in rounds], "o-", label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("TTFT per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-users", type=int, default=8)
    p.add_argument("--num-rounds", type=int, default=5)
    p.add_argument("--qps", type=float, default=1.0)
    p.add_argument("--shared-system-prompt", type=int, default=1000, help="words in the system prompt all users share")
    p.add_argument("--user-history-prompt", type=int, default=2000, help="words of private history per user")
    p.add_argument("--answer-len", type=int, default=64, help="tokens generated per answer")
    p.add_argument("--model", default="default")
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--output", default="bench/out/multi_round_qa.csv", help="CSV path; the PNG goes next to it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args()

    records = asyncio.run(run(args))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(records[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(records, png)
    good = [r for r in records if r.ok]
    summary = {
        "requests": len(records), "failed": len(records) - len(good),
        "mean_ttft_s": statistics.mean(r.ttft_s for r in good) if good else None,
        "p90_ttft_s": sorted(r.ttft_s for r in good)[int(0.9 * (len(good) - 1))] if good else None,
        "mean_ttft_first_round_s": _mean([r.ttft_s for r in good if r.round == 0]),
        "mean_ttft_later_rounds_s": _mean([r.ttft_s for r in good if r.round > 0]),
        "cached_token_fraction": sum(r.cached_tokens for r in good) / max(1, sum(r.prompt_tokens for r in good)),
        "csv": args.output, "png": png,
    }
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>26}: {v}" for k, v in summary.items()))


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


if __name__ == "__main__":
    main()
