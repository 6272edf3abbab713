"""The real engine on one GPU against the simulator, request for request.

The planner's verdicts (docs/placement-experiments.md) come from `tessera simulate`, whose step
costs are calibrated on kernel timings. This bench checks the simulator where it matters for
the colocated-versus-disaggregated question: it serves Poisson workloads in real time with
`tessera.agents.engine` on one GPU, then simulates exactly those requests (same arrival times
and lengths, same scheduler settings, same KV capacity) and compares SLO attainment and
goodput per GPU.

Four ways of using one GPU are measured:
- `chunked`: a colocated replica with chunked prefill (Tessera's colocated engine, 512-token
  budget);
- `whole`: a colocated replica that runs whole prompts (vLLM v0-like);
- `prefill`: a prefill-only replica, judged on TTFT alone; each finished prompt's KV is dropped,
  as if a link that costs the prefill GPU nothing carried it to a decode replica;
- `decode`: a decode-only replica, judged on TPOT alone, fed at the arrival times with KV
  blocks already on the GPU (as an NVLink or RDMA transfer delivers them).
A disaggregated deployment of x prefill and y decode GPUs carries at most
min(x * prefill goodput, y * decode goodput) / (x + y) requests per second per GPU. That bound
ignores KV transfer time, so it favours disaggregation.

Weights are random (timing does not depend on their values) and every output runs to its
sampled length.

    python bench/serving_validation.py prepare           # CPU: rates from the simulator, requests
    python bench/serving_validation.py engine --out DIR  # GPU: serve them (needs torch, numpy)
    python bench/serving_validation.py report DIR/*.json # CPU: simulate the same requests, compare

`--class h200` (examples/experiments/h200-class.yaml, calibrated by policies/calibration/
h200.yaml) runs the same against the H200 the GPU side is measured on; its plan is
bench/results/serving_validation_plan_h200.json.

`prepare` writes what the GPU side needs (model shape, KV capacity, SLOs, every request's
arrival time and lengths) to bench/results/serving_validation_plan.json, so the GPU machine
runs the engine alone, without pydantic or the simulator.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from model_shapes import hf_model_of

try:
    import tessera.agents  # noqa: F401
except ImportError:  # a checkout that is not installed: put the package layout on the path
    _root = Path(__file__).resolve().parent.parent
    _tree = Path("/tmp/tessera-bench-tree")
    (_tree / "tessera").mkdir(parents=True, exist_ok=True)
    for _name in ("__init__.py", "api", "policies", "sim", "agents"):
        _link = _tree / "tessera" / _name
        if not _link.exists():
            _link.symlink_to(_root / ("tessera/__init__.py" if _name == "__init__.py" else _name))
    sys.path.insert(0, str(_tree))

if TYPE_CHECKING:
    from tessera.api.accelerator_class import AcceleratorClassSpec
    from tessera.api.model_deployment import ModelDeploymentSpec, Plan
    from tessera.sim.metrics import RunResult
    from tessera.sim.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEPLOYMENT = ROOT / "examples/experiments/distserve-13b-a100.yaml"
DEFAULT_CLASSES = [
    ROOT / "examples/accelerator-classes.yaml",
    ROOT / "examples/experiments/h200-class.yaml",
]
"""The example fleet's classes, and the H200 the GPU side of this bench is run on."""
RESULTS = ROOT / "bench/results"
DEFAULT_PLAN = RESULTS / "serving_validation_plan.json"


def default_plan(class_name: str) -> Path:
    """Where `prepare` writes, and `engine` reads, the plan for a class (h100's kept its name)."""
    if class_name == "h100":
        return DEFAULT_PLAN
    return RESULTS / f"serving_validation_plan_{class_name}.json"


RATE_FRACTIONS = (0.7, 0.9, 1.1, 1.3)
"""Engine rates, as fractions of the simulator's goodput for the mode: they bracket it."""
BLOCK_SIZE = 16


