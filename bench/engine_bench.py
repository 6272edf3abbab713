"""Benchmark of the inference engine on one GPU against its roofline.

For a Llama-3-8B-shaped model with random bf16 weights made on the GPU:
- the two ceilings, measured here: HBM bandwidth (a large device-to-device copy, bytes read +
  written) and bf16 matrix-product rate (8192^3 GEMM);
- decode step time (CUDA graph of the whole step, Triton paged attention) at batch 1/16/64/256
  and context 1k/4k, against the roofline (weights read + live KV read) / measured bandwidth;
  configurations whose KV cache does not fit in the GPU's free memory are reported as such;
- prefill throughput for one 4k-token prompt against the datasheet and measured bf16 peak.

Before timing it checks the Triton path against the torch path on a 2-layer model of the same
shapes. Prints a table, writes JSON and (with --calibration) the per-class calibration YAML
that policies/efficiency.py reads.

    python bench/engine_bench.py --out bench/results/engine_bench_h100.json \\
        --calibration policies/calibration/h100.yaml
    python bench/engine_bench.py --from-results bench/results/engine_bench_h200.json \\
        --calibration policies/calibration/h200.yaml      # from a run's JSON, on any machine
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from tessera.agents.engine import ops
from tessera.agents.engine.attention import (
    AttentionMetadata,
    PrefillSpan,
    set_prefill_sdpa_backends,
)
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.cuda_graphs import DecodeGraphRunner
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.weights import random_llama_weights

GiB = 2**30
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
# Dense bf16 tensor-core peak and HBM bandwidth from the datasheets (the AcceleratorClass
# figures that the performance model scales by the calibrated efficiencies).
DATASHEET = {
    "H100": {"bf16_tflops": 989.0, "hbm_gbps": 3350.0, "accelerator": "H100-SXM5-80GB"},
    "H200": {"bf16_tflops": 989.0, "hbm_gbps": 4800.0, "accelerator": "H200-SXM-141GB"},
}


def datasheet_for(name: str) -> dict[str, Any]:
    for key, values in DATASHEET.items():
        if key in name:
            return values
    return {"bf16_tflops": float("nan"), "hbm_gbps": float("nan"), "accelerator": name}


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_in_graph(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median ms of one call, from a CUDA graph of `repeats` calls (no launch overhead, as in
    the engine's captured decode step)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    times = time_cuda(graph.replay, warmup=2, iters=10)
    return statistics.median(times) / repeats


def measure_bandwidth_gbps(nbytes: int = 4 * GiB) -> dict[str, float]:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_cuda(lambda: dst.copy_(src), warmup=3, iters=20)
    median = statistics.median(times)
    return {"bytes": nbytes, "median_ms": median, "gbps": 2 * nbytes / (median * 1e-3) / 1e9}


def measure_matmul_tflops(n: int = 8192) -> dict[str, float]:
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    times = time_cuda(lambda: a @ b, warmup=5, iters=20)
    median = statistics.median(times)
    return {"n": n, "median_ms": median, "tflops": 2 * n**3 / (median * 1e-3) / 1e12}


def check_triton_against_torch(config: LlamaConfig) -> dict[str, Any]:
    """Decode and prefill logits, Triton + graph path vs torch path, on 2 layers of the model."""
    small = LlamaConfig(**{**config.__dict__, "num_hidden_layers": 2})
    weights = random_llama_weights(small, "cuda", DTYPE, seed=1)
    model = LlamaModel(small, weights, max_positions=4200)
    contexts = [1, 17, 1000, 4097]
    blocks = [math.ceil(c / BLOCK_SIZE) for c in contexts]
    kv = PagedKVCache(small, sum(blocks) + 1, BLOCK_SIZE, "cuda", DTYPE)
    kv.data.normal_()
    order = (torch.randperm(sum(blocks)) + 1).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    ids = torch.randint(0, small.vocab_size, (len(contexts),)).tolist()
    positions = [c - 1 for c in contexts]
    slots = [
        t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
        for t, p in zip(tables, positions, strict=True)
    ]
    runner = DecodeGraphRunner(model, kv, max(contexts), batch_sizes=(len(contexts),))
    runner.load(ids, positions, slots, tables, contexts)
    runner.capture()
    graph_logits = runner.replay(len(contexts)).clone()
    ops.set_triton_enabled(False)
    try:
        width = max(blocks)
        table = torch.zeros(len(contexts), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device="cuda"),
            num_decode_tokens=len(contexts),
            decode_block_tables=table.cuda(),
            decode_context_lens=torch.tensor(contexts, dtype=torch.int32, device="cuda"),
            decode_max_context_len=max(contexts),
            decode_context_lens_host=contexts,
        )
        hidden = model.forward(
            torch.tensor(ids, device="cuda"), torch.tensor(positions, device="cuda"), meta, kv
        )
        torch_logits = model.compute_logits(hidden)
    finally:
        ops.set_triton_enabled(True)
    decode_error = float((graph_logits - torch_logits).norm() / torch_logits.norm())

    # Prefill of 300 tokens in two chunks, Triton element-wise kernels vs torch.
    prompt = torch.randint(0, small.vocab_size, (300,), device="cuda")
    prefill_logits = []
    for enabled in (True, False):
        ops.set_triton_enabled(enabled)
        try:
            cache = PagedKVCache(small, 40, BLOCK_SIZE, "cuda", DTYPE)
            table_t = torch.arange(1, 40, device="cuda")
            outs = []
            for start, count in ((0, 200), (200, 100)):
                pos = torch.arange(start, start + count, device="cuda")
                meta = AttentionMetadata(
                    slot_mapping=table_t[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE,
                    prefill_spans=[PrefillSpan(0, count, start, table_t)],
                )
                hidden = model.forward(prompt[start : start + count], pos, meta, cache)
                outs.append(model.compute_logits(hidden[-1:]))
            prefill_logits.append(torch.cat(outs))
        finally:
            ops.set_triton_enabled(True)
    prefill_error = float((prefill_logits[0] - prefill_logits[1]).norm() / prefill_logits[1].norm())
    return {
        "decode_rel_error": decode_error,
        "prefill_rel_error": prefill_error,
        "passed": decode_error < 2e-2 and prefill_error < 2e-2,
    }


def sweep_decode_kernel(config: LlamaConfig) -> dict[str, Any]:
    """Time the paged-attention kernel alone for a few launch settings; keep the fastest."""
    kernels = ops.triton_kernels()
    results = []
    shapes = [(64, 4096), (16, 1024)]
    caches = {}
    for batch, context in shapes:
        blocks_per_seq = math.ceil(context / BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq + 1
        shape = (num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
        k = torch.randn(shape, device="cuda", dtype=DTYPE)
        v = torch.randn(shape, device="cuda", dtype=DTYPE)
        tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(batch, -1).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(
            batch, config.num_attention_heads, config.head_dim, device="cuda", dtype=DTYPE
        )
        caches[(batch, context)] = (q, k, v, tables, lens)
    for tile in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3):
                kernels.DECODE_TILE, kernels.DECODE_NUM_WARPS = tile, warps
                kernels.DECODE_NUM_STAGES = stages
                row: dict[str, Any] = {"tile": tile, "num_warps": warps, "num_stages": stages}
                try:
                    total = 0.0
                    for (batch, context), (q, k, v, tables, lens) in caches.items():
                        ms = time_in_graph(
                            lambda q=q, k=k, v=v, t=tables, n=lens, c=context: (
                                kernels.paged_decode_attention(
                                    q, k, v, t, n, config.head_dim**-0.5, c
                                )
                            )
                        )
                        kv_bytes = 2 * k.element_size() * batch * context * config.kv_size
                        row[f"b{batch}_c{context}_ms"] = ms
                        row[f"b{batch}_c{context}_gbps"] = kv_bytes / (ms * 1e-3) / 1e9
                        total += ms
                    row["total_ms"] = total
                except Exception as error:  # a setting that fails to compile is skipped
                    row["error"] = repr(error)[:300]
                results.append(row)
    ok = [r for r in results if "total_ms" in r]
    best = min(ok, key=lambda r: r["total_ms"])
    kernels.DECODE_TILE, kernels.DECODE_NUM_WARPS = best["tile"], best["num_warps"]
    kernels.DECODE_NUM_STAGES = best["num_stages"]
    return {"results": results, "best": best}


def pick_prefill_backend(config: LlamaConfig, tokens: int) -> dict[str, Any]:
    """Time causal SDPA at the prefill shape per backend; the engine uses the fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = config.num_attention_heads, config.head_dim
    q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=DTYPE) for _ in range(3))
    flops = 4 * heads * dim * tokens * (tokens + 1) / 2
    timings: dict[str, Any] = {}
    with sdpa_kernel([SDPBackend.MATH]):
        reference = torch.nn.functional.scaled_dot_product_attention(
            q[:, :4].float(), k[:, :4].float(), v[:, :4].float(), is_causal=True
        )
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):  # fmt: skip
        try:
            with sdpa_kernel([backend]):

                def attend() -> torch.Tensor:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

                out = attend()
                error = float((out[:, :4].float() - reference).norm() / reference.norm())
                ms = statistics.median(time_cuda(attend, warmup=3, iters=10))
            timings[backend.name] = {
                "ms": ms,
                "tflops": flops / (ms * 1e-3) / 1e12,
                "rel_error": error,
            }
            if not error < 1e-2:
                timings[backend.name]["error"] = "output differs from the float32 reference"
        except Exception as error:
            timings[backend.name] = {"error": repr(error)[:200]}
    ok = {name: t for name, t in timings.items() if "error" not in t}
    best = min(ok, key=lambda name: ok[name]["ms"])
    fallbacks = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    by_name = {b.name: b for b in (*fallbacks, SDPBackend.CUDNN_ATTENTION)}
    set_prefill_sdpa_backends([by_name[best], *(b for b in fallbacks if b.name != best)])
    return {"per_backend": timings, "chosen": best}


