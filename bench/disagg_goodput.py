"""Disaggregated goodput on one GPU, measured through `tessera router`, beside the simulator's.

Issue 14's last acceptance item: two engine processes sharing one GPU, each its own memory
share, KV over CUDA IPC, disaggregated goodput measured and predicted within 15%.

The deployment (bench `run`, GPU): as separate processes on one GPU, `tessera serve --role
prefill` and `tessera serve --role decode --prefill-service ...`, each limited to
--memory-fraction (0.45) of the GPU's memory by `--gpu-memory-fraction` and given the KV blocks
that fit in it, and `tessera router` in front (bench/random_weights_serve.py: the real commands,
Llama-3-8B-shaped random bf16 weights made on the GPU). The servers pick CUDA IPC between
themselves (same host, same GPU); the run records the evidence (the prefill instance's KV
endpoint, the decode instance's pulls and their time, no fallback in the logs).

The load: Poisson arrivals at five rates around the simulator's goodput (0.4-1.3x: the
bracket of bench/serving_validation.py and a lower rate, RATE_FRACTIONS), 25 s each, prompt
and output lengths drawn from the Azure 2023 conversation trace (rows with prompt + output
within the model's 8192 tokens), each rate's requests the same draws (common random numbers: a
higher rate is the same requests sooner). Requests stream through the router from client
processes (bench/poisson_client.py) that record each request's scheduled arrival, first token,
finish and tokens; TTFT is measured from the scheduled arrival, TPOT = (finish - first token) /
(tokens - 1), a request cut at the point's deadline (arrivals + a 30 s drain) misses. SLOs:
examples/llama3-8b-chat.yaml (p90 TTFT 500 ms, TPOT 50 ms, 90% of requests). Goodput: the rate
where attainment falls through the target, interpolated between measured rates
(serving_validation.crossing).

The prediction (`report`, CPU): exactly those requests through the simulator with one prefill and
one decode replica of the `h200` class sharing one device (SimConfig.shared_devices: processor
sharing of the GPU, each member's KV capacity the blocks its process got), the engines'
scheduler settings, KV transfer time from the measured CUDA IPC fit
(bench/results/kv_transfer_h200.json).

    python bench/disagg_goodput.py prepare                 # CPU: rates from the simulator
    python bench/disagg_goodput.py run --out $OUT/disagg   # GPU, 4-5 minutes
    python bench/disagg_goodput.py report DIR/disagg_goodput.json   # CPU: the comparison
    python bench/disagg_goodput.py run --smoke --out /tmp/disagg     # CPU, tiny model, all three

`prepare` writes bench/results/disagg_goodput_plan.json (model shape, SLOs, schedulers, every
request of every rate), so the GPU machine runs only the servers and the client.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import numpy as np
import serving_probes
from model_shapes import hf_model_of, tiny_model
from poisson_client import Record, latency_arrays, run_point
from serving_validation import (
    DEFAULT_CLASSES,
    Mode,
    Slo,
    attainment,
    crossing,
    highest_rate,
    latencies,
    percentile_ms,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "bench/results"
DEFAULT_PLAN = RESULTS / "disagg_goodput_plan.json"
DEPLOYMENT = ROOT / "examples/llama3-8b-chat.yaml"
CLASS = "h200"
TRACE = ROOT.parent / "shared/data/traces/azure_llm_2023_conv.csv"
"""The hour of Azure conversation requests beside the checkout (../shared/data), for `prepare`."""
BUNDLED_TRACE = ROOT / "sim/data/azure_llm_2023_conv_10min.csv"
"""Its first ten minutes, shipped in the repo: the smoke run, the tests, and `prepare` where
the hour is absent (a fresh clone)."""
KV_TRANSFER = RESULTS / "kv_transfer_h200.json"
TRANSPORT = "cuda_ipc"
LAUNCHER = HERE / "random_weights_serve.py"

MEMORY_FRACTION = 0.45
"""Each engine process's share of the GPU (as bench/kv_transfer_bench.py runs them)."""
BLOCK_SIZE = 16
ACTIVATION_RESERVE_BYTES = 8 * 2**30
"""Left in each share beside weights and KV: activations of a 2048-token step, logits, the
decode CUDA graphs' pools, allocator slack. Generous: an engine that runs out of its share
fails the run, one with fewer KV blocks only sees preemptions sooner (the simulator is told)."""
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 2048
"""`tessera serve`'s defaults, given to both servers and to the simulator's two pools."""
TIME_BUDGET_S = 420.0
"""Past this a rate that would not end in time is skipped (the GPU command's limit is 600 s)."""
SHARDS = 4
"""Client processes on the GPU machine (16 cores; the servers use 3 busy threads)."""
MEASURE = Mode.CHUNKED
"""serving_validation's judging of a client's requests on both TTFT and TPOT (what a
disaggregated deployment's clients see, as a colocated one's)."""


