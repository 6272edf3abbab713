"""How fast an attention worker scans KV in host memory: GB/s of KV per second against threads.

The attention worker's decode attention (agents/engine/host_attention.py: a pool of threads,
each scanning (sequence, KV-head range) items with the C kernel or single-threaded SDPA, both
measured) over a paged bf16 cache
of the Llama-3-8B layer shape (8 KV heads of 128, groups of 4 query heads), `--layers` layers
of `--batch` sequences x `--context` tokens each, every layer read once per pass so that no
pass is served from the CPU caches. Beside it, on the same cores:

- the DRAM read ceiling: torch's multi-threaded bf16 sum over 2 GiB (the attention bench's
  figure) and a pool of the same threads each summing its own slice (the pool's own ceiling);
- the engine's CPU path (`attention.decode_attention`: SDPA per sequence, torch's intra-op
  threads over its KV heads), what the worker ran before;
- the pool over scattered blocks (every sequence's blocks permuted: gathered, not viewed).

The faster kernel's scan rate at all threads is what the planner's host-memory calibration
takes as the worker's attention rate (`scan_gbps`; policies/host_memory.py).

    python bench/host_attention_bench.py --out $OUT/host_attention
    python bench/host_attention_bench.py --smoke --out /tmp/host-attention   # here, < 1 min

Prints a table and writes host_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from tessera.agents.engine.attention import AttentionMetadata, decode_attention
from tessera.agents.engine.attention_worker import host_threads
from tessera.agents.engine.host_attention import HostAttention, Kernel, c_kernel

BLOCK_SIZE = 16
KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128
"""Llama-3-8B's attention: 32 query heads over 8 KV heads of 128."""


def log(message: str) -> None:
    print(message, flush=True)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: first-touch, thread start, plan caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


