"""Bandwidth of the storage tiers for one chunk of Llama-3.1-8B shape, side by side with memcpy.

One chunk = 32 layers x (K, V) x 256 tokens x 8 KV heads x 128 dims of bf16 = 32 MiB,
gathered from SGLang's own MHATokenToKVPool on the CPU at scattered slots. Reported in
one run: torch copy_ of the same bytes (memcpy), CPU-tier store (pool -> slab) and
retrieve (slab -> pool), disk-tier store (encode + write) and retrieve (read + verify +
decode, page cache warm: timed after 6 reads) for raw and zstd frames, the zstandard library decoding the same
zstd frame's compressed blocks from memory on every core (the ceiling a zstd disk read can
approach), the Redis tier's store and retrieve against a redis-server it starts, with a
plain redis-py GET of the same value as the baseline, and the zstd ratio on KV produced by a forward pass of a random-weight Llama.
GB/s are 1e9 bytes per second of chunk data.

    python bench/tiers.py [--quick] [--json] [--png bench/out/tiers.png]

Also writes a PNG (--png): every bandwidth as a bar, against memcpy's as a line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lmcache_sgl import ops  # noqa: E402
from lmcache_sgl.codec import ChunkLayout, encode, frame_bytes  # noqa: E402
from lmcache_sgl.storage import CpuTier, DiskTier, Payload  # noqa: E402
from plotting import pyplot, save  # noqa: E402

LAYERS, HEADS, HEAD_DIM, TOKENS = 32, 8, 128, 256


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_pool(pool_tokens: int):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(
        pool_tokens, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=HEAD_DIM,
        layer_num=LAYERS, device="cpu", enable_memory_saver=False,
    )
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    return pool


def kv_of_random_llama(tokens: int) -> tuple[ChunkLayout, torch.Tensor]:
    """K and V of a forward pass of a random-weight Llama (GQA, bf16), as one chunk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=8192,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, cfg.vocab_size, (1, tokens)), use_cache=True).past_key_values
    k = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])  # [L, T, H, D]
    v = torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers])
    kv = torch.stack([k, v]).contiguous()
    return ChunkLayout("mha", "bfloat16", tuple(kv.shape)), kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (finishes in well under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dir", default=None, help="directory for the disk tier (default: a temp dir under bench/out)")
    parser.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "tiers.png"), help="where the figure goes (default: %(default)s)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20

    pool = make_pool(4 * TOKENS)
    buffers = pool.k_buffer + pool.v_buffer
    layout = ChunkLayout("mha", "bfloat16", (2, LAYERS, TOKENS, HEADS, HEAD_DIM))
    nbytes = layout.nbytes
    # Slots as SGLang's own allocator hands them to a prefill (runs of free slots); fully
    # scattered slots, a fragmented pool's worst case, are reported too.
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    slots = TokenToKVPoolAllocator(4 * TOKENS, torch.bfloat16, "cpu", pool, need_sort=True).alloc(TOKENS)
    scattered = torch.randperm(4 * TOKENS)[:TOKENS].add(1)  # slot 0 is SGLang's padding slot
    gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731

    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    src.random_(0, 256)
    result = {"memcpy_gbps": gbps(timed(lambda: dst.copy_(src), repeats))}

    cpu = CpuTier(4 * nbytes, nbytes)
    keys = iter(range(1 << 30))
    gather = lambda buf: ops.gather(buffers, slots, buf)  # noqa: E731
    # Warm-up stores cycle through every slab once: the arena's pages are faulted in once
    # per process, which is not what a steady-state store costs.
    store = lambda: cpu.store(next(keys).to_bytes(16, "little"), layout, gather)  # noqa: E731
    result["cpu_store_gbps"] = gbps(timed(store, repeats, warmup=cpu.num_slabs + 1))
    key = cpu.keys()[-1]

    def retrieve() -> None:
        data = cpu.pin(key, layout)
        ops.scatter(buffers, slots, data)
        cpu.unpin(key)

    result["cpu_retrieve_gbps"] = gbps(timed(retrieve, repeats))
    out_buf = torch.empty(nbytes, dtype=torch.uint8)
    result["cpu_store_scattered_slots_gbps"] = gbps(timed(lambda: ops.gather(buffers, scattered, out_buf), repeats))
    result["cpu_retrieve_scattered_slots_gbps"] = gbps(timed(lambda: ops.scatter(buffers, scattered, out_buf), repeats))

    chunk = torch.empty(nbytes, dtype=torch.uint8)
    ops.gather(buffers, slots, chunk)
    out = torch.empty(nbytes, dtype=torch.uint8)
    root = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(root, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tiers-", dir=root)
    try:
        for codec in ("raw", "zstd"):
            disk = DiskTier(os.path.join(workdir, codec), capacity_bytes=8 * nbytes, codec=codec)

            def store() -> None:
                disk.put(next(keys).to_bytes(16, "little"), layout, Payload(chunk, 0))
                disk.flush()

            store_s = timed(store, max(2, repeats // 2))
            last = disk.keys()[-1]
            # Warm: the first reads of a frame just written ran slower here (one probe, GB/s
            # per read: 4, 8, 14, 14, 16, then 17-19), and plain preads of a file just
            # written ramp up alike (13, 13, 18, 19, then 20-22): the kernel's, not the reader's.
            retrieve_s = timed(lambda: disk.get_into(last, layout, out), repeats, warmup=6)
            assert torch.equal(out, chunk), "disk tier returned other bytes"
            prefix = "disk" if codec == "zstd" else "disk_raw"
            result[f"{prefix}_store_gbps"] = gbps(store_s)
            result[f"{prefix}_retrieve_gbps"] = gbps(retrieve_s)
            disk.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["zstd_decode_gbps"] = gbps(timed(_zstd_decoder(layout, chunk), repeats))
    result.update(_redis(layout, chunk, out, keys, repeats, gbps))

    kv_layout, kv = kv_of_random_llama(512 if args.quick else 2048)
    plain = kv.reshape(-1).view(torch.uint8)
    result["zstd_ratio"] = kv_layout.nbytes / len(frame_bytes(encode(bytes(16), kv_layout, kv, "zstd", 1)))
    result["zstd_ratio_unshuffled"] = _plain_zstd_ratio(plain)
    result["cpu_store_vs_memcpy"] = result["cpu_store_gbps"] / result["memcpy_gbps"]
    result["cpu_retrieve_vs_memcpy"] = result["cpu_retrieve_gbps"] / result["memcpy_gbps"]
    result["compiled_kernels"] = ops.HAVE_EXTENSION
    result["threads"] = torch.get_num_threads()

    plot(result, args.png)
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        for name, value in result.items():
            print(f"{name:>28}: {value:.3f}" if isinstance(value, float) else f"{name:>28}: {value}")


def plot(result: dict, path: str) -> None:
    """Every *_gbps figure as a horizontal bar, memcpy's as a vertical line through them."""
    plt = pyplot()
    names = [k for k in result if k.endswith("_gbps") and k != "memcpy_gbps"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [result[k] for k in names], color="tab:blue")
    ax.axvline(result["memcpy_gbps"], color="tab:red", linestyle="--", label=f"memcpy {result['memcpy_gbps']:.1f} GB/s")
    ax.set_yticks(range(len(names)), [k[: -len("_gbps")].replace("_", " ") for k in names])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("GB/s (log scale)")
    ax.set_title(f"Tier bandwidth, one {LAYERS}-layer 256-token chunk (zstd ratio {result['zstd_ratio']:.2f})")
    ax.legend(loc="lower right")
    save(fig, path)


def _redis(layout: ChunkLayout, chunk: torch.Tensor, out: torch.Tensor, keys, repeats: int, gbps) -> dict:
    """The Redis tier (naive frames) against a redis-server started here on loopback:
    store (encode + SET, through the writer), retrieve (GET + verify + copy into `out`),
    and a plain redis-py GET of the same value, the baseline."""
    if shutil.which("redis-server") is None:
        return {"redis": "redis-server not installed"}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from redis_servers import RedisServer

    from lmcache_sgl.storage.redis import RedisTier

    server = RedisServer()
    tier = RedisTier(server.url, timeout_s=5.0)
    try:
        def store() -> None:
            tier.put(next(keys).to_bytes(16, "little"), layout, Payload(chunk, 0))
            tier.flush()

        store_s = timed(store, max(2, repeats // 2))
        last = next(iter(tier._known))
        retrieve_s = timed(lambda: tier.get_into(last, layout, out), repeats)
        assert torch.equal(out, chunk), "redis tier returned other bytes"
        client, name = server.client(), tier._rkey(last)
        raw_s = timed(lambda: client.get(name), repeats)
        return {"redis_store_gbps": gbps(store_s), "redis_retrieve_gbps": gbps(retrieve_s), "redis_raw_gbps": gbps(raw_s)}
    finally:
        tier.close()
        server.stop()


def _zstd_decoder(layout: ChunkLayout, chunk: torch.Tensor):
    """A function that decodes the compressed blocks of `chunk`'s zstd frame with the
    zstandard library alone, from memory, on every core: one contiguous range of blocks
    per core, as the disk tier's reader splits a frame (one task per block would add a
    task's overhead per block to the ceiling)."""
    import zstandard

    blocks = encode(bytes(16), layout, chunk, "zstd", 1)[2:-1]  # header, block table, blocks..., digest
    workers = os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers)
    ranges = [blocks[i * len(blocks) // workers : (i + 1) * len(blocks) // workers] for i in range(workers)]
    local = threading.local()

    def decode(part: list) -> int:
        if not hasattr(local, "dctx"):
            local.dctx = zstandard.ZstdDecompressor()
        return sum(len(local.dctx.decompress(block)) for block in part)

    return lambda: sum(pool.map(decode, ranges))


def _plain_zstd_ratio(plain: torch.Tensor) -> float:
    import zstandard

    return plain.numel() / len(zstandard.ZstdCompressor(level=1).compress(plain.numpy().tobytes()))


if __name__ == "__main__":
    main()
