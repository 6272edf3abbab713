"""Tensor-parallel engine benchmark: decode step time and prefill at TP 1/2/4/8 on one host,
against a roofline that counts the all-reduces, and beside the planner's TP scaling model.

For each degree in --tp, one process per GPU (NCCL) builds its rank's shard of a Llama-3
shaped model with random bf16 weights (agents/engine/parallel.py: column-parallel QKV and
gate/up, row-parallel o/down with two all-reduces a layer, vocab-parallel LM head) and measures:
- the rank's HBM copy bandwidth and the all-reduce time of [tokens, hidden] bf16 at each size
  a step sends (NVLink, through NCCL);
- decode step time (CUDA graph of the whole step, all-reduces inside; eager if capture fails)
  at each batch x context, against roofline = (rank's weights + its KV heads' bytes) / measured
  bandwidth + 2 x layers x measured all-reduce time, and against
  `policies.perfmodel.ReplicaPerformance(tensor_parallel=TP).decode_step_time_s`;
- prefill of one --prefill-tokens prompt (tokens/s) against the model's `prefill_time_s`;
- what the engine adds per step on the host: rank 0's broadcast of a batch-64 step description
  to the other ranks over the gloo group (tp_worker.StepInputs).
Then a scaling table: measured speedup over TP1 (when TP1 is in --tp) beside the model's.

    python bench/tp_bench.py --tp 1,2,4 --out bench/results/tp_bench_h200.json

--smoke runs the same code on the CPU (gloo, a tiny shape, wall-clock timing) to check the
script itself where no GPU is at hand; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import tessera.agents.engine  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.exit("tp_bench needs the tessera package installed (pip install -e .)")

from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
from tessera.agents.engine.config import LlamaConfig, TensorParallelSizeError
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.parallel import (
    TensorParallelGroup,
    TensorParallelShard,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from tessera.agents.engine.tp_worker import FORWARD, StepInputs
from tessera.agents.engine.weights import random_llama_weights
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import Dtype, ModelArchitecture
from tessera.policies.perfmodel import PrefillChunk, ReplicaPerformance

GiB = 2**30
BLOCK_SIZE = 16

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {**vars(LlamaConfig.llama3_8b())},
    "llama3-70b": {
        **vars(LlamaConfig.llama3_8b()),
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "smoke": {
        **vars(LlamaConfig.llama3_8b()),
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
    },
}

# Datasheet figures of the devices this runs on (the AcceleratorClass the planner would be
# given), matched by a substring of torch's device name. interconnect: NVLink GB/s per
# direction, as examples/accelerator-classes.yaml counts it.
DEVICES: dict[str, dict[str, Any]] = {
    "H200": {
        "model": "H200-SXM-141GB",
        "memory_gib": 141e9 / GiB,
        "memory_bandwidth_gbps": 4800,
        "peak_tflops": {"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 67},
        "tdp_w": 700,
        "interconnect_bandwidth_gbps": 450,
        "network_bandwidth_gbps": 50,
    },
    "H100": {
        "model": "H100-SXM5-80GB",
        "memory_gib": 80,
        "memory_bandwidth_gbps": 3350,
        "peak_tflops": {"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 67},
        "tdp_w": 700,
        "interconnect_bandwidth_gbps": 450,
        "network_bandwidth_gbps": 50,
    },
}


def accelerator_for(device_name: str) -> AcceleratorClassSpec:
    sheet = next((v for k, v in DEVICES.items() if k in device_name), DEVICES["H200"])
    return AcceleratorClassSpec(
        vendor="nvidia", kind="GPU", cost_per_hour=1.0, accelerators_per_node=8, **sheet
    )


def architecture_of(config: LlamaConfig) -> ModelArchitecture:
    return ModelArchitecture(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        dtype=Dtype.BF16,
        max_context_tokens=config.max_position_embeddings,
    )


# ---- timing (CUDA events on a GPU, wall clock in --smoke) ---------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    group: TensorParallelGroup | None = None,
) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` calls. With a group the ranks are
    lined up (a host barrier) before each timed call starts, so that a rank's time does not
    include another's lateness, and the barrier itself is outside the timed span."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group.cpu_group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def slowest_rank(value: float, group: TensorParallelGroup | None) -> float:
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group.cpu_group)
    return float(tensor.item())


# ---- measurements -------------------------------------------------------------------------


def measure_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median = statistics.median(time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10))
    return 2 * nbytes / (median * 1e-3) / 1e9


def measure_allreduce(
    group: TensorParallelGroup | None,
    hidden: int,
    sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, float]:
    """Median ms of one all-reduce of [tokens, hidden] activations, per token count."""
    out: dict[int, float] = {}
    for tokens in sizes:
        if group is None:
            out[tokens] = 0.0
            continue
        buffer = torch.randn(tokens, hidden, device=device, dtype=dtype)
        times = time_ms(lambda b=buffer: group.all_reduce(b), device, 5, 30, group)
        out[tokens] = slowest_rank(statistics.median(times), group)
    return out


def decode_inputs(
    config: LlamaConfig, batch: int, context: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, PagedKVCache]:
    """`batch` sequences of `context` cached tokens (random KV in shuffled blocks), one new
    token each. The same seed on every rank, so all ranks attend over the same tables."""
    attended = context + 1
    per_seq = math.ceil(attended / BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    kv = PagedKVCache(config, num_blocks, BLOCK_SIZE, device, dtype)
    kv.data.normal_()
    generator = torch.Generator().manual_seed(batch * 100003 + context)
    tables = (torch.randperm(num_blocks - 1, generator=generator) + 1).view(batch, per_seq)
    slots = tables[:, context // BLOCK_SIZE] * BLOCK_SIZE + context % BLOCK_SIZE
    lens = [attended] * batch
    meta = AttentionMetadata(
        slot_mapping=slots.to(device),
        num_decode_tokens=batch,
        decode_block_tables=tables.int().to(device),
        decode_context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        decode_max_context_len=attended,
        decode_context_lens_host=lens,
    )
    ids = torch.randint(0, config.vocab_size, (batch,), generator=generator).to(device)
    positions = torch.full((batch,), context, dtype=torch.long, device=device)
    return ids, positions, meta, kv


def kv_fits(config: LlamaConfig, batch: int, context: int, device: torch.device) -> str | None:
    """None if the batch's KV (and headroom for logits) fits on this device, else why not."""
    if device.type != "cuda":
        return None
    blocks = batch * math.ceil((context + 1) / BLOCK_SIZE) + 1
    need = blocks * BLOCK_SIZE * config.kv_bytes_per_token(2) + 2 * GiB
    free, _ = torch.cuda.mem_get_info(device)
    return None if need < free else f"KV {need / GiB:.1f} GiB > {free / GiB:.1f} GiB free"


