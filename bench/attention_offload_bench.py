"""Attention offload to host memory (Lamina) on one GPU host, against decode that fits in HBM.

Llama-3-8B shape, random bf16 weights on the GPU, `--batch` sequences of `--context` cached
tokens (default 256 x 4k: 128 GiB of KV at 32 layers, more than an H200 holds beside the
weights). The KV lives in an attention worker process on the host's CPUs (DRAM; decode
attention by a pool of threads over all cores, agents/engine/host_attention.py); the GPU runs
the dense layers, exchanging each layer's q/k/v and attention output with the worker, two
sub-batches pipelined (agents/engine/attention_offload.py). Measured:

1. host ceilings: DRAM read bandwidth (a multi-threaded torch reduction over 2 GiB) and pinned
   host<->device copy bandwidth (what GPU attention over KV streamed from host memory, the
   other design, would be bound by); then the worker's KV scan rate on all threads
   (bench/host_attention_bench.py's measurement: `--scan-batch` x 4k tokens x 4 layers), the
   host calibration's attention rate;
2. two calibration batches that fit in HBM (`--calibrate-batch` and 3x it, `--calibrate-context`
   tokens, offloaded): the exchange's link bandwidth and fixed cost (a line through the two
   round trips less the worker's attention), the calibration's exchange cost;
3. the offloaded decode at the target shape, pipelined (2 sub-batches) and serial (1), with
   per-layer exchange time (the round trip not spent attending on the worker);
4. the best plan that fits without offload: the largest batch whose 32-layer KV fits in this
   GPU's free HBM, plain engine decode with CUDA graphs;
5. the planner's predictions (policies/host_memory.py) for 3 (pipelined and serial) and 4,
   from the classes built of the numbers in 1 and 2 (the target shape itself is never used to
   calibrate); the host calibration is written as host-dram-h200.yaml beside the JSON, for
   policies/calibration/.

Host memory and time allow only `--layers` of the 32 (default 8: 32 GiB of KV). Every step
is measured at that depth and scaled honestly: t32 = t0 + (tL - t0) * 32 / L, where t0 is the
same step with no layers (embedding, final norm, LM head) measured on its own. KV contents are
zeros (CPU and GPU attention time does not depend on the values).

    python bench/attention_offload_bench.py --out $OUT/attention_offload
    python bench/attention_offload_bench.py --smoke --out /tmp/offload-smoke   # CPU, tiny

Prints a table and writes attention_offload.json (rewritten after every phase) and
host-dram-h200.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
import yaml
from host_attention_bench import best_scan
from tessera.agents.engine.attention import AttentionMetadata
from tessera.agents.engine.attention_offload import AttentionClient, OffloadedLlamaModel, connect
from tessera.agents.engine.attention_worker import (
    WorkerSpec,
    host_threads,
    start_attention_worker,
)
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.cuda_graphs import DecodeGraphRunner
from tessera.agents.engine.host_attention import Kernel
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.weights import random_llama_weights

GiB = 2**30
BLOCK_SIZE = 16
FULL_LAYERS = 32
SLOW_STEP_S = 20.0
"""An offloaded step slower than this (at the measured depth) is timed once, not `--steps`."""
H200 = {"bf16_tflops": 989.0, "hbm_gbps": 4800.0, "model": "H200-SXM-141GB", "cost": 4.5}
"""Datasheet figures of the compute class (the performance model scales them by calibration)."""


def log(message: str) -> None:
    print(message, flush=True)


class Results:
    """The JSON written after every phase, so that a run cut short keeps what it measured."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "attention_offload.json"
        self.data: dict[str, Any] = {"command": " ".join(sys.argv)}

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        return value

    def phase(self, key: str, fn: Callable[[], Any]) -> Any:
        log(f"== {key}")
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as error:
            traceback.print_exc()
            value = {"error": f"{type(error).__name__}: {error}"}
        if isinstance(value, dict):
            value["phase_s"] = round(time.perf_counter() - started, 2)
        return self.put(key, value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


# ---- 1. host ceilings ------------------------------------------------------------------------


def host_ceilings(device: torch.device, smoke: bool) -> dict[str, Any]:
    size = (64 if smoke else 2048) * 2**20
    data = torch.ones(size // 2, dtype=torch.bfloat16)
    times = timed(lambda: data.float().sum() if smoke else data.sum(), torch.device("cpu"), 1, 3)
    read_gbps = size / min(times) / 1e9
    row: dict[str, Any] = {
        "cpu_threads": torch.get_num_threads(),
        "dram_read_gbps": round(read_gbps, 1),
    }
    if device.type == "cuda":
        nbytes = 256 * 2**20
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        h2d = timed(lambda: dev.copy_(host, non_blocking=True), device, 2, 5)
        d2h = timed(lambda: host.copy_(dev, non_blocking=True), device, 2, 5)
        row["pinned_h2d_gbps"] = round(nbytes / statistics.median(h2d) / 1e9, 1)
        row["pinned_d2h_gbps"] = round(nbytes / statistics.median(d2h) / 1e9, 1)
    return row


# ---- the decode shapes -----------------------------------------------------------------------


def decode_inputs(
    config: LlamaConfig, batch: int, context: int, device: torch.device, first_block: int = 1
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`batch` decodes at position `context`, each over consecutive blocks (as a fresh
    allocator hands them out), block tables on the host (the worker reads them there)."""
    attended = context + 1
    width = math.ceil(attended / BLOCK_SIZE)
    tables = first_block + torch.arange(batch * width, dtype=torch.int32).view(batch, width)
    slots = tables[:, context // BLOCK_SIZE].long() * BLOCK_SIZE + context % BLOCK_SIZE
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=batch,
        decode_block_tables=tables,
        decode_context_lens=torch.full((batch,), attended, dtype=torch.int32),
        decode_max_context_len=attended,
        decode_context_lens_host=[attended] * batch,
    )
    ids = torch.randint(0, config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), context, dtype=torch.long, device=device)
    return ids, positions, meta


def blocks_for(batch: int, context: int) -> int:
    return batch * math.ceil((context + 1) / BLOCK_SIZE) + 1


def step_fn(
    model: LlamaModel,
    ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    kv: PagedKVCache,
) -> Callable[[], object]:
    def run() -> object:
        hidden = model.forward(ids, positions, meta, kv)
        return model.compute_logits(hidden)

    return run


def no_layer_step_s(config: LlamaConfig, weights: Any, batch: int, device: torch.device) -> float:
    """t0: the step with no decoder layers (embedding, final norm, LM head)."""
    bare = replace(weights, layers=[])
    model = LlamaModel(replace(config, num_hidden_layers=0), bare, max_positions=8)
    ids = torch.randint(0, config.vocab_size, (batch,), device=device)
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long, device=device))
    run = step_fn(model, ids, positions, meta, None)  # type: ignore[arg-type]
    return statistics.median(timed(run, device, 2, 5))


def scaled(step_s: float, t0_s: float, layers: int, full: int = FULL_LAYERS) -> float:
    return t0_s + (step_s - t0_s) * full / layers


# ---- 2 and 3. offloaded decode ---------------------------------------------------------------


def offloaded_decode(
    config: LlamaConfig,
    weights: Any,
    device: torch.device,
    batch: int,
    context: int,
    steps: int,
    sub_batch_options: tuple[int, ...],
    threads: int,
    kernel: Kernel,
) -> dict[str, Any]:
    dtype = weights.dtype
    num_blocks = blocks_for(batch, context)
    kv_gib = num_blocks * BLOCK_SIZE * config.kv_bytes_per_token(dtype.itemsize) / GiB
    log(f"   worker: {num_blocks} blocks, {kv_gib:.1f} GiB of KV in host memory, {threads} threads")
    spec = WorkerSpec(
        config, num_blocks, BLOCK_SIZE, dtype, cpu_threads=threads, attention_kernel=kernel
    )
    started = time.perf_counter()
    row: dict[str, Any] = {"batch": batch, "context": context, "kv_gib": round(kv_gib, 2)}
    with start_attention_worker(spec, startup_timeout_s=300) as worker:
        row["worker_start_s"] = round(time.perf_counter() - started, 1)
        client = AttentionClient(connect(worker.address), config, dtype, device)
        ids, positions, meta = decode_inputs(config, batch, context, device)
        for sub_batches in sub_batch_options:
            model = OffloadedLlamaModel(config, weights, client, context + 8, sub_batches)
            run = step_fn(model, ids, positions, meta, None)  # type: ignore[arg-type]
            started = time.perf_counter()
            run()
            sync(device)
            # A slow host gets one timed step, so that the run stays within its few minutes.
            steps_here = 1 if time.perf_counter() - started > SLOW_STEP_S else steps
            before = replace(client.times)
            stats_before = client.worker_stats()
            times = timed(run, device, 0, steps_here)
            stats_after = client.worker_stats()
            worker_s, scan_s = (
                float(stats_after[key]) - float(stats_before[key])  # type: ignore[arg-type]
                for key in ("attention_s", "scan_s")
            )
            t = client.times
            exchanges = t.exchanges - before.exchanges
            per_step = {
                "send": (t.send_s - before.send_s) / steps_here,
                "wait": (t.wait_s - before.wait_s) / steps_here,
                "receive": (t.receive_s - before.receive_s) / steps_here,
                "worker_attention": worker_s / steps_here,
                "worker_scan": scan_s / steps_here,
            }
            step_s = statistics.median(times)
            round_trip = per_step["send"] + per_step["wait"] + per_step["receive"]
            row[f"sub_batches_{sub_batches}"] = {
                "step_s": step_s,
                "step_s_all": times,
                "tokens_per_s": batch / step_s,
                "per_step_s": per_step,
                "exchanges_per_step": exchanges / steps_here,
                # The round trip not spent attending: transfer both ways and serialisation. Only
                # one sub-batch separates it: pipelined, a reply waits on the other sub-batch's
                # attention too, and the worker's attention hides the exchange (None).
                "per_layer_exchange_s": max(0.0, round_trip - per_step["worker_attention"])
                / config.num_hidden_layers
                if sub_batches == 1
                else None,
                # What the step spends beyond the worker's attention (exchange and dense work not
                # hidden, per layer): the pipelining's gain is this row's drop.
                "per_layer_exposed_s": max(0.0, step_s - per_step["worker_attention"])
                / config.num_hidden_layers,
                "per_layer_attention_s": per_step["worker_attention"] / config.num_hidden_layers,
            }
            log(
                f"   sub-batches {sub_batches}: step {step_s * 1e3:.1f} ms, worker attention "
                f"{per_step['worker_attention'] * 1e3:.1f} ms, send {per_step['send'] * 1e3:.1f}"
                f" ms, wait {per_step['wait'] * 1e3:.1f} ms"
            )
        row["worker_kernel"] = client.worker_stats().get("kernel")  # the one its steps ran
        client.close()
    kv_bytes = batch * (context + 1) * config.kv_bytes_per_token(dtype.itemsize)
    for sub_batches in sub_batch_options:
        measured = row[f"sub_batches_{sub_batches}"]
        measured["attention_gbps"] = kv_bytes / measured["per_step_s"]["worker_attention"] / 1e9
        measured["scan_gbps"] = kv_bytes / max(1e-9, measured["per_step_s"]["worker_scan"]) / 1e9
    row["attention_gbps"] = row[f"sub_batches_{sub_batch_options[-1]}"]["attention_gbps"]
    return row


# ---- 4. the plan that fits without offload ---------------------------------------------------


def colocated_decode(
    config: LlamaConfig, weights: Any, device: torch.device, batch: int, context: int, steps: int
) -> dict[str, Any]:
    model = LlamaModel(config, weights, max_positions=context + 8)
    ids, positions, meta = decode_inputs(config, batch, context, device)
    kv = PagedKVCache(config, blocks_for(batch, context), BLOCK_SIZE, device, weights.dtype)
    if device.type == "cuda":
        runner = DecodeGraphRunner(model, kv, context + 1, batch_sizes=(batch,))
        runner.block_tables[:batch].copy_(meta.decode_block_tables)
        runner.context_lens[:batch].fill_(context + 1)
        runner.positions[:batch].fill_(context)
        runner.input_ids[:batch].copy_(ids)
        runner.slot_mapping[:batch].copy_(meta.slot_mapping)
        runner.capture()
        run: Callable[[], object] = lambda: runner.replay(batch)  # noqa: E731
    else:
        meta.slot_mapping = meta.slot_mapping.to(device)
        run = step_fn(model, ids, positions, meta, kv)
    times = timed(run, device, 2, steps)
    step_s = statistics.median(times)
    return {"batch": batch, "context": context, "step_s": step_s, "tokens_per_s": batch / step_s}


# ---- 5. the planner's predictions ------------------------------------------------------------


def predictions(
    results: dict[str, Any],
    full: LlamaConfig,
    batch: int,
    context: int,
    fit_batch: int,
    device: torch.device,
    out: Path,
) -> dict[str, Any]:
    from tessera.api.accelerator_class import AcceleratorClassSpec, PeakTflops
    from tessera.api.model_deployment import ModelArchitecture
    from tessera.policies.host_memory import (
        host_memory_class,
        predict_decode,
        predict_offloaded_decode,
        scan_calibration,
    )

    ceilings, scan = results["host"], results["scan"]
    total_gib = torch.cuda.mem_get_info(device)[1] / GiB if device.type == "cuda" else 141.0
    compute = AcceleratorClassSpec(
        vendor="nvidia",
        kind="GPU",
        model=H200["model"],
        memory_gib=total_gib,
        memory_bandwidth_gbps=H200["hbm_gbps"],
        peak_tflops=PeakTflops(bf16=H200["bf16_tflops"]),
        tdp_w=700,
        cost_per_hour=H200["cost"],
    )
    dram = float(ceilings["dram_read_gbps"])
    # The exchange's link and fixed cost from the two calibration batches (one layer's bytes
    # against its exchange time: bytes / link + latency, the performance model's form).
    head_bytes = full.head_dim * 2
    row_bytes = (
        2 * full.num_attention_heads * head_bytes + 2 * full.num_key_value_heads * head_bytes
    )
    points = [
        (results[key]["batch"] * row_bytes, results[key]["sub_batches_1"]["per_layer_exchange_s"])
        for key in ("calibration_small", "calibration")
    ]
    (bytes1, e1), (bytes2, e2) = points
    if e2 > e1:
        link_gbps = (bytes2 - bytes1) / (e2 - e1) / 1e9
    else:  # noise: the byte-proportional part is too small to see; PCIe bounds it
        link_gbps = float(ceilings.get("pinned_d2h_gbps", 10.0))
    exchange_s = max(0.0, e1 - bytes1 / (link_gbps * 1e9))
    memory = host_memory_class(
        name="h200-node",
        memory_gib=1e6,  # capacity is not what is predicted here
        dram_bandwidth_gbps=dram,
        link_gbps=link_gbps,
        cpu_bf16_tflops=100.0,
    )
    host_cal = scan_calibration(
        scan_gbps=scan["scan_gbps"],
        dram_read_gbps=dram,
        exchange_latency_s=exchange_s,
        source=(
            f"python {' '.join(sys.argv)} on {results['setup']['device']} host, "
            f"{ceilings['cpu_threads']} threads, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            f": worker scan {scan['scan_gbps']:.1f} GB/s ({scan['batch']} x {scan['context']}"
            f" tokens, {scan['layers']} layers), DRAM read {dram:.1f} GB/s"
        ),
    )
    arch = ModelArchitecture(
        num_layers=full.num_hidden_layers,
        hidden_size=full.hidden_size,
        num_attention_heads=full.num_attention_heads,
        num_key_value_heads=full.num_key_value_heads,
        head_dim=full.head_dim,
        intermediate_size=full.intermediate_size,
        vocab_size=full.vocab_size,
        max_context_tokens=max(8192, context + 1),
    )
    offload = {
        sub_batches: predict_offloaded_decode(
            arch, compute, memory, batch, context, memory_calibration=host_cal,
            micro_batches=sub_batches,
        )
        for sub_batches in (2, 1)
    }  # fmt: skip
    plain = predict_decode(arch, compute, fit_batch, context)
    calibration_file = {
        "accelerator": memory.model,
        "measured_scan_gbps": round(scan["scan_gbps"], 2),
        "measured_dram_read_gbps": dram,
        "measured_exchange_link_gbps": round(link_gbps, 3),
        "memory_efficiency": round(host_cal.memory_efficiency, 4),
        "allreduce_latency_s": round(exchange_s, 6),
        "memory_utilization": host_cal.memory_utilization,
        "activation_reserve_bytes": host_cal.activation_reserve_bytes,
        "source": host_cal.source,
    }
    (out / "host-dram-h200.yaml").write_text(yaml.safe_dump(calibration_file, sort_keys=False))
    return {
        "host_class": memory.model_dump(mode="json", by_alias=True),
        "host_calibration": vars(host_cal),
        "exchange_fit": {"link_gbps": link_gbps, "latency_s": exchange_s, "points": points},
        "offloaded": vars(offload[2]) | {"tokens_per_s": offload[2].tokens_per_s},
        "offloaded_serial": vars(offload[1]) | {"tokens_per_s": offload[1].tokens_per_s},
        "colocated": vars(plain) | {"tokens_per_s": plain.tokens_per_s},
    }


# ---- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: proves the script")
    parser.add_argument("--layers", type=int, default=8, help="layers measured (scaled to 32)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--calibrate-batch", type=int, default=16, help="and 3x it")
    parser.add_argument("--calibrate-context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=host_threads())
    parser.add_argument("--scan-batch", type=int, default=64, help="sequences of the scan phase")
    args = parser.parse_args()
    for flag, value in (("--threads", args.threads), ("--scan-batch", args.scan_batch)):
        if value < 1:
            log(f"{flag} must be >= 1, got {value}")
            return 2
    results = Results(args.out)
    if args.smoke:
        device = torch.device("cpu")
        full = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        )  # fmt: skip
        layers, batch, context = 2, 8, 96
        calibrate = (4, 32)
        dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --smoke on a CPU")
            return 2
        device = torch.device("cuda")
        full = LlamaConfig.llama3_8b()
        layers, batch, context = args.layers, args.batch, args.context
        calibrate = (args.calibrate_batch, args.calibrate_context)
        dtype = torch.bfloat16
    torch.set_num_threads(args.threads)
    config = replace(full, num_hidden_layers=layers, max_position_embeddings=context + 8)
    results.put(
        "setup",
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "layers_measured": layers,
            "layers_reported": full.num_hidden_layers,
            "batch": batch,
            "context": context,
            "kv_gib_full_model": batch
            * (context + 1)
            * full.kv_bytes_per_token(dtype.itemsize)
            / GiB,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
        },
    )
    results.phase("host", lambda: host_ceilings(device, args.smoke))
    scan_shape = (8, 256, 2) if args.smoke else (args.scan_batch, args.calibrate_context, 4)
    scan = results.phase("scan", lambda: best_scan(args.threads, *scan_shape))
    kernel = scan.get("kernel", "auto")
    log(f"   worker scan: {scan.get('by_kernel_gbps')} GB/s: the worker runs {kernel}")
    weights = random_llama_weights(config, device, dtype, seed=0)
    t0 = {b: no_layer_step_s(config, weights, b, device) for b in {batch}}
    for name, calibrate_batch in (
        ("calibration_small", calibrate[0]),
        ("calibration", 3 * calibrate[0]),
    ):
        results.phase(
            name,
            lambda b=calibrate_batch: offloaded_decode(
                config, weights, device, b, calibrate[1], args.steps, (1,), args.threads, kernel
            ),
        )
    offload = results.phase(
        "offloaded",
        lambda: offloaded_decode(
            config, weights, device, batch, context, args.steps, (2, 1), args.threads, kernel
        ),
    )
    # The best plan without offload: the largest batch whose full-depth KV fits in free HBM.
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the offloaded phase's cached blocks are free memory too
        free = torch.cuda.mem_get_info(device)[0]
        full_weight_bytes = (full.num_hidden_layers - layers) * sum(
            t.numel() * t.element_size() for t in vars(weights.layers[0]).values()
        )
        headroom = 4 * GiB
        per_seq = (context + 1) * full.kv_bytes_per_token(dtype.itemsize)
        fit_batch = max(1, int((free - full_weight_bytes - headroom) // per_seq))
    else:
        fit_batch = batch // 2
    fit_batch = min(fit_batch, batch)
    t0[fit_batch] = no_layer_step_s(config, weights, fit_batch, device)
    colocated = results.phase(
        "colocated",
        lambda: colocated_decode(config, weights, device, fit_batch, context, max(5, args.steps)),
    )
    results.put("no_layer_step_s", {str(k): v for k, v in t0.items()})
    predicted = results.phase(
        "predicted",
        lambda: predictions(results.data, full, batch, context, fit_batch, device, args.out),
    )
    summary = summarize(results.data, t0, layers, full.num_hidden_layers, batch, fit_batch)
    results.put("summary", summary)
    print_table(summary, results.data)
    return (
        0 if "error" not in offload and "error" not in colocated and "error" not in predicted else 1
    )


def summarize(
    data: dict[str, Any], t0: dict[int, float], layers: int, full: int, batch: int, fit_batch: int
) -> dict[str, Any]:
    off, col, pred = data["offloaded"], data["colocated"], data["predicted"]
    rows: dict[str, Any] = {}
    for key in ("sub_batches_2", "sub_batches_1"):
        if key in off:
            step = scaled(off[key]["step_s"], t0[batch], layers, full)
            rows[f"offloaded_{key}"] = {
                "batch": batch,
                "step_s_32_layers": step,
                "tokens_per_s": batch / step,
                "per_layer_exchange_ms": (off[key]["per_layer_exchange_s"] or float("nan")) * 1e3,
                "per_layer_exposed_ms": off[key]["per_layer_exposed_s"] * 1e3,
                "per_layer_attention_ms": off[key]["per_layer_attention_s"] * 1e3,
                "worker_attention_gbps": off[key].get("attention_gbps"),
                "worker_scan_gbps": off[key].get("scan_gbps"),
            }
    if "step_s" in col:
        step = scaled(col["step_s"], t0[fit_batch], layers, full)
        rows["colocated_fit"] = {
            "batch": fit_batch,
            "step_s_32_layers": step,
            "tokens_per_s": fit_batch / step,
        }
    for key, row_name in (
        ("offloaded", "offloaded_sub_batches_2"),
        ("offloaded_serial", "offloaded_sub_batches_1"),
    ):
        if key in pred and row_name in rows:
            measured = rows[row_name]["tokens_per_s"]
            predicted = pred[key]["tokens_per_s"]
            rows[row_name]["predicted_tokens_per_s"] = predicted
            rows[row_name]["prediction_error"] = predicted / measured - 1
    if "colocated" in pred and "colocated_fit" in rows:
        measured = rows["colocated_fit"]["tokens_per_s"]
        predicted = pred["colocated"]["tokens_per_s"]
        rows["colocated_fit"]["predicted_tokens_per_s"] = predicted
        rows["colocated_fit"]["prediction_error"] = predicted / measured - 1
    host = data.get("host", {})
    if "pinned_h2d_gbps" in host and "kv_gib_full_model" in data["setup"]:
        # The other design, not run: GPU attention over KV streamed from pinned host memory.
        kv_bytes = data["setup"]["kv_gib_full_model"] * GiB
        rows["pcie_streaming_bound"] = {
            "step_s_at_least": kv_bytes / (host["pinned_h2d_gbps"] * 1e9),
            "tokens_per_s_at_most": batch / (kv_bytes / (host["pinned_h2d_gbps"] * 1e9)),
        }
    return rows


def print_table(summary: dict[str, Any], data: dict[str, Any]) -> None:
    setup = data["setup"]
    log("")
    log(
        f"attention offload, {setup['device']}: measured at {setup['layers_measured']} layers, "
        f"reported for {setup['layers_reported']} (t0 + (t - t0) * {setup['layers_reported']}"
        f"/{setup['layers_measured']}); KV of batch {setup['batch']} x {setup['context']} = "
        f"{setup['kv_gib_full_model']:.0f} GiB"
    )
    log(f"host: {data.get('host')}")
    columns = (
        "layout", "batch", "step s", "tok/s", "pred tok/s", "err", "xchg ms/L", "exposed ms/L",
        "attn ms/L",
    )  # fmt: skip
    widths = (28, 6, 9, 9, 11, 7, 10, 13, 10)
    log(" ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for name, row in summary.items():
        if name == "pcie_streaming_bound":
            continue
        pred, err = row.get("predicted_tokens_per_s"), row.get("prediction_error")
        cells = (
            name,
            row["batch"],
            f"{row['step_s_32_layers']:.4f}",
            f"{row['tokens_per_s']:.1f}",
            "" if pred is None else f"{pred:.1f}",
            "" if err is None else f"{err:+.1%}",
            f"{row.get('per_layer_exchange_ms', float('nan')):.3f}",
            f"{row.get('per_layer_exposed_ms', float('nan')):.3f}",
            f"{row.get('per_layer_attention_ms', float('nan')):.3f}",
        )
        log(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    scan, dram = data.get("scan", {}), data.get("host", {}).get("dram_read_gbps")
    offloaded = summary.get("offloaded_sub_batches_2", {})
    if "scan_gbps" in scan and dram:
        log(
            f"worker KV scan: {scan['scan_gbps']:.1f} GB/s in the scan phase "
            f"({scan['scan_gbps'] / dram:.0%} of DRAM read {dram:.1f} GB/s), "
            f"{offloaded.get('worker_attention_gbps') or float('nan'):.1f} GB/s in the "
            f"offloaded run ({offloaded.get('worker_scan_gbps') or float('nan'):.1f} GB/s "
            "inside the scanners)"
        )
    bound = summary.get("pcie_streaming_bound")
    if bound:
        log(
            f"GPU attention over KV streamed from pinned host memory (not run): step >= "
            f"{bound['step_s_at_least']:.3f} s, <= {bound['tokens_per_s_at_most']:.1f} tok/s"
        )


if __name__ == "__main__":
    raise SystemExit(main())