class Mode(StrEnum):
    CHUNKED = "chunked"
    WHOLE = "whole"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    target: float


def judged_on(mode: Mode) -> tuple[bool, bool]:
    """Which SLOs a mode's requests are judged on: (TTFT, TPOT)."""
    return {
        Mode.CHUNKED: (True, True),
        Mode.WHOLE: (True, True),
        Mode.PREFILL: (True, False),
        Mode.DECODE: (False, True),
    }[mode]


@dataclass
class Served:
    """One mode at one rate: the requests and when their first and last tokens came."""

    mode: Mode
    rate_per_s: float
    duration_s: float
    arrival_s: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    first_token_s: list[float] = field(default_factory=list)
    finish_s: list[float] = field(default_factory=list)
    steps: int = 0
    preemptions: int = 0
    step_ms: list[float] = field(default_factory=list)
    """Wall time of each engine step (scheduling, launch, GPU work and sampling)."""
    step_prompt_tokens: list[int] = field(default_factory=list)
    step_sampled_tokens: list[int] = field(default_factory=list)

    def workload(self) -> Workload:
        from tessera.sim.workload import Workload

        return Workload(
            np.array(self.arrival_s),
            np.array(self.prompt_tokens, dtype=np.int64),
            np.array(self.output_tokens, dtype=np.int64),
            self.duration_s,
            f"{self.mode}-{self.rate_per_s:g}",
        )

    def head(self, seconds: float) -> Served:
        """The requests that arrive in the first `seconds`, not yet served."""
        cut = sum(1 for a in self.arrival_s if a < seconds)
        return Served(
            self.mode,
            self.rate_per_s,
            min(seconds, self.duration_s),
            self.arrival_s[:cut],
            self.prompt_tokens[:cut],
            self.output_tokens[:cut],
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(arrival, first token, finish, output tokens), unfinished requests at infinity."""
        return (
            np.array(self.arrival_s),
            np.array(self.first_token_s, dtype=float),
            np.array(self.finish_s, dtype=float),
            np.array(self.output_tokens),
        )


def latencies(
    mode: Mode, arrival: np.ndarray, first: np.ndarray, finish: np.ndarray, outputs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and TPOT per request. A decode-only replica's requests start when they reach it
    (their first token came from a prefill replica), so TPOT there counts any wait for blocks."""
    start = arrival if mode is Mode.DECODE else first
    steps = np.maximum(outputs - 1, 1)
    with np.errstate(invalid="ignore"):  # unfinished requests: inf - inf
        tpot = np.where(outputs > 1, (finish - start) / steps, 0.0)
    tpot = np.where(np.isfinite(finish), tpot, np.inf)
    return first - arrival, tpot


def attainment(mode: Mode, slo: Slo, ttft_s: np.ndarray, tpot_s: np.ndarray) -> float:
    """Fraction of requests meeting the SLOs the mode is judged on (unfinished: missed)."""
    check_ttft, check_tpot = judged_on(mode)
    ok = np.isfinite(ttft_s) & np.isfinite(tpot_s)
    if check_ttft:
        ok &= ttft_s <= slo.ttft_s * (1 + 1e-12)
    if check_tpot:
        ok &= tpot_s <= slo.tpot_s * (1 + 1e-12)
    return float(ok.mean()) if len(ok) else 1.0


# ---- the simulator side (CPU) ------------------------------------------------------------


def load_inputs(
    deployment_path: Path, classes_paths: Sequence[Path], class_name: str
) -> tuple[ModelDeploymentSpec, AcceleratorClassSpec]:
    from tessera.api.accelerator_class import AcceleratorClass
    from tessera.api.loader import load_kind
    from tessera.api.model_deployment import ModelDeployment

    (deployment,) = load_kind([deployment_path], ModelDeployment)
    classes = {c.metadata.name: c.spec for c in load_kind(list(classes_paths), AcceleratorClass)}
    return deployment.spec, classes[class_name]


def slo_of(spec: ModelDeploymentSpec) -> Slo:
    return Slo(spec.slo.ttft_ms / 1e3, spec.slo.tpot_ms / 1e3, spec.slo.attainment_target)


def sim_plan(mode: Mode, class_name: str) -> Plan:
    """One GPU doing the mode's work; for `prefill` and `decode` the other phase gets four
    GPUs so that only the measured one binds. Each pool records its engine scheduler as the
    planner would: chunked prefill (the planner's budget) only for `chunked`."""
    from tessera.api.model_deployment import Plan, PoolPlan, PoolRole, ServingMode
    from tessera.policies.perfmodel import MAX_RUNNING_REQUESTS, PREFILL_CHUNK_TOKENS

    def pool(role: PoolRole, replicas: int) -> PoolPlan:
        return PoolPlan(
            name=f"{role.value}-{class_name}",
            role=role,
            accelerator_class=class_name,
            tensor_parallel=1,
            replicas=replicas,
            prefill_chunk_tokens=PREFILL_CHUNK_TOKENS if mode is Mode.CHUNKED else None,
            max_running_requests=MAX_RUNNING_REQUESTS,
        )

    if mode in (Mode.CHUNKED, Mode.WHOLE):
        pools, serving = [pool(PoolRole.COLOCATED, 1)], ServingMode.COLOCATED
    elif mode is Mode.PREFILL:
        pools = [pool(PoolRole.PREFILL, 1), pool(PoolRole.DECODE, 4)]
        serving = ServingMode.DISAGGREGATED
    else:
        pools = [pool(PoolRole.PREFILL, 4), pool(PoolRole.DECODE, 1)]
        serving = ServingMode.DISAGGREGATED
    return Plan(mode=serving, pools=pools, cost_per_hour=0.0, power_w=0.0, rationale="bench")


def engine_scheduler(mode: Mode, class_name: str, max_context_tokens: int) -> dict[str, Any]:
    """The measured GPU's engine scheduler (the one-replica pool of `sim_plan`), as the
    fields of the SchedulerConfig the operator would give that pool (`PoolPlan.scheduler`)."""
    (pool,) = (p for p in sim_plan(mode, class_name).pools if p.replicas == 1)
    return asdict(pool.scheduler(max_context_tokens))


def simulate(
    mode: Mode,
    spec: ModelDeploymentSpec,
    class_name: str,
    accelerator: AcceleratorClassSpec,
    workload: Workload,
    kv_tokens: int,
) -> RunResult:
    """The simulator on exactly these requests, with the schedulers the plan's pools record
    and the engine's KV capacity. KV moves at NVLink speed (the engine bench hands blocks over
    on the GPU)."""
    from tessera.sim.cluster import Cluster
    from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation

    setup = DeploymentSetup("validation", spec, sim_plan(mode, class_name))
    cluster = Cluster(
        "validation",
        {class_name: accelerator},
        {class_name: math.ceil(5 / accelerator.accelerators_per_node)},
        kv_link_gbps=accelerator.interconnect_bandwidth_gbps,
    )
    config = SimConfig(seed=0, block_size_tokens=BLOCK_SIZE, kv_capacity_tokens=kv_tokens)
    return Simulation(cluster, [setup], [workload], config).run()


def sim_latencies(mode: Mode, result: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and TPOT as the engine side measures them; a decode-only measurement starts each
    request when its KV reaches the decode replica."""
    finish = np.where(result.finish_count > 0, result.finish_s, np.inf)
    first = np.where(np.isnan(result.first_token_s), np.inf, result.first_token_s)
    arrival = result.arrival_s
    if mode is Mode.DECODE:  # TTFT stays the client's; TPOT starts at the decode replica
        arrival = first + np.nan_to_num(result.transfer_s)
    _, tpot = latencies(mode, arrival, first, finish, result.output_tokens)
    return first - result.arrival_s, tpot


def highest_rate(meets: Callable[[float], bool], ceiling: float, bisections: int) -> float:
    """The highest rate `meets` accepts, assuming it is monotone: double from 1 req/s until it
    fails (or reaches `ceiling`), then bisect the last interval `bisections` times; 0 when even
    1 req/s fails. Its lower end is returned, so the rate is one that was seen to pass."""
    low, high = 0.0, 1.0
    while meets(high) and high < ceiling:
        low, high = high, high * 2
    for _ in range(bisections):
        middle = (low + high) / 2
        low, high = (middle, high) if meets(middle) else (low, middle)
    return low


def sim_goodput(
    mode: Mode,
    spec: ModelDeploymentSpec,
    class_name: str,
    accelerator: AcceleratorClassSpec,
    kv_tokens: int,
    duration_s: float,
    seed: int,
) -> float:
    """Highest Poisson rate at which the simulated attainment reaches the target (bisection)."""
    from tessera.sim.workload import synthetic_workload

    slo = slo_of(spec)

    def meets(rate: float) -> bool:
        rng = np.random.default_rng([seed, 5])
        workload = synthetic_workload(spec.traffic, duration_s, rng, rate_per_s=rate)
        result = simulate(mode, spec, class_name, accelerator, workload, kv_tokens)
        return attainment(mode, slo, *sim_latencies(mode, result)) >= slo.target

    return highest_rate(meets, ceiling=1024, bisections=10)


def run_prepare(args: argparse.Namespace) -> None:
    """Rates bracketing the simulator's goodput per mode, and the requests to serve at each."""
    from tessera.policies.perfmodel import ReplicaPerformance
    from tessera.sim.workload import synthetic_workload

    spec, accelerator = load_inputs(args.deployment, args.classes, args.accelerator_class)
    arch = spec.model.architecture
    kv_tokens = ReplicaPerformance(arch, accelerator).kv_capacity_tokens
    modes: dict[str, Any] = {}
    for mode in [Mode(m) for m in args.modes]:
        goodput = sim_goodput(
            mode, spec, args.accelerator_class, accelerator, kv_tokens, args.duration, args.seed
        )
        rates = [round(goodput * f, 2) for f in RATE_FRACTIONS]
        print(f"{mode:8s} simulated goodput {goodput:6.2f} req/s -> engine rates {rates}")
        points = []
        for rate in rates:
            rng = np.random.default_rng([args.seed, 5])
            workload = synthetic_workload(spec.traffic, args.duration, rng, rate_per_s=rate)
            points.append(
                asdict(
                    Served(
                        mode,
                        rate,
                        args.duration,
                        workload.arrival_s.tolist(),
                        workload.prompt_tokens.tolist(),
                        workload.output_tokens.tolist(),
                    )
                )
            )
        scheduler = engine_scheduler(mode, args.accelerator_class, arch.max_context_tokens)
        modes[mode.value] = {"sim_goodput": goodput, "scheduler": scheduler, "points": points}
    plan = {
        "deployment": str(args.deployment.relative_to(ROOT)),
        "accelerator_class": args.accelerator_class,
        "model": hf_model_of(arch),
        "kv_capacity_tokens": kv_tokens,
        "slo": asdict(slo_of(spec)),
        "command": " ".join(sys.argv),
        "modes": modes,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan) + "\n")
    print(f"wrote {path}")


# ---- the engine side (GPU) ---------------------------------------------------------------


class RealTimeDriver:
    """Feeds one engine its requests at their arrival times and records token times.

    Times are seconds since the run's start on `clock`; TTFT is measured from a request's
    scheduled arrival, so time the loop spends elsewhere counts against the engine.
    """

    def __init__(
        self,
        engine: Any,
        mode: Mode,
        kv_source: Any | None = None,
        clock: Callable[[], float] = time.perf_counter,
        drain_s: float = 20.0,
        seed: int = 0,
        profile_steps: tuple[int, int] | None = None,
    ) -> None:
        self.profile_steps = profile_steps
        """(first, last) step of the next serve() to run under torch's profiler."""
        self.engine = engine
        self.mode = mode
        self.kv_source = kv_source
        self.clock = clock
        self.drain_s = drain_s
        self.rng = np.random.default_rng(seed)

    def serve(self, served: Served) -> Served:
        """Replay `served`'s arrivals through the engine's real-time serving loop (the one
        `tessera serve` runs on its thread), driven here step by step on this thread."""
        from tessera.agents.engine.request import SamplingParams
        from tessera.agents.engine.serving_loop import ServingLoop, TokenEvent

        engine, count = self.engine, len(served.arrival_s)
        loop = ServingLoop(engine, max_waiting=count + 1, clock=self.clock)
        first = [math.inf] * count
        finish = [math.inf] * count
        events: list[TokenEvent] = []
        vocab = engine.config.vocab_size
        next_arrival = 0
        preempted_before = engine.stats.preemptions_total
        deadline = served.duration_s + self.drain_s
        start = self.clock()

        def imported(i: int) -> Callable[[Any], None]:
            def done(future: Any) -> None:
                if not future.cancelled() and future.exception() is None:
                    first[i] = served.arrival_s[i]

            return done

        while True:
            now = self.clock() - start
            while next_arrival < count and served.arrival_s[next_arrival] <= now:
                i = next_arrival
                next_arrival += 1
                if self.mode is Mode.DECODE:
                    if served.output_tokens[i] <= 1:  # nothing left to decode
                        first[i] = finish[i] = served.arrival_s[i]
                    else:  # the KV is on the GPU once blocks are free
                        admitted = loop.submit_import(self._package(i, served), events.append)
                        admitted.add_done_callback(imported(i))
                    continue
                prompt = self.rng.integers(0, vocab, served.prompt_tokens[i]).tolist()
                params = SamplingParams(max_new_tokens=served.output_tokens[i], ignore_eos=True)
                loop.submit(prompt, params, events.append, request_id=f"r{i}")
            if next_arrival >= count and not loop.has_work():
                break
            if now > deadline:
                break
            if not loop.has_work():
                wait = served.arrival_s[next_arrival] - now if next_arrival < count else 0.0
                time.sleep(max(0.0, min(wait, 0.05)))
                continue
            self._profile(served.steps)
            prompt_before = engine.stats.prompt_tokens_total
            sampled_before = engine.stats.generated_tokens_total
            loop.run_once()
            served.steps += 1
            stamp = self.clock() - start
            served.step_ms.append(round((stamp - now) * 1e3, 3))
            served.step_prompt_tokens.append(engine.stats.prompt_tokens_total - prompt_before)
            served.step_sampled_tokens.append(engine.stats.generated_tokens_total - sampled_before)
            parked = False
            for event in events:
                i = int(event.request_id.removeprefix("r"))
                if event.token_ids and math.isinf(first[i]):
                    first[i] = stamp
                if (event.finished or event.parked) and math.isinf(finish[i]):
                    finish[i] = stamp
                if event.parked:  # prefill-only: the KV would leave now; drop it
                    loop.abort(event.request_id)
                    parked = True
            events.clear()
            if parked:
                loop.apply_commands()  # free the blocks now, as the transfer would
                events.clear()
        served.first_token_s, served.finish_s = first, finish
        served.preemptions = engine.stats.preemptions_total - preempted_before
        loop.shutdown()  # whatever the deadline cut off
        return served

    def _profile(self, step: int) -> None:
        """Start or stop torch's profiler at the configured steps; print where time went."""
        if self.profile_steps is None:
            return
        import torch

        first, last = self.profile_steps
        if step == first:
            self._profiler = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    torch.profiler.ProfilerActivity.CUDA,
                ]
            )
            self._profiler.__enter__()
        elif step == last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            averages = self._profiler.key_averages()
            for key in ("self_cpu_time_total", "self_device_time_total"):
                print(f"---- {self.mode} steps {first}-{last} by {key}", flush=True)
                print(averages.table(sort_by=key, row_limit=25), flush=True)
            self.profile_steps = None

    def _package(self, i: int, served: Served) -> Any:
        """A request as a prefill replica would hand it over: prompt computed, first token
        sampled, its KV blocks (random values) already in this GPU's memory."""
        from tessera.agents.engine.kv_transfer import KVPackage
        from tessera.agents.engine.request import SamplingParams

        engine, tokens = self.engine, served.prompt_tokens[i]
        vocab = engine.config.vocab_size
        params = SamplingParams(max_new_tokens=served.output_tokens[i], ignore_eos=True)
        return KVPackage(
            request_id=f"r{i}",
            geometry=engine.kv_geometry,
            prompt_token_ids=self.rng.integers(0, vocab, tokens).tolist(),
            output_token_ids=[int(self.rng.integers(0, vocab))],
            num_computed_tokens=tokens,
            sampling=params.to_dict(),
            blocks=self.kv_source[: engine.kv_cache.blocks_for_tokens(tokens)],
            checksum_algorithm="none",
            block_checksums=[],
        )