def bench_decode(
    model: LlamaModel,
    group: TensorParallelGroup | None,
    batch: int,
    context: int,
    device: torch.device,
) -> dict[str, Any]:
    config = model.config
    row: dict[str, Any] = {"batch": batch, "context": context}
    reason = kv_fits(config, batch, context, device)
    reason = slowest_reason(reason, group)
    if reason is not None:
        return {**row, "fits": False, "note": reason}
    ids, positions, meta, kv = decode_inputs(config, batch, context, device, model.dtype)

    def step() -> torch.Tensor:
        return model.compute_logits(model.forward(ids, positions, meta, kv))

    run: Callable[[], object] = step
    row["graph"] = False
    if device.type == "cuda":
        try:
            run = capture(step, device)
            row["graph"] = True
        except Exception as error:  # NCCL inside a graph needs a recent NCCL; eager then
            row["graph_error"] = repr(error)[:300]
    times = time_ms(run, device, warmup=3, iters=20 if batch <= 16 else 10, group=group)
    row.update(fits=True, step_ms=slowest_rank(statistics.median(times), group))
    return row


def capture(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def slowest_reason(reason: str | None, group: TensorParallelGroup | None) -> str | None:
    """A reason any rank has (all ranks must skip a configuration together)."""
    if group is None:
        return reason
    reasons: list[str | None] = [None] * group.size
    dist.all_gather_object(reasons, reason, group=group.cpu_group)
    return next((r for r in reasons if r), None)


def bench_prefill(
    model: LlamaModel, group: TensorParallelGroup | None, tokens: int, device: torch.device
) -> dict[str, Any]:
    config = model.config
    blocks = math.ceil(tokens / BLOCK_SIZE)
    kv = PagedKVCache(config, blocks + 1, BLOCK_SIZE, device, model.dtype)
    table = torch.arange(1, blocks + 1, device=device)
    positions = torch.arange(tokens, device=device)
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(7))
    ids = ids.to(device)
    meta = AttentionMetadata(
        slot_mapping=table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE,
        prefill_spans=[PrefillSpan(0, tokens, 0, table)],
    )

    def run() -> torch.Tensor:
        return model.compute_logits(model.forward(ids, positions, meta, kv)[-1:])

    times = time_ms(run, device, warmup=2, iters=5, group=group)
    ms = slowest_rank(statistics.median(times), group)
    return {"tokens": tokens, "ms": ms, "tokens_per_s": tokens / (ms * 1e-3)}


