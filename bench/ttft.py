"""Time to first token on real SGLang servers: lmcache-sgl vs stock SGLang, side by side.

All servers run the built-in `small` model (random-weight Llama, 8 layers, hidden 768)
with the same small device pool (--max-total-tokens = 1.5 prompts), so a second prompt
evicts the first one from SGLang's radix tree. Phases, each a /generate of one token:

  ours (--enable-lmcache; CPU and disk tiers)
    cold          prompt A, nothing cached
    device hit    A again (SGLang's radix tree): 3 times after cold, and once right after
                  each CPU-tier and disk-tier hit (which put A back in the tree), so the
                  hits compared were measured side by side; median of all
    CPU-tier hit  A after other prompts filled the pool and pushed A out, median of 5
    disk-tier hit A after a server restart (CPU tier empty), its frames in the page cache
                  (read just before the restart); 2 restarts with --quick, else 3
    cold disk hit the same, its frames dropped from the page cache first (fadvise
                  DONTNEED), so they are read from the device; 1 restart with --quick, else 2
    Redis hit     prompt R on a second instance (no disk tier), its first request for R after
                  another instance, sharing one redis-server started by the benchmark,
                  served R (skipped, key null, where redis-server is not installed)
  A freshly started server's first long request pays the process's first use of that much
  memory (CPU development mode: torch's allocator faults fresh pages in for the attention's
  buffers; 0.1-0.3 s at 8K tokens here, with or without a tier hit). So the first server
  also computes a warm-up prompt W, and each restarted or second instance serves W (a disk
  or Redis hit of other chunks) before the hit that is timed, as a warm server would.
  baseline (stock SGLang, same pool): A cold, then A after the same eviction (recomputed)
  stock backend (no lmcache, SGLang's unmodified CPU extend attention): cold, device hit
  Where the frames are is set, not left to chance: some machines drop idle file pages on
  their own (this VM's DAMON pageout drops those unread for about a minute, so the first
  restart used to read from the device and the next from the page cache).
  no reuse: all-distinct prompts, concurrently, on ours and on the baseline, 4 rounds
    each in ABBA order: the throughput ratio shows what storing costs when nothing is
    reused.

On a CPU-only machine every server runs in CPU development mode, ours and the baseline
with the new-tokens-only extend attention; the stock-backend figures show its effect.

    python bench/ttft.py [--quick] [--json] [--prompt-tokens 8192] [--png bench/out/ttft.png]

Also writes a PNG (--png): every phase's samples and median side by side, and the
no-reuse throughput per round of both servers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import redis  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lmcache_sgl.cli import default_model_dir  # noqa: E402
from lmcache_sgl.models import make_model  # noqa: E402
from lmcache_sgl.server import SGLangServer, free_port, wait_for_files  # noqa: E402
from plotting import pyplot, save  # noqa: E402


def ttft(server: SGLangServer, prompt: list[int]) -> tuple[float, int]:
    """Seconds for a one-token generation (prefill + first token), and the cached tokens."""
    start = time.perf_counter()
    reply = server.generate(prompt, max_new_tokens=1, return_logprob=False)
    return time.perf_counter() - start, reply["meta_info"]["cached_tokens"]


def throughput(server: SGLangServer, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens (prompt + generated) per second for all prompts sent at once."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: server.generate(p, max_new_tokens=new_tokens, return_logprob=False, ignore_eos=True), prompts))
    tokens = sum(len(p) + len(r["output_ids"]) for p, r in zip(prompts, replies))
    return tokens / (time.perf_counter() - start)


STARTED: list[SGLangServer] = []


def page_cache(directory: str, keep: bool) -> None:
    """Read every frame under `directory` into the page cache (keep), or write them out and
    drop them from it (not keep), so that a server reads them from the device."""
    os.sync()
    for entry in os.scandir(directory):
        if entry.name.endswith(".lmsg"):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                if keep:
                    while os.read(fd, 1 << 22):
                        pass
                else:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def start(model: str, args: list[str], workdir: str, name: str, env: dict | None = None) -> SGLangServer:
    server = SGLangServer(model, extra_args=args, env_overrides=env, log_path=os.path.join(workdir, f"{name}.log"))
    STARTED.append(server)
    server.start()
    server.wait_healthy(timeout=600)
    server.generate(list(range(100, 164)), max_new_tokens=2)  # warm-up
    return server


def start_redis(workdir: str) -> tuple[subprocess.Popen, str] | None:
    """A redis-server on a free loopback port (no persistence), and its URL; None if
    redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one cold prefill, two disk-tier hits and one cold disk hit instead of 3, 3 and 2")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--model-dir", default=None, help="default: the built-in small model (built if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    parser.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "ttft.png"), help="where the figure goes (default: %(default)s)")
    opts = parser.parse_args()

    model = opts.model_dir or str(make_model(default_model_dir("small", 0), "small", 0))
    n = opts.prompt_tokens
    samples = 1 if opts.quick else 3  # cold prefills (each needs a fresh prompt)
    restarts = 2 if opts.quick else 3  # disk-tier hits (each needs a fresh server)
    cold_restarts = 1 if opts.quick else 2  # the same, frames read from the device
    repeats = 3  # device hits right after the cold prefill
    cpu_repeats = 5  # CPU-tier hits, each after a fresh eviction
    rng = random.Random(0)
    vocab = 4000
    prompt = lambda length=n: [rng.randrange(10, vocab) for _ in range(length)]  # noqa: E731
    targets = [prompt() for _ in range(samples)]  # the prompts whose TTFT we follow
    # Evictors: half-prompts filling the whole device pool, so nothing of a target stays.
    pool_tokens = n + n // 2
    evict_sets = [[prompt(n // 2) for _ in range(3)] for _ in range(cpu_repeats)]
    distinct = [[prompt(2048) for _ in range(6)] for _ in range(4)]
    pool_args = ["--max-total-tokens", str(pool_tokens)]

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ttft-", dir=out)
    config = os.path.join(workdir, "lmcache.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 2.0, "local_disk": os.path.join(workdir, "disk"), "max_local_disk_size": 4.0}, f)
    ours_args = ["--enable-lmcache", "--lmcache-config-file", config, *pool_args]
    shared_prompt = prompt()  # the Redis phase's prompt R
    warm_up = prompt()  # W, drawn last so the other prompts stay those of earlier runs
    redis_server = None
    phases: dict[str, list[float]] = {}
    cached: dict[str, list[int]] = {}

    # A progress bar of requests on a terminal; quiet with --json.
    progress = tqdm(desc="ttft requests", unit="req", disable=opts.json or not sys.stderr.isatty())

    def record(phase: str, server: SGLangServer, p: list[int]) -> None:
        seconds, hit = ttft(server, p)
        phases.setdefault(phase, []).append(seconds)
        cached.setdefault(phase, []).append(hit)
        progress.set_postfix_str(phase)
        progress.update()

    def evict(phase: str, server: SGLangServer, k: int) -> None:
        for p in evict_sets[k]:
            record(phase, server, p)

    try:
        ours = start(model, ours_args, workdir, "ours")
        ttft(ours, warm_up)  # stored: the restarted servers' warm-up
        for a in targets:
            record("cold", ours, a)
            for _ in range(repeats):
                record("device_hit", ours, a)
            for k in range(cpu_repeats):
                evict("evict", ours, k)
                record("cpu_hit", ours, a)
                record("device_hit", ours, a)  # A is in the tree again: a device hit right next to it
        base = start(model, pool_args, workdir, "baseline")
        for a in targets:
            record("baseline_cold", base, a)
            evict("baseline_evict", base, 0)
            record("baseline_revisit", base, a)
        # No reuse: the same all-distinct workloads on both live servers (idle ones sleep),
        # in the order ours, base, base, ours, base, ours, ours, base, so a drift of this
        # machine's speed cancels.
        rates = {"ours": [], "base": []}
        for i, prompts in enumerate(distinct):
            order = [("ours", ours), ("base", base)][:: 1 if i in (0, 3) else -1]
            for name, server in order:
                # Ours writes to disk while idle: let that settle first, so it never runs
                # during the baseline's round.
                wait_for_files(os.path.join(workdir, "disk"))
                rates[name].append(throughput(server, prompts, 16))
        base.stop()
        wait_for_files(os.path.join(workdir, "disk"))  # let the idle server finish its disk writes
        ours.stop()
        for i, phase in enumerate(["disk_hit"] * restarts + ["disk_cold_hit"] * cold_restarts):
            page_cache(os.path.join(workdir, "disk"), keep=phase == "disk_hit")
            ours = start(model, ours_args, workdir, f"ours-restarted-{i}")
            ttft(ours, warm_up)
            record(phase, ours, targets[i % samples])
            record("device_hit", ours, targets[i % samples])
            ours.stop()

        redis_server = start_redis(workdir)
        if redis_server is not None:
            shared = os.path.join(workdir, "redis.yaml")
            with open(shared, "w") as f:
                yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 2.0, "remote_url": redis_server[1]}, f)
            redis_args = ["--enable-lmcache", "--lmcache-config-file", shared, *pool_args]
            first = start(model, redis_args, workdir, "redis-first")
            for p in (warm_up, shared_prompt):
                ttft(first, p)
            first.stop()  # a stopping server writes what it has queued
            second = start(model, redis_args, workdir, "redis-second")
            ttft(second, warm_up)
            record("redis_hit", second, shared_prompt)
            record("device_hit", second, shared_prompt)
            second.stop()

        stock = start(model, pool_args, workdir, "stock-backend", env={"LMCACHE_SGL_CPU_EXTEND": "0"})
        for a in targets:
            record("stock_backend_cold", stock, a)
            for _ in range(repeats):
                record("stock_backend_device_hit", stock, a)
        stock.stop()
    finally:
        progress.close()
        for server in STARTED:
            server.stop()
        if redis_server is not None:
            redis_server[0].kill()
            redis_server[0].wait()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in phases.items()}
    result = {
        "cold_ttft_s": med["cold"],
        "device_hit_ttft_s": med["device_hit"],
        "cpu_hit_ttft_s": med["cpu_hit"],
        "disk_hit_ttft_s": med["disk_hit"],
        "disk_cold_hit_ttft_s": med["disk_cold_hit"],
        "redis_hit_ttft_s": med.get("redis_hit"),
        "baseline_revisit_ttft_s": med["baseline_revisit"],
        "stock_backend_cold_ttft_s": med["stock_backend_cold"],
        "stock_backend_device_hit_ttft_s": med["stock_backend_device_hit"],
        "prompt_tokens": n,
        "noreuse_throughput_ratio": sum(rates["ours"]) / sum(rates["base"]),
        "baseline_cold_ttft_s": med["baseline_cold"],
        "cached_tokens": {k: min(v) for k, v in cached.items() if not k.endswith("evict")},
        "cpu_hit_vs_device_hit": med["cpu_hit"] / med["device_hit"],
        "cpu_hit_vs_cold": med["cpu_hit"] / med["cold"],
        "disk_hit_vs_device_hit": med["disk_hit"] / med["device_hit"],
        "disk_hit_vs_cold": med["disk_hit"] / med["cold"],
        "disk_cold_hit_vs_device_hit": med["disk_cold_hit"] / med["device_hit"],
        "redis_hit_vs_device_hit": med["redis_hit"] / med["device_hit"] if "redis_hit" in med else None,
        "redis_hit_vs_cold": med["redis_hit"] / med["cold"] if "redis_hit" in med else None,
        "cold_vs_stock_backend_cold": med["cold"] / med["stock_backend_cold"],
        "baseline_revisit_vs_cold": med["baseline_revisit"] / med["cold"],
        "noreuse_throughput_per_round": {k: [round(x) for x in v] for k, v in rates.items()},
        "samples_s": {k: [round(x, 4) for x in v] for k, v in phases.items() if not k.endswith("evict")},
    }
    plot(phases, rates, n, opts.png)
    if opts.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        for key, value in result.items():
            print(f"{key:>34}: {value:.4f}" if isinstance(value, float) else f"{key:>34}: {value}")


def plot(phases: dict[str, list[float]], rates: dict[str, list[float]], prompt_tokens: int, path: str) -> None:
    """Left: each phase's TTFT samples (dots) and median (bar), log scale, grouped by
    server. Right: the no-reuse throughput of ours and the baseline, round by round."""
    plt = pyplot()
    names = [p for p in phases if not p.endswith("evict")]
    colors = {"baseline": "tab:gray", "stock": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for i, name in enumerate(names):
        color = colors.get(name.split("_")[0], "tab:blue")
        left.bar(i, statistics.median(phases[name]), color=color, alpha=0.5)
        left.scatter([i] * len(phases[name]), phases[name], color=color, s=12, zorder=3)
    left.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
    left.set_yscale("log")
    left.set_ylabel("TTFT (s)")
    left.set_title(f"TTFT per phase, {prompt_tokens}-token prompt (blue: ours)")
    for name, values in rates.items():
        right.plot(range(1, len(values) + 1), values, "o-", label={"ours": "ours", "base": "baseline"}[name])
    right.set_xlabel("round")
    right.set_ylabel("tokens/s")
    right.set_title("no reuse: throughput")
    right.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