@dataclass(frozen=True)
class Layout:
    """How big a run is."""

    duration_s: float
    drain_s: float
    length_divisor: int
    """Trace lengths are divided by this (the smoke run's tiny model has 512 positions)."""
    max_model_len: int


GPU_LAYOUT = Layout(duration_s=25.0, drain_s=30.0, length_divisor=1, max_model_len=8192)
"""The drain is a cap (a point ends when its last stream does): long enough that a request
arriving last with a long answer (the trace's outputs reach 1000 tokens) is not cut at a rate
the deployment keeps up with, which would count a miss the simulator does not see."""
RATE_FRACTIONS = (0.4, 0.7, 0.9, 1.1, 1.3)
"""Rates as fractions of the simulator's goodput: serving_validation's bracket and a lower
rate, so that the engine's crossing is measured even if it falls well short of the
simulator's (serving_validation's chunked and decode-only engines did)."""
SMOKE_LAYOUT = Layout(duration_s=3.0, drain_s=25.0, length_divisor=32, max_model_len=512)
SMOKE_RATES = (1.0, 2.0)


# ---- pure helpers ------------------------------------------------------------------------


def llama_config_of(model: dict[str, int]) -> Any:
    """The engine's `LlamaConfig` of a plan's model dictionary (its shape arithmetic)."""
    from tessera.agents.engine.config import LlamaConfig  # deferred: it imports torch

    return LlamaConfig.from_dict(model)


def llama_weight_bytes(model: dict[str, int], dtype_bytes: int = 2) -> int:
    """Bytes of a Llama model's weights (embedding and LM head untied): what a decode step
    reads plus the embedding table."""
    config = llama_config_of(model)
    embedding = config.vocab_size * config.hidden_size
    return (config.decode_weight_parameter_count + embedding) * dtype_bytes


def kv_bytes_per_token(model: dict[str, int], dtype_bytes: int = 2) -> int:
    return int(llama_config_of(model).kv_bytes_per_token(dtype_bytes))