def bench_step_message(group: TensorParallelGroup | None, batch: int, context: int) -> float:
    """Median ms of rank 0 broadcasting one decode step's description (what DrivingModel
    sends before every forward) over the host group."""
    if group is None:
        return 0.0
    per_seq = math.ceil((context + 1) / BLOCK_SIZE)
    lens = [context + 1] * batch
    meta = AttentionMetadata(
        slot_mapping=torch.arange(batch),
        num_decode_tokens=batch,
        decode_block_tables=torch.arange(batch * per_seq, dtype=torch.int32).view(batch, -1),
        decode_context_lens=torch.tensor(lens, dtype=torch.int32),
        decode_max_context_len=context + 1,
        decode_context_lens_host=lens,
    )
    message = (FORWARD, StepInputs.of(torch.arange(batch), torch.arange(batch), meta))
    cpu = torch.device("cpu")
    times = time_ms(
        lambda: group.broadcast_object(message if group.is_driver else None),
        cpu,
        warmup=3,
        iters=30,
        group=group,
    )
    return slowest_rank(statistics.median(times), group)


# ---- one degree: the rank processes ----------------------------------------------------------


def rank_main(rank: int, args: argparse.Namespace, tp: int, store: str, out: str) -> None:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else f"cuda:{rank}")
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        torch.set_num_threads(1)
    group = None
    if tp > 1:
        group = init_tensor_parallel(TensorParallelShard(rank, tp), f"file://{store}", device)
    config = bench_config(args)
    shard = TensorParallelShard(rank, tp)
    shard_config = config.tensor_parallel_shard(tp)
    weights = random_llama_weights(config, device, dtype, seed=0, shard=shard)
    longest = max(args.contexts) + 1
    model = LlamaModel(shard_config, weights, max(longest, args.prefill_tokens), group)
    result: dict[str, Any] = {"tp": tp, "errors": {}}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        """fn's value, or None with the traceback kept: one failed part spoils no other."""
        try:
            return fn()
        except Exception:
            result["errors"][name] = traceback.format_exc()[-2000:]
            print(f"[tp{tp} rank{rank} {name}] FAILED:\n{traceback.format_exc()}", flush=True)
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result["bandwidth_gbps"] = attempt(
        "bandwidth", lambda: slowest_rank(measure_bandwidth_gbps(device, args.copy_bytes), group)
    )
    sizes = sorted({*args.batches, args.prefill_tokens})
    result["allreduce_ms"] = attempt(
        "allreduce", lambda: measure_allreduce(group, config.hidden_size, sizes, device, dtype)
    )
    result["decode"] = []
    for context in args.contexts:
        for batch in args.batches:
            row = attempt(
                f"decode_b{batch}_c{context}",
                lambda b=batch, c=context: bench_decode(model, group, b, c, device),
            )
            if row is not None:
                result["decode"].append(row)
    result["prefill"] = attempt(
        "prefill", lambda: bench_prefill(model, group, args.prefill_tokens, device)
    )
    result["step_message_ms"] = attempt(
        "step_message", lambda: bench_step_message(group, 64, max(args.contexts))
    )
    result["shard"] = {
        "weight_bytes": sum(
            t.numel() * t.element_size()
            for t in (weights.final_norm, weights.lm_head, *layer_tensors(weights))
        ),
        "lm_head_rows": weights.lm_head.shape[0],
        "config": {k: v for k, v in vars(shard_config).items() if k != "rope_scaling"},
    }
    result["full_config"] = {k: v for k, v in vars(config).items() if k != "rope_scaling"}
    if rank == 0:
        result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        Path(out).write_text(json.dumps(result, default=str))
    destroy_tensor_parallel()


