"""A/B on a real workload: stock SGLang vs SGLang with --enable-lmcache, one after the other.

Both servers run the same model (default: the built-in `small`), the same device pool
(--max-total-tokens) and the same flags (--enable-cache-report, so the API reports
cached tokens); ours adds only --enable-lmcache with a CPU tier
and a disk tier in a work directory. Each is driven by the same multi-user, multi-round
chat workload of bench/multi_round_qa.py (same seed, so the same prompts) through the
OpenAI-compatible API, streaming. The defaults give every user a ~5.3K-token first
prompt, so six users' histories (~32K tokens, growing) do not fit the 16384-token pool:
by a user's next round the tree has evicted most of its history, which stock SGLang
recomputes and ours loads from its tiers.

    python bench/workload.py [--quick] [--json] [--output bench/out/workload.csv]

Writes a CSV of every request of both servers and a PNG next to it (TTFT per round for
both servers, CDF of TTFT). --json prints one object: stock_mean_ttft_s,
ours_mean_ttft_s, mean_ttft_ratio and p90_ttft_ratio (ours / stock), throughput_ratio
(completed requests per second, ours / stock), ours_cached_token_fraction (cached /
prompt tokens), failed_requests (both servers), stock_round_mean_ttft_s and
ours_round_mean_ttft_s (mean TTFT of each round). --keep keeps the server logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import yaml  # noqa: E402
from multi_round_qa import (  # noqa: E402
    Record,
    add_workload_args,
    cached_fraction,
    mean,
    percentile,
    plot,
    round_means,
    run,
    write_csv,
)

from lmcache_sgl.cli import default_model_dir  # noqa: E402
from lmcache_sgl.models import make_model  # noqa: E402
from lmcache_sgl.server import SGLangServer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
WORKLOAD = dict(num_users=6, num_rounds=5, qps=0.1, shared_system_prompt=500, user_history_prompt=1150, answer_len=64)
QUICK = dict(num_users=5, qps=0.125)  # changes to WORKLOAD for --quick: ~8 minutes here
LMCACHE = dict(chunk_size=256, max_local_cpu_size=2.0, max_local_disk_size=4.0, write_policy="write_through")


def serve_and_drive(model: str, flags: list[str], args: argparse.Namespace, log_path: str, name: str) -> list[Record]:
    """Start a server with `flags`, warm it up, run the workload against it, stop it."""
    server = SGLangServer(model, extra_args=flags, log_path=log_path)
    try:
        server.start()
        server.wait_healthy(timeout=600)
        server.generate(list(range(100, 164)), max_new_tokens=2, return_logprob=False)
        return asyncio.run(run(args, server.url + "/v1", desc=name))
    finally:
        server.stop()


def throughput(records: list[Record]) -> float:
    """Completed requests per second, from the first request's start to the last one's end."""
    span = max(r.start_s + r.latency_s for r in records) - min(r.start_s for r in records)
    return sum(r.ok for r in records) / span


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing (no successful request) or b is 0."""
    return a / b if a is not None and b else None


def summary(results: dict[str, list[Record]]) -> dict:
    """The JSON object described in the module docstring."""
    stock, ours = results["stock"], results["ours"]
    ttfts = {name: [r.ttft_s for r in records if r.ok] for name, records in results.items()}
    return {
        "stock_mean_ttft_s": mean(ttfts["stock"]),
        "ours_mean_ttft_s": mean(ttfts["ours"]),
        "mean_ttft_ratio": ratio(mean(ttfts["ours"]), mean(ttfts["stock"])),
        "p90_ttft_ratio": ratio(percentile(ttfts["ours"], 0.9), percentile(ttfts["stock"], 0.9)),
        "throughput_ratio": ratio(throughput(ours), throughput(stock)),
        "ours_cached_token_fraction": cached_fraction(ours),
        "failed_requests": sum(not r.ok for r in stock + ours),
        "stock_round_mean_ttft_s": round_means(stock),
        "ours_round_mean_ttft_s": round_means(ours),
    }


def rounded(value):
    """`value` with every float in it rounded to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return [rounded(v) for v in value] if isinstance(value, list) else value


def main() -> None:
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, **{**WORKLOAD, **(QUICK if quick.parse_known_args()[0].quick else {})})
    p.add_argument("--quick", action="store_true", help="5 users at 0.125 QPS instead of 6 at 0.1 (~8 minutes here)")
    p.add_argument("--max-total-tokens", type=int, default=16384, help="device pool of both servers, in tokens")
    p.add_argument("--model-dir", default=None, help="default: the built-in small model (built if missing)")
    p.add_argument("--output", default=os.path.join(OUT, "workload.csv"), help="CSV path; the PNG goes next to it")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, disk tier)")
    p.add_argument("--json", action="store_true", help="print one JSON object; no progress bars")
    args = p.parse_args()
    args.model = "default"

    model = args.model_dir or str(make_model(default_model_dir("small", 0), "small", 0))
    os.makedirs(OUT, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="workload-", dir=OUT)
    config = os.path.join(workdir, "lmcache.yaml")
    with open(config, "w") as f:  # configs/serve.yaml's tiers, the disk tier in the work directory
        yaml.safe_dump({**LMCACHE, "local_disk": os.path.join(workdir, "disk")}, f)
    flags = ["--max-total-tokens", str(args.max_total_tokens), "--enable-cache-report"]  # cached_tokens in usage
    results: dict[str, list[Record]] = {}
    try:
        for name, extra in (("stock", []), ("ours", ["--enable-lmcache", "--lmcache-config-file", config])):
            results[name] = serve_and_drive(model, flags + extra, args, os.path.join(workdir, f"{name}.log"), name)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    write_csv([{"server": name, **asdict(r)} for name, records in results.items() for r in records], args.output)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    result = summary(results)
    if args.json:
        print(json.dumps(rounded(result)))
    else:
        for key, value in {**result, "csv": args.output, "png": png, "logs": workdir if args.keep else None}.items():
            print(f"{key:>27}: {rounded(value)}")


if __name__ == "__main__":
    main()