def decode_runner(
    model: LlamaModel, config: LlamaConfig, batch: int, context: int
) -> DecodeGraphRunner:
    """A graph runner loaded with `batch` sequences of `context` cached tokens (random KV in
    randomly placed blocks) and one new token each."""
    attended = context + 1
    blocks_per_seq = math.ceil(attended / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    kv = PagedKVCache(config, num_blocks, BLOCK_SIZE, "cuda", DTYPE)
    kv.data.normal_()
    runner = DecodeGraphRunner(model, kv, attended, batch_sizes=(batch,))
    tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(batch, blocks_per_seq)
    runner.block_tables[:batch].copy_(tables.int())
    runner.context_lens[:batch].fill_(attended)
    runner.positions[:batch].fill_(context)
    runner.input_ids[:batch].copy_(torch.randint(0, config.vocab_size, (batch,), device="cuda"))
    runner.slot_mapping[:batch].copy_(
        tables[:, context // BLOCK_SIZE] * BLOCK_SIZE + context % BLOCK_SIZE
    )
    return runner


KERNEL_CLASSES = (
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("attention", ("paged_decode", "flash", "fmha", "attention", "cudnn")),
    ("rms_norm", ("rms_norm",)),
    ("rope_and_cache", ("rope_and_cache",)),
    ("silu_and_mul", ("silu_and_mul",)),
)


def kernel_breakdown(run: Callable[[], object], steps: int = 3) -> dict[str, float]:
    """Device ms per step by kernel class, from the torch profiler over eager steps."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if not device_us or event.key.startswith(("ProfilerStep", "cuda")):
            continue
        name = event.key.lower()
        kind = next((k for k, keys in KERNEL_CLASSES if any(x in name for x in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + device_us / 1e3 / steps
    totals["sum"] = sum(totals.values())
    return {k: round(v, 4) for k, v in totals.items()}


def profile_decode(model: LlamaModel, config: LlamaConfig) -> dict[str, Any]:
    out = {}
    for batch, context in ((1, 1024), (16, 1024), (64, 4096), (256, 1024)):
        runner = decode_runner(model, config, batch, context)
        out[f"b{batch}_c{context}"] = kernel_breakdown(lambda r=runner, b=batch: r._run(b))
        del runner
        gc.collect()
        torch.cuda.empty_cache()
    return out


def bench_decode(
    model: LlamaModel, config: LlamaConfig, batch: int, context: int, bandwidth_gbps: float
) -> dict[str, Any]:
    kv_per_token = config.kv_bytes_per_token(2)
    attended = context + 1  # the cached context and the new token
    blocks_per_seq = math.ceil(attended / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    cache_bytes = num_blocks * BLOCK_SIZE * kv_per_token
    row: dict[str, Any] = {"batch": batch, "context": context, "kv_cache_gib": cache_bytes / GiB}
    free, _ = torch.cuda.mem_get_info()
    headroom = 2 * GiB + batch * config.vocab_size * 4 * 2
    if cache_bytes + headroom > free:
        row["fits"] = False
        row["note"] = (
            f"KV cache {cache_bytes / GiB:.1f} GiB + {headroom / GiB:.1f} GiB headroom > "
            f"{free / GiB:.1f} GiB free beside the weights"
        )
        return row
    runner = decode_runner(model, config, batch, context)
    started = time.perf_counter()
    runner.capture()
    row["capture_s"] = time.perf_counter() - started
    logits = runner.replay(batch)
    torch.cuda.synchronize()
    row["logits_finite"] = bool(torch.isfinite(logits).all())
    iters = 30 if batch <= 16 else 15
    times = time_cuda(lambda: runner.replay(batch), warmup=3, iters=iters)
    weight_bytes = config.decode_weight_parameter_count * 2 + batch * config.hidden_size * 2
    kv_read = batch * attended * kv_per_token
    roofline_ms = (weight_bytes + kv_read) / (bandwidth_gbps * 1e9) * 1e3
    median = statistics.median(times)
    row.update(
        fits=True,
        step_ms=median,
        step_ms_min=min(times),
        step_ms_max=max(times),
        weight_gb=weight_bytes / 1e9,
        kv_read_gb=kv_read / 1e9,
        roofline_ms=roofline_ms,
        efficiency=roofline_ms / median,
        achieved_gbps=(weight_bytes + kv_read) / (median * 1e-3) / 1e9,
        tokens_per_s=batch / (median * 1e-3),
    )
    if batch == 16 and context == 1024:
        # The same step without the graph: what launch overhead the graph removes.
        eager = time_cuda(lambda: runner._run(batch), warmup=2, iters=10)
        row["eager_step_ms"] = statistics.median(eager)
    return row


def bench_prefill(
    model: LlamaModel, config: LlamaConfig, tokens: int, measured_tflops: float, peak: float
) -> dict[str, Any]:
    blocks = math.ceil(tokens / BLOCK_SIZE)
    kv = PagedKVCache(config, blocks + 1, BLOCK_SIZE, "cuda", DTYPE)
    table = torch.arange(1, blocks + 1, device="cuda")
    positions = torch.arange(tokens, device="cuda")
    ids = torch.randint(0, config.vocab_size, (tokens,), device="cuda")
    meta = AttentionMetadata(
        slot_mapping=table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE,
        prefill_spans=[PrefillSpan(0, tokens, 0, table)],
    )

    def run() -> torch.Tensor:
        return model.compute_logits(model.forward(ids, positions, meta, kv)[-1:])

    times = time_cuda(run, warmup=2, iters=6)
    median = statistics.median(times)
    breakdown = kernel_breakdown(run, steps=2)
    linear = config.num_hidden_layers * (config.layer_parameter_count - 2 * config.hidden_size)
    attention_pairs = tokens * (tokens + 1) / 2
    flops = (
        2 * tokens * linear
        + 4 * config.num_hidden_layers * config.q_size * attention_pairs
        + 2 * config.vocab_size * config.hidden_size
    )
    tflops = flops / (median * 1e-3) / 1e12
    return {
        "tokens": tokens,
        "ms": median,
        "ms_min": min(times),
        "tflop": flops / 1e12,
        "tflops": tflops,
        "efficiency_vs_datasheet": tflops / peak,
        "efficiency_vs_measured_matmul": tflops / measured_tflops,
        "tokens_per_s": tokens / (median * 1e-3),
        "kernel_ms": breakdown,
    }


def section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        value = fn()
    except Exception:
        results.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
        print(f"[{name}] FAILED:\n{traceback.format_exc()}", flush=True)
        value = None
    finally:
        # Each section's tensors (KV caches, graphs) died with its frame; give the memory back.
        gc.collect()
        torch.cuda.empty_cache()
    if value is None:
        return None
    results[name] = value
    print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)
    return value


def write_calibration(path: Path, results: dict[str, Any], command: str) -> None:
    import yaml

    sheet = results["datasheet"]
    decode_rows = [r for r in results.get("decode", []) if r.get("fits")]
    by_context: dict[int, dict[int, float]] = {}
    for row in decode_rows:
        by_context.setdefault(row["context"], {})[row["batch"]] = round(row["efficiency"], 3)
    by_batch: dict[int, float] = {}
    for row in decode_rows:
        current = by_batch.get(row["batch"], math.inf)
        by_batch[row["batch"]] = round(min(current, row["efficiency"]), 3)
    largest = max(decode_rows, key=lambda r: (r["batch"], r["context"]))
    prefill = results["prefill"]
    data = {
        "accelerator": sheet["accelerator"],
        "measured_hbm_bandwidth_gbps": round(results["bandwidth"]["gbps"], 1),
        "measured_bf16_tflops": round(results["matmul"]["tflops"], 1),
        "decode_efficiency": dict(sorted(by_batch.items())),
        "decode_efficiency_by_context": {k: dict(sorted(v.items())) for k, v in by_context.items()},
        "prefill_efficiency": round(prefill["efficiency_vs_datasheet"], 3),
        "prefill_efficiency_vs_measured_matmul": round(prefill["efficiency_vs_measured_matmul"], 3),
        "datasheet_hbm_bandwidth_gbps": sheet["hbm_gbps"],
        "datasheet_bf16_tflops": sheet["bf16_tflops"],
        "memory_efficiency": round(largest["achieved_gbps"] / sheet["hbm_gbps"], 3),
        "compute_efficiency": round(prefill["tflops"] / sheet["bf16_tflops"], 3),
        "source": f"{command} on {results['device']['name']}, {results['date']}",
    }
    header = (
        "# Measured by bench/engine_bench.py (see bench/results/). decode_efficiency: decode step\n"
        "# roofline / measured time, the roofline being (weights + live KV bytes) over the\n"
        "# measured copy bandwidth; per batch, the lowest over the contexts measured.\n"
        "# prefill_efficiency: 4k-token prefill FLOP/s over the datasheet bf16 peak.\n"
        "# memory_efficiency / compute_efficiency: the same achievements as fractions of the\n"
        "# datasheet figures, which is what the performance model multiplies them with.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def print_table(results: dict[str, Any]) -> None:
    print()
    device = results["device"]
    print(f"device: {device['name']}  torch {device['torch']}  triton {device['triton']}")
    bw, mm = results.get("bandwidth"), results.get("matmul")
    if bw:
        print(f"measured HBM bandwidth (copy, read+write): {bw['gbps']:.0f} GB/s")
    if mm:
        print(f"measured bf16 matmul 8192^3: {mm['tflops']:.0f} TFLOP/s")
    check = results.get("check")
    if check:
        print(
            f"triton vs torch (2 layers, bf16): decode rel err {check['decode_rel_error']:.1e}, "
            f"prefill rel err {check['prefill_rel_error']:.1e} -> "
            f"{'ok' if check['passed'] else 'MISMATCH'}"
        )
    sweep = results.get("kernel_sweep")
    if sweep:
        best = sweep["best"]
        print(
            f"paged attention kernel: tile {best['tile']}, {best['num_warps']} warps, "
            f"{best['num_stages']} stages: 64x4k {best['b64_c4096_gbps']:.0f} GB/s, "
            f"16x1k {best['b16_c1024_gbps']:.0f} GB/s"
        )
    print()
    print("decode (CUDA graph, Llama-3-8B shape, bf16)")
    print(
        f"{'batch':>5} {'ctx':>5} {'step ms':>8} {'roof ms':>8} {'eff':>6} {'GB/s':>6} {'tok/s':>8}"
    )
    for row in results.get("decode", []):
        if not row.get("fits"):
            print(f"{row['batch']:>5} {row['context']:>5}   does not fit: {row.get('note', '')}")
            continue
        print(
            f"{row['batch']:>5} {row['context']:>5} {row['step_ms']:>8.2f} "
            f"{row['roofline_ms']:>8.2f} {row['efficiency']:>6.1%} {row['achieved_gbps']:>6.0f} "
            f"{row['tokens_per_s']:>8.0f}"
            + (f"  (eager {row['eager_step_ms']:.2f} ms)" if "eager_step_ms" in row else "")
        )
    prefill = results.get("prefill")
    if prefill:
        print()
        print(
            f"prefill {prefill['tokens']} tokens: {prefill['ms']:.1f} ms, "
            f"{prefill['tflops']:.0f} TFLOP/s = {prefill['efficiency_vs_datasheet']:.1%} of "
            f"datasheet peak ({results['datasheet']['bf16_tflops']:.0f}), "
            f"{prefill['efficiency_vs_measured_matmul']:.1%} of measured matmul"
        )
    sdpa = results.get("prefill_sdpa")
    if sdpa:
        chosen = sdpa["per_backend"][sdpa["chosen"]]
        print(f"prefill attention backend: {sdpa['chosen']} ({chosen['tflops']:.0f} TFLOP/s)")
    if prefill and "kernel_ms" in prefill:
        print(f"prefill device ms by kernel class: {prefill['kernel_ms']}")
    for key, breakdown in (results.get("decode_kernel_ms") or {}).items():
        print(f"decode {key} device ms by kernel class (eager step): {breakdown}")
    if results.get("errors"):
        print("\nERRORS in sections:", ", ".join(results["errors"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_bench.json"))
    parser.add_argument("--calibration", type=Path, default=None)
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="write --calibration from an earlier run's JSON (no GPU needed), e.g. "
        "../shared/data/h200/engine_bench_h200.json",
    )
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument(
        "--profile", action="store_true", help="also break decode steps down by kernel class"
    )
    args = parser.parse_args()
    if args.from_results is not None:
        if args.calibration is None:
            print("--from-results writes --calibration: give both", file=sys.stderr)
            return 2
        results = json.loads(args.from_results.read_text())
        command = (
            f"{results['command']} (calibration written from its JSON by "
            f"python bench/engine_bench.py --from-results {args.from_results} "
            f"--calibration {args.calibration})"
        )
        write_calibration(args.calibration, results, command)
        print(f"wrote {args.calibration} from {args.from_results}")
        return 0
    if not torch.cuda.is_available():
        print("engine_bench needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    command = "python " + " ".join(sys.argv)
    name = torch.cuda.get_device_name()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "device": {
            "name": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / GiB,
        },
        "datasheet": datasheet_for(name),
        "block_size": BLOCK_SIZE,
    }
    config = LlamaConfig.llama3_8b()
    bandwidth = section(results, "bandwidth", measure_bandwidth_gbps)
    matmul = section(results, "matmul", measure_matmul_tflops)
    section(results, "check", lambda: check_triton_against_torch(config))
    section(results, "kernel_sweep", lambda: sweep_decode_kernel(config))
    section(results, "prefill_sdpa", lambda: pick_prefill_backend(config, args.prefill_tokens))
    contexts = [int(c) for c in args.contexts.split(",")]
    weights = random_llama_weights(config, "cuda", DTYPE, seed=0)
    model = LlamaModel(config, weights, max_positions=max([*contexts, args.prefill_tokens]) + 8)
    results["decode"] = []
    for context in contexts:
        for batch in (int(b) for b in args.batches.split(",")):
            row = section(
                results,
                f"decode_b{batch}_c{context}",
                lambda b=batch, c=context: bench_decode(model, config, b, c, bandwidth["gbps"]),
            )
            if row is not None:
                results.pop(f"decode_b{batch}_c{context}")
                results["decode"].append(row)
    section(
        results,
        "prefill",
        lambda: bench_prefill(
            model,
            config,
            args.prefill_tokens,
            matmul["tflops"],
            results["datasheet"]["bf16_tflops"],
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    if args.profile:
        section(results, "decode_kernel_ms", lambda: profile_decode(model, config))
        args.out.write_text(json.dumps(results, indent=2, default=str))
    if args.calibration is not None:
        section(
            results, "calibration", lambda: write_calibration(args.calibration, results, command)
        )
    print_table(results)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