def bench_config(args: argparse.Namespace) -> LlamaConfig:
    config = LlamaConfig(**SHAPES["smoke" if args.smoke else args.model])
    if args.layers:
        config = LlamaConfig(**{**vars(config), "num_hidden_layers": args.layers})
    return config


def layer_tensors(weights: Any) -> list[torch.Tensor]:
    return [t for layer in weights.layers for t in vars(layer).values()]


def run_degree(args: argparse.Namespace, tp: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as folder:
        out = Path(folder) / "result.json"
        mp.start_processes(
            rank_main,
            args=(args, tp, str(Path(folder) / "store"), str(out)),
            nprocs=tp,
            start_method="spawn",
        )
        result: dict[str, Any] = json.loads(out.read_text())
    return result


# ---- roofline, model, tables ------------------------------------------------------------------


def annotate(result: dict[str, Any], accelerator: AcceleratorClassSpec) -> None:
    """Add each row's roofline and the performance model's prediction."""
    tp = result["tp"]
    full = LlamaConfig(**result["full_config"])
    shard = LlamaConfig(**result["shard"]["config"])
    perf = ReplicaPerformance(architecture_of(full), accelerator, tensor_parallel=tp)
    result["calibration"] = perf.calibration.source
    bandwidth = result.get("bandwidth_gbps") or float("nan")
    allreduce = {int(k): v for k, v in (result.get("allreduce_ms") or {}).items()}
    weight_bytes = result["shard"]["weight_bytes"]
    for row in result["decode"]:
        if not row.get("fits"):
            continue
        batch, context = row["batch"], row["context"]
        kv_read = batch * (context + 1) * shard.kv_bytes_per_token(2)
        memory_ms = (weight_bytes + kv_read) / (bandwidth * 1e9) * 1e3
        comm_ms = 2 * full.num_hidden_layers * allreduce.get(batch, float("nan"))
        cost = perf.iteration(decode_context_tokens=[context] * batch)
        row.update(
            roofline_memory_ms=memory_ms,
            roofline_comm_ms=comm_ms,
            roofline_ms=memory_ms + comm_ms,
            efficiency=(memory_ms + comm_ms) / row["step_ms"],
            model_ms=cost.time_s * 1e3,
            model_comm_ms=cost.communication_s * 1e3,
            measured_over_model=row["step_ms"] / (cost.time_s * 1e3),
        )
    prefill = result.get("prefill")
    if prefill:
        model_s = perf.iteration(prefill=[PrefillChunk(prefill["tokens"])]).time_s
        prefill.update(model_ms=model_s * 1e3, measured_over_model=prefill["ms"] / (model_s * 1e3))


def scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speedup over TP1 per decode configuration, measured and predicted."""
    base = next((r for r in results if r["tp"] == 1), None)
    if base is None:
        return []
    key = lambda row: (row["batch"], row["context"])  # noqa: E731
    base_rows = {key(r): r for r in base["decode"] if r.get("fits")}
    rows = []
    for result in results:
        for row in result["decode"]:
            ref = base_rows.get(key(row))
            if result["tp"] == 1 or ref is None or not row.get("fits"):
                continue
            rows.append(
                {
                    "tp": result["tp"],
                    "batch": row["batch"],
                    "context": row["context"],
                    "measured_speedup": ref["step_ms"] / row["step_ms"],
                    "model_speedup": ref["model_ms"] / row["model_ms"],
                }
            )
    return rows


def print_tables(report: dict[str, Any]) -> None:
    print(f"\ndevice: {report['device']}  model: {report['model']}  ({report['date']})")
    for result in report["results"]:
        if "skipped" in result:
            print(f"\nTP{result['tp']}: skipped, {result['skipped']}")
            continue
        print(
            f"\nTP{result['tp']}: copy bandwidth {result.get('bandwidth_gbps', float('nan')):.0f}"
            f" GB/s per rank; all-reduce ms by tokens {result.get('allreduce_ms')}; "
            f"step message {result.get('step_message_ms', float('nan')):.3f} ms; "
            f"calibration {result.get('calibration')}"
        )
        print(
            f"{'batch':>5} {'ctx':>5} {'step ms':>8} {'roof ms':>8} {'(comm)':>7} {'eff':>6} "
            f"{'model ms':>8} {'(comm)':>7} {'meas/model':>10} graph"
        )
        for row in result["decode"]:
            if not row.get("fits"):
                print(f"{row['batch']:>5} {row['context']:>5}   does not fit: {row.get('note')}")
                continue
            print(
                f"{row['batch']:>5} {row['context']:>5} {row['step_ms']:>8.3f} "
                f"{row['roofline_ms']:>8.3f} {row['roofline_comm_ms']:>7.3f} "
                f"{row['efficiency']:>6.1%} {row['model_ms']:>8.3f} {row['model_comm_ms']:>7.3f} "
                f"{row['measured_over_model']:>10.2f} {'yes' if row['graph'] else 'no'}"
            )
        prefill = result.get("prefill")
        if prefill:
            print(
                f"prefill {prefill['tokens']} tokens: {prefill['ms']:.1f} ms "
                f"({prefill['tokens_per_s']:.0f} tok/s); model {prefill['model_ms']:.1f} ms "
                f"(measured/model {prefill['measured_over_model']:.2f})"
            )
        if result.get("errors"):
            print("errors in:", ", ".join(result["errors"]))
    if report["scaling"]:
        print(f"\n{'tp':>3} {'batch':>5} {'ctx':>5} {'speedup':>8} {'model':>6}  (over TP1)")
        for row in report["scaling"]:
            print(
                f"{row['tp']:>3} {row['batch']:>5} {row['context']:>5} "
                f"{row['measured_speedup']:>8.2f} {row['model_speedup']:>6.2f}"
            )


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int_list, default=[1, 2], help="degrees, e.g. 1,2,4")
    parser.add_argument("--model", choices=[k for k in SHAPES if k != "smoke"], default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to N layers")
    parser.add_argument("--batches", type=int_list, default=[1, 16, 64])
    parser.add_argument("--contexts", type=int_list, default=[1024, 4096])
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--copy-bytes", type=int, default=4 * GiB)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tp_bench.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shape")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    for tp in args.tp:
        try:
            bench_config(args).tensor_parallel_shard(tp)
        except TensorParallelSizeError as error:
            parser.error(f"--tp: {error}")
    if args.smoke:
        args.copy_bytes = min(args.copy_bytes, 64 * 2**20)
    elif not torch.cuda.is_available():
        print("tp_bench needs CUDA devices (or --smoke)", file=sys.stderr)
        return 2
    visible = 64 if args.smoke else torch.cuda.device_count()
    name = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    accelerator = accelerator_for(name)
    results = []
    for tp in args.tp:
        if tp > visible:
            results.append({"tp": tp, "skipped": f"needs {tp} devices, {visible} visible"})
            continue
        started = time.perf_counter()
        result = run_degree(args, tp)
        annotate(result, accelerator)
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        print(f"[tp{tp}] done in {result['wall_s']:.0f} s", flush=True)
    done = [r for r in results if "skipped" not in r]
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": name,
        "devices_visible": visible,
        "torch": torch.__version__,
        "nccl": str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None,
        "model": "smoke" if args.smoke else args.model,
        "accelerator_class": accelerator.model_dump(mode="json"),
        "results": results,
        "scaling": scaling(done),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print_tables(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