class ScanCase:
    """A paged cache of `layers` layers, each holding `batch` sequences of `context` tokens."""

    def __init__(
        self, batch: int, context: int, layers: int, dtype: torch.dtype, scattered: bool
    ) -> None:
        self.batch, self.context, self.layers = batch, context, layers
        width = -(-context // BLOCK_SIZE)
        blocks = 1 + batch * width
        # Every page written once (values do not change the time), so reads come from DRAM.
        self.cache = torch.empty(layers, 2, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
        self.cache.fill_(0.5)
        ids = 1 + torch.arange(batch * width, dtype=torch.int32)
        if scattered:
            ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
        self.tables = ids.view(batch, width)
        self.q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM).to(dtype)
        self.kv_bytes_per_layer = batch * context * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize

    def meta(self) -> AttentionMetadata:
        lens = [self.context] * self.batch
        return AttentionMetadata(
            slot_mapping=torch.zeros(self.batch, dtype=torch.long),
            num_decode_tokens=self.batch,
            decode_block_tables=self.tables,
            decode_context_lens=torch.tensor(lens, dtype=torch.int32),
            decode_max_context_len=self.context,
            decode_context_lens_host=lens,
        )

    def pool_pass(self, host: HostAttention) -> Callable[[], object]:
        plan = host.plan(self.meta(), BLOCK_SIZE, KV_HEADS)
        scale = HEAD_DIM**-0.5

        def run() -> object:
            for layer in range(self.layers):
                host.decode(self.q, self.cache[layer, 0], self.cache[layer, 1], plan, scale)
            return None

        return run

    def engine_pass(self) -> Callable[[], object]:
        meta = self.meta()
        scale = HEAD_DIM**-0.5

        def run() -> object:
            for layer in range(self.layers):
                decode_attention(self.q, self.cache[layer, 0], self.cache[layer, 1], meta, scale)
            return None

        return run


def dram_read_gbps(threads: int, smoke: bool) -> dict[str, float]:
    """torch's multi-threaded sum over 2 GiB, and `threads` pool threads summing slices."""
    size = (64 if smoke else 2048) * 2**20
    data = torch.ones(size // 2, dtype=torch.bfloat16)
    torch.set_num_threads(threads)
    torch_s = best_of(lambda: data.sum(), 3)
    torch.set_num_threads(1)
    slices = data.chunk(threads)
    with ThreadPoolExecutor(threads) as pool:
        pool_s = best_of(lambda: list(pool.map(torch.sum, slices)), 3)
    return {"torch_sum_gbps": size / torch_s / 1e9, "pool_sum_gbps": size / pool_s / 1e9}


def measure_scan(
    threads: int,
    batch: int,
    context: int,
    layers: int,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 2,
    scattered: bool = False,
    kernel: Kernel = "auto",
    case: ScanCase | None = None,
) -> dict[str, Any]:
    """The worker's scan rate with `threads` scanners (torch's intra-op pool set to 1, as in
    the worker; the caller's setting is restored)."""
    before = torch.get_num_threads()
    case = case or ScanCase(batch, context, layers, dtype, scattered)
    torch.set_num_threads(1)
    host = HostAttention(threads, kernel)
    try:
        seconds = best_of(case.pool_pass(host), repeats)
    finally:
        host.close()
        torch.set_num_threads(before)
    per_layer_s = seconds / layers
    return {
        "threads": threads,
        "kernel": host.kernel,
        "batch": batch,
        "context": context,
        "layers": layers,
        "scattered": scattered,
        "kv_gib_per_layer": case.kv_bytes_per_layer / 2**30,
        "per_layer_s": per_layer_s,
        "scan_gbps": case.kv_bytes_per_layer / per_layer_s / 1e9,
    }


def best_scan(threads: int, batch: int, context: int, layers: int) -> dict[str, Any]:
    """The faster kernel's scan (bf16) on `threads` threads, with every kernel's rate beside."""
    case = ScanCase(batch, context, layers, torch.bfloat16, scattered=False)
    kernels: list[Kernel] = ["c", "sdpa"] if c_kernel() is not None else ["sdpa"]
    rows = {k: measure_scan(threads, batch, context, layers, kernel=k, case=case) for k in kernels}
    best = max(rows.values(), key=lambda row: float(row["scan_gbps"]))
    return best | {"by_kernel_gbps": {k: row["scan_gbps"] for k, row in rows.items()}}


def measure_engine_path(
    threads: int, batch: int, context: int, layers: int, dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    """The engine's CPU decode attention (one SDPA per sequence) on `threads` intra-op threads."""
    before = torch.get_num_threads()
    case = ScanCase(batch, context, layers, dtype, scattered=False)
    torch.set_num_threads(threads)
    try:
        seconds = best_of(case.engine_pass(), repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "threads": threads,
        "per_layer_s": seconds / layers,
        "scan_gbps": case.kv_bytes_per_layer * layers / seconds / 1e9,
    }


def thread_counts(most: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return [*counts, most] if counts[-1] != most else counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="small shapes, here in < 1 min")
    parser.add_argument("--threads", type=int, default=host_threads(), help="most threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4, help="layers read per pass")
    args = parser.parse_args()
    if args.threads < 1:
        log(f"--threads must be >= 1, got {args.threads}")
        return 2
    batch, context, layers = (8, 1024, 2) if args.smoke else (args.batch, args.context, args.layers)
    dtype = torch.bfloat16
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "affinity_threads": host_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "shape": {"batch": batch, "context": context, "layers": layers, "dtype": str(dtype)},
    }
    kernels: list[Kernel] = ["c", "sdpa"] if c_kernel() is not None else ["sdpa"]
    rows = []
    case = ScanCase(batch, context, layers, dtype, scattered=False)
    for threads in thread_counts(args.threads):
        row: dict[str, Any] = {"threads": threads} | dram_read_gbps(threads, args.smoke)
        for kernel in kernels:
            measured = measure_scan(
                threads, batch, context, layers, dtype, kernel=kernel, case=case
            )
            row[f"{kernel}_scan_gbps"] = measured["scan_gbps"]
        row["kernel"] = max(kernels, key=lambda k: row[f"{k}_scan_gbps"])
        row["scan_gbps"] = row[f"{row['kernel']}_scan_gbps"]
        rows.append(row)
        scans = ", ".join(f"{k} {row[f'{k}_scan_gbps']:.2f}" for k in kernels)
        log(
            f"   {threads:>3} threads: scan {scans} GB/s; DRAM read "
            f"{row['torch_sum_gbps']:.1f} (torch) / {row['pool_sum_gbps']:.1f} (pool) GB/s"
        )
    del case
    results["threads"] = rows
    results["scattered"] = measure_scan(
        args.threads, batch, context, layers, dtype, scattered=True, kernel=rows[-1]["kernel"]
    )
    results["engine_path"] = measure_engine_path(args.threads, batch, context, layers, dtype, 2)
    top = rows[-1]
    results["summary"] = {
        "threads": top["threads"],
        "kernel": top["kernel"],
        "scan_gbps": top["scan_gbps"],
        "dram_read_gbps": top["torch_sum_gbps"],
        "scan_share_of_dram": top["scan_gbps"] / top["torch_sum_gbps"],
        "per_thread_scan_gbps": statistics.median(r["scan_gbps"] / r["threads"] for r in rows),
        "engine_path_scan_gbps": results["engine_path"]["scan_gbps"],
        "scattered_scan_gbps": results["scattered"]["scan_gbps"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_attention.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    shape = results["shape"]
    log("")
    log(
        f"host attention scan, {shape['batch']} x {shape['context']} tokens x {shape['layers']}"
        f" layers ({shape['dtype']}), cpu {results['cpu_capability']}, "
        f"{results['affinity_threads']} cores"
    )
    log(
        f"{'threads':>8} {'c GB/s':>8} {'sdpa GB/s':>10} {'best/thread':>12} {'DRAM GB/s':>10}"
        f" {'share':>7}"
    )
    for row in results["threads"]:
        best = row["scan_gbps"]
        log(
            f"{row['threads']:>8} {row.get('c_scan_gbps', float('nan')):>8.2f}"
            f" {row['sdpa_scan_gbps']:>10.2f} {best / row['threads']:>12.2f}"
            f" {row['torch_sum_gbps']:>10.1f} {best / row['torch_sum_gbps']:>7.1%}"
        )
    summary = results["summary"]
    log(
        f"engine path (SDPA per sequence, {summary['threads']} intra-op threads): "
        f"{summary['engine_path_scan_gbps']:.2f} GB/s; pool over scattered blocks: "
        f"{summary['scattered_scan_gbps']:.2f} GB/s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