def kv_blocks_for_share(total_bytes: int, fraction: float, model: dict[str, int]) -> int:
    """KV blocks one engine process gets in its `fraction` of a GPU of `total_bytes`: the share
    less the weights and the activation reserve."""
    free = fraction * total_bytes - llama_weight_bytes(model) - ACTIVATION_RESERVE_BYTES
    blocks = int(free // (kv_bytes_per_token(model) * BLOCK_SIZE))
    if blocks < 1:
        raise ValueError(
            f"memory fraction {fraction}: {fraction * total_bytes / 2**30:.1f} GiB holds no KV "
            f"beside {llama_weight_bytes(model) / 2**30:.1f} GiB of weights"
        )
    return blocks


def draw_requests(
    prompts: np.ndarray,
    outputs: np.ndarray,
    rate_per_s: float,
    duration_s: float,
    seed: int,
) -> tuple[list[float], list[int], list[int]]:
    """Poisson arrivals at `rate_per_s` over `duration_s`, each request's lengths a row of the
    trace drawn with replacement. Every rate uses the same draws (unit gaps and rows), so a
    higher rate serves the same requests sooner: attainment against rate is not noise."""
    gaps = np.random.default_rng([seed, 1]).exponential(1.0, 1 << 16)
    times = np.cumsum(gaps) / rate_per_s
    times = times - times[0]
    count = int(np.searchsorted(times, duration_s))
    if count >= len(times):
        raise ValueError(
            f"rate {rate_per_s}/s over {duration_s} s: more than {len(times)} requests"
        )
    rows = np.random.default_rng([seed, 2]).integers(0, len(prompts), len(gaps))[:count]
    return times[:count].tolist(), prompts[rows].tolist(), outputs[rows].tolist()


def engine_latencies(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and TPOT of each planned request (unfinished: infinite)."""
    return latencies(MEASURE, *latency_arrays(records))


def point_row(
    slo: Slo, rate: float, engine: tuple[np.ndarray, np.ndarray], sim: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Attainment and latency percentiles of one rate, engine beside simulator."""
    row: dict[str, Any] = {
        "rate_per_s": rate,
        "requests": len(engine[0]),
        "engine_attainment": attainment(MEASURE, slo, *engine),
        "sim_attainment": attainment(MEASURE, slo, *sim),
    }
    with np.errstate(invalid="ignore"):  # percentiles among missed requests (inf) are None
        for name, index in (("ttft", 0), ("tpot", 1)):
            for q in (50, 90):
                row[f"engine_p{q}_{name}_ms"] = percentile_ms(engine[index], q)
                row[f"sim_p{q}_{name}_ms"] = percentile_ms(sim[index], q)
    return row


def goodputs(rows: list[dict[str, Any]], target: float) -> dict[str, float | None]:
    """Engine and simulator goodput (req/s) from the rows, and the simulator's over the engine's."""
    engine = crossing([(r["rate_per_s"], r["engine_attainment"]) for r in rows], target)
    sim = crossing([(r["rate_per_s"], r["sim_attainment"]) for r in rows], target)
    ratio = sim / engine if engine and sim is not None else None
    return {"engine": engine, "sim": sim, "sim_over_engine": ratio}


# ---- the simulator (CPU) -----------------------------------------------------------------


def deployment_inputs() -> tuple[Any, Any]:
    from serving_validation import load_inputs

    return load_inputs(DEPLOYMENT, DEFAULT_CLASSES, CLASS)


def trace_lengths(layout: Layout, trace: Path = TRACE) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of the trace rows that fit the model's context (scaled)."""
    from tessera.sim.workload import load_trace

    workload = load_trace(trace, "azure-conv")
    prompts = np.maximum(workload.prompt_tokens // layout.length_divisor, 1)
    outputs = np.maximum(workload.output_tokens // layout.length_divisor, 2)
    fits = prompts + outputs <= layout.max_model_len
    return prompts[fits], outputs[fits]


def simulate_shared(
    spec: Any,
    accelerator: Any,
    workload: Any,
    kv_tokens: dict[str, int],
    scheduler: dict[str, Any],
    transfer_file: Path = KV_TRANSFER,
) -> Any:
    """One prefill and one decode replica of CLASS time-sharing one device (the API of
    /work/briefs/shared-device-api.md: sim/shared_device.py), KV over the measured CUDA IPC."""
    from tessera.api.model_deployment import Plan, PoolPlan, PoolRole, ServingMode
    from tessera.api.scheduler import SchedulerConfig
    from tessera.sim.cluster import Cluster
    from tessera.sim.shared_device import SharedDevice
    from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
    from tessera.sim.transfer import MeasuredTransport

    config = SchedulerConfig(**scheduler)

    def pool(role: PoolRole) -> PoolPlan:
        return PoolPlan(
            name=f"{role.value}-{CLASS}",
            role=role,
            accelerator_class=CLASS,
            tensor_parallel=1,
            replicas=1,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
            max_running_requests=config.max_num_seqs,
        )

    plan = Plan(
        mode=ServingMode.DISAGGREGATED,
        pools=[pool(PoolRole.PREFILL), pool(PoolRole.DECODE)],
        cost_per_hour=0.0,
        power_w=0.0,
        rationale="bench",
    )
    cluster = Cluster(
        "disagg",
        {CLASS: accelerator},
        {CLASS: 1},
        kv_transport=MeasuredTransport.from_bench(transfer_file, TRANSPORT),
    )
    shared = SharedDevice(
        deployment="disagg",
        pools=(f"prefill-{CLASS}", f"decode-{CLASS}"),
        kv_capacity_tokens={f"{role}-{CLASS}": tokens for role, tokens in kv_tokens.items()},
    )
    sim_config = SimConfig(seed=0, block_size_tokens=BLOCK_SIZE, shared_devices=(shared,))
    setup = DeploymentSetup(
        "disagg", spec, plan, schedulers={PoolRole.PREFILL: config, PoolRole.DECODE: config}
    )
    return Simulation(cluster, [setup], [workload], sim_config).run()


def sim_latencies_of(result: Any) -> tuple[np.ndarray, np.ndarray]:
    from serving_validation import sim_latencies

    return sim_latencies(MEASURE, result)


def workload_of(
    arrival: list[float], prompts: list[int], outputs: list[int], duration: float
) -> Any:
    from tessera.sim.workload import Workload

    return Workload(
        np.array(arrival, dtype=float),
        np.array(prompts, dtype=np.int64),
        np.array(outputs, dtype=np.int64),
        duration,
        "disagg",
    )


def sim_goodput(
    spec: Any,
    accelerator: Any,
    lengths: tuple[np.ndarray, np.ndarray],
    layout: Layout,
    kv_tokens: dict[str, int],
    scheduler: dict[str, Any],
    seed: int,
) -> float:
    """Highest rate whose simulated attainment meets the target (doubling, then bisection)."""
    slo = Slo(spec.slo.ttft_ms / 1e3, spec.slo.tpot_ms / 1e3, spec.slo.attainment_target)

    def meets(rate: float) -> bool:
        arrival, prompts, outputs = draw_requests(*lengths, rate, layout.duration_s, seed)
        workload = workload_of(arrival, prompts, outputs, layout.duration_s)
        result = simulate_shared(spec, accelerator, workload, kv_tokens, scheduler)
        return attainment(MEASURE, slo, *sim_latencies_of(result)) >= slo.target

    return highest_rate(meets, ceiling=512, bisections=8)


SMOKE_MODEL = tiny_model(512, SMOKE_LAYOUT.max_model_len)


def make_plan(smoke: bool, seed: int) -> dict[str, Any]:
    """The model, SLOs, schedulers and every request of every rate (`prepare`'s output)."""
    spec, accelerator = deployment_inputs()
    layout = SMOKE_LAYOUT if smoke else GPU_LAYOUT
    scheduler = {
        "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "enable_chunked_prefill": True,
    }
    trace = TRACE if not smoke and TRACE.exists() else BUNDLED_TRACE
    lengths = trace_lengths(layout, trace)
    model = SMOKE_MODEL if smoke else hf_model_of(spec.model.architecture)
    if smoke:
        goodput, rates = None, list(SMOKE_RATES)
        estimated_blocks = 512
    else:
        estimated_blocks = kv_blocks_for_share(
            int(accelerator.memory_gib * 2**30), MEMORY_FRACTION, model
        )
        kv = {"prefill": estimated_blocks * BLOCK_SIZE, "decode": estimated_blocks * BLOCK_SIZE}
        goodput = sim_goodput(spec, accelerator, lengths, layout, kv, scheduler, seed)
        rates = [round(goodput * f, 2) for f in RATE_FRACTIONS]
    points = []
    for rate in rates:
        arrival, prompts, outputs = draw_requests(*lengths, rate, layout.duration_s, seed)
        points.append(
            {
                "rate_per_s": rate,
                "arrival_s": arrival,
                "prompt_tokens": prompts,
                "output_tokens": outputs,
            }
        )
    return {
        "bench": "disagg_goodput_plan",
        "smoke": smoke,
        "deployment": str(DEPLOYMENT.relative_to(ROOT)),
        "accelerator_class": CLASS,
        "trace": trace.name,
        "model": model,
        "slo": {
            "ttft_s": spec.slo.ttft_ms / 1e3,
            "tpot_s": spec.slo.tpot_ms / 1e3,
            "target": spec.slo.attainment_target,
        },
        "scheduler": scheduler,
        "layout": asdict(layout),
        "memory_fraction": MEMORY_FRACTION,
        "estimated_kv_blocks": estimated_blocks,
        "sim_goodput_estimate": goodput,
        "seed": seed,
        "points": points,
    }


def run_prepare(args: argparse.Namespace) -> None:
    plan = make_plan(smoke=False, seed=args.seed)
    rates = [p["rate_per_s"] for p in plan["points"]]
    counts = [len(p["arrival_s"]) for p in plan["points"]]
    print(
        f"simulated goodput {plan['sim_goodput_estimate']:.2f} req/s (KV "
        f"{plan['estimated_kv_blocks']} blocks per process, estimated) -> rates {rates}, "
        f"{counts} requests"
    )
    path = Path(args.plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan) + "\n")
    print(f"wrote {path}")


# ---- the deployment (GPU) ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path


def launch(name: str, argv: list[str], port: int, logs: Path) -> Process:
    log = logs / f"{name}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            [sys.executable, str(LAUNCHER), *argv], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    return Process(name, popen, f"http://127.0.0.1:{port}", log)


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return json.loads(answer.read())


def wait_until(
    check: Callable[[], bool], deadline_s: float, what: str, processes: Sequence[Process]
) -> None:
    """Poll `check` every 0.2 s until it holds; fail naming `what` (with the logs' tails) when
    a process exits or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                tail = process.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)  # polling a server's state, with the deadline above
    raise TimeoutError(f"{what}: not within {deadline_s} s")


def ready(process: Process) -> bool:
    return get_json(f"{process.url}/ready", 2.0).get("status") == "ready"


def idle(process: Process) -> bool:
    stats = get_json(f"{process.url}/tessera/v1/instance-stats")
    entries = stats if isinstance(stats, list) else stats.get("instances", [stats])
    return all(e.get("queue_length", 0) == 0 and e.get("running_batch", 0) == 0 for e in entries)


def settle(
    servers: Sequence[Process], processes: Sequence[Process], deadline_s: float = 20
) -> bool:
    """Wait for both servers to report no queued or running request (what a point cut at its
    deadline leaves finishes or is aborted); False if they still report some at the deadline
    (the next point then starts on a busy GPU, and the record says so)."""
    try:
        wait_until(lambda: all(idle(s) for s in servers), deadline_s, "servers idle", processes)
    except TimeoutError:
        return False
    return True


def stop(processes: Sequence[Process]) -> None:
    for process in processes:
        if process.popen.poll() is None:
            process.popen.terminate()
    for process in processes:
        try:
            process.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(timeout=10)


def kv_metrics(process: Process) -> dict[str, float]:
    """The KV transfer samples of a server's /metrics, summed over labels but the outcome."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{process.url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "kv_transfer" not in sample.name or "le" in sample.labels:
                continue
            if sample.name.endswith("_created"):
                continue
            outcome = sample.labels.get("outcome")
            key = sample.name + (f"{{outcome={outcome}}}" if outcome else "")
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def gpu_processes() -> list[str]:
    """nvidia-smi's compute processes and their memory (the two shares, seen by the driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def transport_evidence(prefill: Process, decode: Process, device: str) -> dict[str, Any]:
    """Which KV transport the servers negotiate and what the decode side saw of it."""
    from tessera.agents.engine.kv_transport import KVEndpoint, choose_transport
    from tessera.agents.serving.disaggregated import KV_TRANSPORT_PATH, local_transports

    remote = get_json(prefill.url + KV_TRANSPORT_PATH)
    local, _ = local_transports(device, 30.0)  # what the decode process, on the same GPU, runs
    chosen = choose_transport(local, KVEndpoint.from_dict(remote.get("endpoint")))
    metrics = kv_metrics(decode)
    count = metrics.get("tessera:kv_transfer_seconds_count", 0.0)
    warnings = [
        line
        for process in (prefill, decode)
        for line in process.log.read_text(errors="replace").splitlines()
        if "KV" in line and ("refused" in line or "failed" in line or "fall" in line)
    ]
    return {
        "prefill_kv_endpoint": remote,
        "decode_endpoint": local.as_dict(),
        "negotiated": chosen,
        "decode_kv_metrics": metrics,
        "prefill_kv_metrics": kv_metrics(prefill),
        "mean_pull_ms_prefill_included": round(
            1e3 * metrics.get("tessera:kv_transfer_seconds_sum", 0.0) / count, 2
        )
        if count
        else None,
        "kv_warnings_in_logs": warnings[:20],
    }


def serve_flags(
    role: str, port: int, device: str, plan: dict[str, Any], kv_blocks: int, folder: Path
) -> list[str]:
    scheduler = plan["scheduler"]
    flags = [
        "serve",
        "--model=bench",
        f"--weights-uri={folder}",
        f"--role={role}",
        f"--pool={role}-{CLASS}",
        f"--instance-id={role}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--device={device}",
        f"--dtype={'bf16' if device == 'cuda' else 'fp32'}",
        f"--max-model-len={plan['layout']['max_model_len']}",
        f"--max-num-seqs={scheduler['max_num_seqs']}",
        f"--max-num-batched-tokens={scheduler['max_num_batched_tokens']}",
        f"--block-size={BLOCK_SIZE}",
        f"--num-kv-blocks={kv_blocks}",
        "--max-waiting-requests=100000",
        "--request-timeout-s=0",
        "--log-level=info",
    ]
    if device == "cuda":
        flags.append(f"--gpu-memory-fraction={plan['memory_fraction']}")
    return flags


def run_deployment(plan: dict[str, Any], out: Path, shards: int) -> dict[str, Any]:
    """Start prefill, decode and router, warm them up, serve every point; the run's record."""
    import torch
    from random_weights_serve import write_model_folder
    from tessera.agents.engine.config import LlamaConfig

    smoke = plan["smoke"]
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("disagg_goodput: error: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        raise SystemExit(2)
    model = plan["model"]
    if smoke:
        kv_blocks = plan["estimated_kv_blocks"]
        gpu = "cpu"
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        kv_blocks = kv_blocks_for_share(total, plan["memory_fraction"], model)
        gpu = torch.cuda.get_device_name()
    layout = Layout(**plan["layout"])
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    record: dict[str, Any] = {
        "bench": "disagg_goodput",
        "device": gpu,
        "smoke": smoke,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "plan": {k: v for k, v in plan.items() if k != "points"},
        "kv_blocks_per_process": kv_blocks,
        "kv_tokens_per_process": kv_blocks * BLOCK_SIZE,
        "client_shards": shards,
        "points": [],
        "skipped_rates": [],
    }
    path = out / "disagg_goodput.json"

    def save() -> None:
        path.write_text(json.dumps(record) + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        config = LlamaConfig(**model, eos_token_ids=(2,), bos_token_id=1)
        write_model_folder(folder, config)
        ports = {name: free_port() for name in ("prefill", "decode", "router", "kv")}
        prefill_flags = serve_flags("prefill", ports["prefill"], device, plan, kv_blocks, folder)
        prefill_flags.append(f"--kv-port={ports['kv']}")
        decode_flags = serve_flags("decode", ports["decode"], device, plan, kv_blocks, folder)
        decode_flags.append(f"--prefill-service=127.0.0.1:{ports['prefill']}")
        servers = [
            launch("prefill", prefill_flags, ports["prefill"], logs),
            launch("decode", decode_flags, ports["decode"], logs),
        ]
        processes = list(servers)
        try:
            wait_until(lambda: all(ready(s) for s in servers), 600, "servers ready", processes)
            router_flags = [
                "router",
                f"--prefill={servers[0].url}",
                f"--decode={servers[1].url}",
                "--host=127.0.0.1",
                f"--port={ports['router']}",
                f"--block-size={BLOCK_SIZE}",
                "--stream-timeout-s=120",
                "--log-level=warning",
            ]
            router = launch("router", router_flags, ports["router"], logs)
            processes.append(router)
            wait_until(lambda: ready(router), 60, "router ready", processes)
            record["startup_s"] = round(time.monotonic() - started, 1)
            record["gpu_processes"] = gpu_processes()
            print(
                f"{gpu}: prefill, decode and router ready in {record['startup_s']} s; "
                f"{kv_blocks} KV blocks per process; GPU processes {record['gpu_processes']}",
                flush=True,
            )
            warm_up(plan, router, processes, shards)
            for number, point in enumerate(plan["points"], start=1):
                began = time.monotonic()
                if began - started + layout.duration_s + layout.drain_s > TIME_BUDGET_S:
                    record["skipped_rates"].append(point["rate_per_s"])
                    print(f"rate {point['rate_per_s']}/s skipped: past the time budget")
                    continue
                requests = list(
                    zip(
                        point["arrival_s"],
                        point["prompt_tokens"],
                        point["output_tokens"],
                        strict=True,
                    )
                )
                probed = {p.name: (p.popen.pid, p.url) for p in processes}
                before = serving_probes.snapshot(probed)
                records = run_point(
                    router.url,
                    requests,
                    model["vocab_size"],
                    layout.duration_s + layout.drain_s,
                    shards=shards,
                    prompt_base=number * 1_000_000,
                )
                settled = settle(servers, processes)
                tokens = sum(r.output_tokens for r in records)
                record["points"].append(
                    {
                        "rate_per_s": point["rate_per_s"],
                        "duration_s": layout.duration_s,
                        "servers_idle_after": settled,
                        "diagnostics": serving_probes.difference(
                            before, serving_probes.snapshot(probed), tokens
                        ),
                        "records": [r.as_dict() for r in records],
                    }
                )
                print_point(plan, point["rate_per_s"], records, time.monotonic() - began)
                save()
            record["transport"] = transport_evidence(servers[0], servers[1], device)
            record["gpu_processes_after"] = gpu_processes()
        finally:
            stop(processes)
    record["wall_s"] = round(time.monotonic() - started, 1)
    save()
    transport = record["transport"]
    print(
        f"KV transport: {transport['negotiated']} (decode pulls {transport['decode_kv_metrics']}, "
        f"mean pull {transport['mean_pull_ms_prefill_included']} ms with the prefill; "
        f"warnings {len(transport['kv_warnings_in_logs'])})",
        flush=True,
    )
    print(f"wrote {path} in {record['wall_s']} s", flush=True)
    return record


def warm_up(plan: dict[str, Any], router: Process, processes: list[Process], shards: int) -> None:
    """A few requests of the plan's longest and shortest prompts before anything is timed."""
    point = plan["points"][0]
    order = np.argsort(point["prompt_tokens"])
    picks = [
        int(i) for i in (*order[:4], *order[len(order) // 2 : len(order) // 2 + 4], *order[-4:])
    ]
    requests = [
        (0.1 * k, int(point["prompt_tokens"][i]), min(int(point["output_tokens"][i]), 16))
        for k, i in enumerate(picks)
    ]
    records = run_point(
        router.url, requests, plan["model"]["vocab_size"], 120, shards=1, prompt_base=900_000_000
    )
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed[:3]}")


def print_point(plan: dict[str, Any], rate: float, records: list[Record], wall_s: float) -> None:
    slo = Slo(**plan["slo"])
    ttft, tpot = engine_latencies(records)
    errors = sum(1 for r in records if r.error)
    print(
        f"rate {rate:6.2f}/s: {len(records)} requests, {errors} not finished, attainment "
        f"{attainment(MEASURE, slo, ttft, tpot):.3f}, p90 TTFT {percentile_ms(ttft, 90)} ms, "
        f"p90 TPOT {percentile_ms(tpot, 90)} ms, {wall_s:.0f} s",
        flush=True,
    )


# ---- the report (CPU) --------------------------------------------------------------------


def compare(record: dict[str, Any], transfer_file: Path = KV_TRANSFER) -> dict[str, Any]:
    """The simulator on exactly the run's requests; rows, goodputs and their ratio."""
    spec, accelerator = deployment_inputs()
    plan = record["plan"]
    slo = Slo(**plan["slo"])
    tokens = record["kv_tokens_per_process"]
    rows = []
    for point in record["points"]:
        records = [Record.from_dict(r) for r in point["records"]]
        workload = workload_of(
            [r.arrival_s for r in records],
            [r.prompt_tokens for r in records],
            [r.max_tokens for r in records],
            point["duration_s"],
        )
        result = simulate_shared(
            spec,
            accelerator,
            workload,
            {"prefill": tokens, "decode": tokens},
            plan["scheduler"],
            transfer_file,
        )
        rows.append(
            point_row(slo, point["rate_per_s"], engine_latencies(records), sim_latencies_of(result))
        )
    found = goodputs(rows, slo.target)
    ratio = found["sim_over_engine"]
    diagnostics = [
        diagnostic_row(point, row) for point, row in zip(record["points"], rows, strict=True)
    ]
    return {
        "device": record["device"],
        "smoke": record["smoke"],
        "kv_tokens_per_process": tokens,
        "slo": asdict(slo),
        "transport": record.get("transport", {}).get("negotiated"),
        "points": rows,
        "diagnostics": [d for d in diagnostics if d is not None],
        "goodput": found,
        "within_15pct": ratio is not None and abs(ratio - 1) <= 0.15,
    }


def diagnostic_row(point: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """Where a rate's time went (serving_probes), beside the client's mean TPOT; None for a
    run recorded before the probes."""
    probes = point.get("diagnostics")
    if not probes:
        return None
    records = [Record.from_dict(r) for r in point["records"]]
    _, tpot = engine_latencies(records)
    finite = tpot[np.isfinite(tpot)]
    decode = probes.get("decode", {})
    counters = decode.get("counters", {})
    out: dict[str, Any] = {
        "rate_per_s": row["rate_per_s"],
        "client_tpot_mean_ms": round(float(finite.mean()) * 1e3, 2) if len(finite) else None,
        "decode_server_tpot_mean_ms": decode.get("server_tpot_mean_ms"),
        "decode_preemptions": counters.get("vllm:num_preemptions_total"),
    }
    for name in ("decode", "prefill", "router"):
        entry = probes.get(name, {})
        out[f"{name}_event_loop_us_per_token"] = entry.get("event_loop_cpu_us_per_token")
        out[f"{name}_busiest_thread_us_per_token"] = entry.get("busiest_thread_cpu_us_per_token")
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{'rate/s':>7s} {'n':>5s} {'attain eng':>10s} {'attain sim':>10s} "
        f"{'TTFT p50 ms eng/sim':>21s} {'TTFT p90 ms eng/sim':>21s} "
        f"{'TPOT p50 ms eng/sim':>21s} {'TPOT p90 ms eng/sim':>21s}"
    )
    for row in report["points"]:
        cells = [
            f"{fmt(row[f'engine_{k}_ms']):>10s}/{fmt(row[f'sim_{k}_ms']):<10s}"
            for k in ("p50_ttft", "p90_ttft", "p50_tpot", "p90_tpot")
        ]
        print(
            f"{row['rate_per_s']:7.2f} {row['requests']:5d} {row['engine_attainment']:10.3f} "
            f"{row['sim_attainment']:10.3f} " + " ".join(cells)
        )
    if report.get("diagnostics"):
        print(
            "\nwhere the time went (CPU us per streamed token: event loop / busiest other thread):"
        )
        print(
            f"{'rate/s':>7s} {'TPOT mean ms client':>19s} {'decode server':>13s} {'preempt':>7s} "
            f"{'decode':>13s} {'prefill':>13s} {'router':>13s}"
        )
        for d in report["diagnostics"]:
            cpu = [
                f"{fmt(d[f'{n}_event_loop_us_per_token'], 0):>6s}/"
                f"{fmt(d[f'{n}_busiest_thread_us_per_token'], 0):<6s}"
                for n in ("decode", "prefill", "router")
            ]
            print(
                f"{d['rate_per_s']:7.2f} {fmt(d['client_tpot_mean_ms']):>19s} "
                f"{fmt(d['decode_server_tpot_mean_ms']):>13s} "
                f"{fmt(d['decode_preemptions'], 0):>7s} " + " ".join(cpu)
            )
    found = report["goodput"]
    print(
        f"goodput (attainment >= {report['slo']['target']}): engine {fmt(found['engine'], 2)} "
        f"req/s, simulator {fmt(found['sim'], 2)} req/s, simulator/engine "
        f"{fmt(found['sim_over_engine'], 3)} (within 15%: {report['within_15pct']}); "
        f"KV transport {report['transport']}"
    )


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    record = json.loads(Path(args.files[0]).read_text())
    report = {"command": " ".join(sys.argv), **compare(record)}
    print_report(report)
    out = Path(args.out or RESULTS / "disagg_goodput_report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("command", choices=["prepare", "run", "report"])
    parser.add_argument("files", nargs="*", help="report: the run's disagg_goodput.json")
    parser.add_argument("--plan", default=str(DEFAULT_PLAN), help="prepare: output; run: input")
    parser.add_argument("--out", default=None, help="run: folder; report: JSON file")
    parser.add_argument("--smoke", action="store_true", help="run: CPU, tiny model, then report")
    parser.add_argument("--shards", type=int, default=None, help="run: client processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shards is not None and not 1 <= args.shards <= 64:
        parser.error(f"--shards {args.shards}: must be in 1..64")
    if args.command == "prepare":
        run_prepare(args)
    elif args.command == "run":
        out = Path(args.out or "/tmp/disagg_goodput")
        plan = make_plan(True, args.seed) if args.smoke else json.loads(Path(args.plan).read_text())
        shards = args.shards or (1 if args.smoke else SHARDS)
        run_deployment(plan, out, shards)
        if args.smoke:
            args.files, args.out = [str(out / "disagg_goodput.json")], str(out / "report.json")
            run_report(args)
    else:
        if len(args.files) != 1:
            parser.error("report: give the run's disagg_goodput.json")
        run_report(args)


if __name__ == "__main__":
    main()