def build_engine(
    mode: Mode, config: Any, weights: Any, kv_blocks: int, scheduler: dict[str, Any]
) -> Any:
    """The engine for a mode, with the scheduler `prepare` wrote (`engine_scheduler`)."""
    from tessera.agents.engine.engine import Engine, EngineConfig, EngineRole
    from tessera.api.scheduler import SchedulerConfig

    role = {
        Mode.CHUNKED: EngineRole.COLOCATED,
        Mode.WHOLE: EngineRole.COLOCATED,
        Mode.PREFILL: EngineRole.PREFILL,
        Mode.DECODE: EngineRole.DECODE,
    }[mode]
    engine_config = EngineConfig(
        role=role,
        num_kv_blocks=kv_blocks,
        block_size=BLOCK_SIZE,
        scheduler=SchedulerConfig(**scheduler),
    )
    return Engine(config, weights, engine_config)


def kv_source_for(engine: Any, max_tokens: int) -> Any:
    """Random KV blocks on the engine's device, enough for the longest prompt."""
    import torch

    blocks = engine.kv_cache.blocks_for_tokens(max_tokens)
    shape = (blocks, *engine.kv_geometry.block_shape)
    return torch.randn(shape, device=engine.device, dtype=engine.kv_cache.dtype)


def run_engine(args: argparse.Namespace) -> None:
    import torch
    from tessera.agents.engine.config import LlamaConfig
    from tessera.agents.engine.weights import random_llama_weights

    plan = json.loads(Path(args.plan).read_text())
    slo = Slo(**plan["slo"])
    config = LlamaConfig(**plan["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weights = random_llama_weights(config, device, dtype, seed=args.seed)
    longest = max(max(p["prompt_tokens"]) for m in plan["modes"].values() for p in m["points"])
    planned = plan["kv_capacity_tokens"] // BLOCK_SIZE
    kv_blocks = planned
    if device == "cuda":  # leave room for the KV source, activations and CUDA graphs
        free, _ = torch.cuda.mem_get_info()
        per_block = config.kv_bytes_per_token(2) * BLOCK_SIZE
        spare = free - 2 * longest * config.kv_bytes_per_token(2) - 4 * 2**30
        kv_blocks = min(planned, int(spare // per_block))
    kv_blocks = int(kv_blocks * args.kv_fraction)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{gpu}: {kv_blocks} KV blocks ({planned} planned)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in [Mode(m) for m in args.modes]:
        modes = plan["modes"][mode.value]
        engine = build_engine(mode, config, weights, kv_blocks, modes["scheduler"])
        driver = RealTimeDriver(
            engine, mode, kv_source_for(engine, longest), drain_s=args.drain, seed=args.seed
        )
        planned_points = modes["points"]
        if args.points is not None:
            planned_points = [planned_points[i] for i in args.points]
        points = [
            Served(**{**p, "mode": mode}).head(args.limit or p["duration_s"])
            for p in planned_points
        ]
        driver.serve(points[0].head(args.warmup))  # compiles kernels before anything is timed
        results = []
        if args.profile:
            driver.profile_steps = (20, 30)
        for served in points:
            began = time.perf_counter()
            driver.serve(served)
            ttft, tpot = latencies(mode, *served.arrays())
            print(
                f"{mode.value:8s} rate {served.rate_per_s:6.2f}/s: {len(served.arrival_s)} "
                f"requests, attainment {attainment(mode, slo, ttft, tpot):.3f}, "
                f"{served.steps} steps, {served.preemptions} preemptions, "
                f"{time.perf_counter() - began:.0f} s",
                flush=True,
            )
            results.append(asdict(served))
        record = {
            "mode": mode.value,
            "device": gpu,
            "deployment": plan["deployment"],
            "accelerator_class": plan["accelerator_class"],
            "kv_blocks": kv_blocks,
            "planned_kv_blocks": planned,
            "block_size": BLOCK_SIZE,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
            "command": " ".join(sys.argv),
            "points": results,
        }
        (out / f"serving_validation_{mode.value}.json").write_text(json.dumps(record) + "\n")
        del engine, driver
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- the report (CPU) --------------------------------------------------------------------


def crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Rate where attainment falls through `target`, interpolated between measured rates;
    None when it is below the target at the lowest rate, the top rate when it never falls."""
    points = sorted(points)
    if not points or points[0][1] < target:
        return None
    for (r0, a0), (r1, a1) in itertools.pairwise(points):
        if a1 < target <= a0:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
    return points[-1][0]


def best_split(prefill: float, decode: float, largest: int = 8) -> tuple[float, int, int]:
    """Per-GPU goodput of the best x prefill : y decode split, and the split."""
    best = (0.0, 1, 1)
    for x in range(1, largest + 1):
        for y in range(1, largest + 1):
            per_gpu = min(x * prefill, y * decode) / (x + y)
            if per_gpu > best[0] + 1e-12:
                best = (per_gpu, x, y)
    return best


def percentile_ms(values: np.ndarray, q: float) -> float | None:
    value = float(np.percentile(values, q)) if len(values) else math.nan
    return round(value * 1e3, 1) if math.isfinite(value) else None


def compare_mode(record: dict[str, Any], classes: Sequence[Path]) -> dict[str, Any]:
    """Engine and simulator, point by point, for one mode's engine record."""
    mode = Mode(record["mode"])
    class_name = record["accelerator_class"]
    spec, accelerator = load_inputs(ROOT / record["deployment"], classes, class_name)
    slo = slo_of(spec)
    kv_tokens = record["kv_blocks"] * record["block_size"]
    rows = []
    for point in record["points"]:
        served = Served(**{**point, "mode": mode})
        result = simulate(mode, spec, class_name, accelerator, served.workload(), kv_tokens)
        e_ttft, e_tpot = latencies(mode, *served.arrays())
        s_ttft, s_tpot = sim_latencies(mode, result)
        rows.append(
            {
                "rate_per_s": served.rate_per_s,
                "requests": len(served.arrival_s),
                "engine_attainment": attainment(mode, slo, e_ttft, e_tpot),
                "sim_attainment": attainment(mode, slo, s_ttft, s_tpot),
                "engine_p90_ttft_ms": percentile_ms(e_ttft, 90),
                "sim_p90_ttft_ms": percentile_ms(s_ttft, 90),
                "engine_p90_tpot_ms": percentile_ms(e_tpot, 90),
                "sim_p90_tpot_ms": percentile_ms(s_tpot, 90),
                "engine_steps": served.steps,
                "engine_preemptions": served.preemptions,
            }
        )
    return {
        "device": record["device"],
        "kv_tokens": kv_tokens,
        "points": rows,
        "engine_goodput": crossing(
            [(r["rate_per_s"], r["engine_attainment"]) for r in rows], slo.target
        ),
        "sim_goodput": crossing([(r["rate_per_s"], r["sim_attainment"]) for r in rows], slo.target),
    }


def summarise(table: dict[str, Any]) -> dict[str, Any]:
    """Best colocated and best disaggregated goodput per GPU, engine and simulator."""
    out: dict[str, Any] = {"lines": []}
    for side in ("engine", "sim"):
        colocated = max(
            (table[m][f"{side}_goodput"] or 0.0 for m in ("chunked", "whole") if m in table),
            default=None,
        )
        entry: dict[str, Any] = {"colocated": colocated}
        if "prefill" in table and "decode" in table:
            p, d = table["prefill"][f"{side}_goodput"], table["decode"][f"{side}_goodput"]
            if p and d:
                per_gpu, x, y = best_split(p, d)
                entry |= {"disaggregated": per_gpu, "split": [x, y]}
                ratio = per_gpu / colocated if colocated else math.nan
                out["lines"].append(
                    f"{side}: best colocated {fmt(colocated)} req/s/GPU; disaggregated at most "
                    f"{per_gpu:.2f} req/s/GPU ({x}P:{y}D, transfers free) = {ratio:.2f}x"
                )
        out[side] = entry
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(table: dict[str, Any]) -> None:
    print(
        f"{'mode':8s} {'rate/s':>7s} {'n':>5s} {'attain eng':>10s} {'attain sim':>10s} "
        f"{'p90 TTFT ms eng/sim':>21s} {'p90 TPOT ms eng/sim':>21s}"
    )
    for mode, entry in table.items():
        for row in entry["points"]:
            print(
                f"{mode:8s} {row['rate_per_s']:7.2f} {row['requests']:5d} "
                f"{row['engine_attainment']:10.3f} {row['sim_attainment']:10.3f} "
                f"{fmt(row['engine_p90_ttft_ms']):>10s}/{fmt(row['sim_p90_ttft_ms']):<10s} "
                f"{fmt(row['engine_p90_tpot_ms']):>10s}/{fmt(row['sim_p90_tpot_ms']):<10s}"
            )
        print(
            f"{mode:8s} goodput per GPU: engine {fmt(entry['engine_goodput'])}, "
            f"simulator {fmt(entry['sim_goodput'])} req/s"
        )


def run_report(args: argparse.Namespace) -> None:
    records = [json.loads(Path(p).read_text()) for p in args.files]
    table = {record["mode"]: compare_mode(record, args.classes) for record in records}
    print_report(table)
    summary = summarise(table)
    for line in summary["lines"]:
        print(line)
    report = {"command": " ".join(sys.argv), "modes": table, "summary": summary}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "engine", "report"])
    parser.add_argument("files", nargs="*", help="report: the engine's JSON files")
    parser.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    parser.add_argument("--classes", type=Path, nargs="+", default=DEFAULT_CLASSES)
    parser.add_argument("--class", dest="accelerator_class", default="h100")
    parser.add_argument("--modes", nargs="+", default=[m.value for m in Mode])
    parser.add_argument(
        "--plan", default=None, help="engine: prepare's output (default: the --class's plan)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--drain", type=float, default=15.0, help="seconds allowed after")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds served untimed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, nargs="*", help="engine: indices of rates to run")
    parser.add_argument("--profile", action="store_true", help="engine: profile 15 steps")
    parser.add_argument("--limit", type=float, help="engine: serve only the first seconds")
    parser.add_argument(
        "--kv-fraction", type=float, default=1.0, help="engine: this fraction of the KV blocks"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.deployment = args.deployment.resolve()
    if args.command == "prepare":
        args.out = args.out or str(default_plan(args.accelerator_class))
        run_prepare(args)
    elif args.command == "engine":
        args.plan = args.plan or str(default_plan(args.accelerator_class))
        args.out = args.out or str(RESULTS / "serving_validation")
        run_engine(args)
    else:
        args.out = args.out or str(RESULTS / "serving_validation.json")
        run_report(args)


if __name__ == "__main__":
    main()
