"""The PowerBudget decision capping a real GPU through a real node agent, under serving load.

    python bench/power_gpu_run.py --out $OUT/power_gpu     # GPU (root for the caps): ~3.5 min
    python bench/power_gpu_run.py --smoke --out /tmp/pg    # CPU: simulated device, tiny model

What runs, all in this process:
- the engine (tessera.agents.engine, Llama-3-8B shape, random bf16 weights; --smoke: a tiny
  float32 model on the CPU) serving a closed-loop load: `--concurrency` requests live at all
  times, each `--prompt-tokens` long with `--output-tokens` generated; its ServingLoop is
  stepped on a thread of its own and every step is timed and classed by whether it computed
  prompt tokens (compute-bound) or only decoded (memory-bound);
- a node agent (tessera.agents.server.AgentServer) with the NVML backend (--smoke: the
  simulated H100), Control over mutual TLS with certificates made by openssl for this run, as
  the operator reaches agents;
- the PowerBudget decision (policies.power.decide) every `--interval-s` on the agent's
  telemetry (power from the energy counter over the round), its actuations sent through the
  agent's Control RPCs in the order the operator's controller sends them
  (policies.power.actuation_steps).

Phases:
1. fixed actuations through the agent: none, then each power limit of `--limits` (700 -> 500
   -> 350 W by default) and an SM clock lock (`--lock-mhz`), `--phase-s` each: step times,
   TPOT and TTFT beside what the class power model (policies/power_model.py) predicts;
2. the controller: a budget that does not bind, then budgets whose target (the middle of the
   hysteresis band) is each of `--budget-fractions` of the uncapped draw measured in phase 1
   (0.8 and 0.6: about 500 and 350 W on a device drawing 600), then no binding budget again
   (the caps must be lifted): what it decided, the draw, latency. `--emergency-above` is 1.5
   so that a step is shed by graded capping (the default 1.0 sends a device straight to its
   floor when a step lands more than 11% below its draw);
3. always (finally, also on SIGTERM): clocks and power limit reset through the agent, the agent
   stopped (it resets what it set), the backend reset directly, and the final limit printed.

Where NVML refuses a control (not root, a virtualised GPU), the refusal is printed once, the
controller's decisions are still logged (marked not applied), and latency is measured uncapped.
Needs torch, numpy, grpcio, protobuf, nvidia-ml-py (GPU) and pydantic (policies.power's
PowerBudgetSpec). The agent also needs grpcio-health-checking (its health service) and the
openssl binary (the certificates): without either, the run says so and calls Control and reads
telemetry on the backend in-process (the same decisions and device, no gRPC hop). Prints a
table; writes JSON after every phase.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
from tessera.api.power_budget import CappingThresholds, PowerBudgetSpec
from tessera.policies.power import DeviceView, actuation_steps, decide, reported_actuation
from tessera.policies.power_model import FREE, Actuation, ClassPowerModel, model_for_device

ROOT = Path(__file__).resolve().parent.parent

NODE = "power-gpu-run"
SERVER_NAME = "tessera-agent"
OPERATOR_SAN = "spiffe://cluster.local/ns/tessera-system/sa/tessera-operator"
SETTLE_S = 3.0
"""Time after an actuation change before latencies count (NVML applies a limit in ~0.1 s;
steps in flight and the draw settle within a second or two)."""


def say(line: str) -> None:
    print(line, flush=True)


# ---- load ---------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    submit_s: float
    first_s: float = math.nan
    finish_s: float = math.nan
    tokens: int = 0


@dataclass
class StepRecord:
    start_s: float
    seconds: float
    prompt_tokens: int
    sampled_tokens: int


class ClosedLoopLoad:
    """Keeps `concurrency` requests in the engine: each finished one is replaced at once."""

    def __init__(
        self, engine: Any, concurrency: int, prompt_tokens: int, output_tokens: int, seed: int
    ) -> None:
        import numpy as np
        from tessera.agents.engine.serving_loop import ServingLoop

        self.engine = engine
        self.loop = ServingLoop(engine, max_waiting=4 * concurrency)
        self.concurrency = concurrency
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.rng = np.random.default_rng(seed)
        self.requests: dict[str, RequestRecord] = {}
        self.steps: list[StepRecord] = []
        self.live = 0
        self._ids = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.error: BaseException | None = None

    def _submit(self) -> None:
        from tessera.agents.engine.request import SamplingParams

        rid = f"r{self._ids}"
        self._ids += 1
        vocab = self.engine.config.vocab_size
        prompt = self.rng.integers(0, vocab, self.prompt_tokens).tolist()
        params = SamplingParams(max_new_tokens=self.output_tokens, ignore_eos=True)
        self.requests[rid] = RequestRecord(time.perf_counter())
        self.live += 1
        self.loop.submit(prompt, params, self._sink, request_id=rid)

    def _sink(self, event: Any) -> None:  # on this thread: run_once calls it
        record = self.requests[event.request_id]
        now = time.perf_counter()
        if event.token_ids and math.isnan(record.first_s):
            record.first_s = now
        record.tokens += len(event.token_ids)
        if event.finished:
            record.finish_s = now
            self.live -= 1

    def _run(self) -> None:
        stats = self.engine.stats
        try:
            while not self._stop.is_set():
                while self.live < self.concurrency:
                    self._submit()
                prompt, sampled = stats.prompt_tokens_total, stats.generated_tokens_total
                start = time.perf_counter()
                self.loop.run_once()
                self.steps.append(
                    StepRecord(
                        start,
                        time.perf_counter() - start,
                        stats.prompt_tokens_total - prompt,
                        stats.generated_tokens_total - sampled,
                    )
                )
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            self.loop.shutdown()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine's load thread failed: {self.error!r}") from self.error

    def window(self, start_s: float, end_s: float) -> dict[str, Any]:
        """Latency and step statistics of what ran wholly inside [start_s, end_s)."""
        steps = [
            s for s in list(self.steps) if start_s <= s.start_s and s.start_s + s.seconds <= end_s
        ]
        done = [
            r
            for r in list(self.requests.values())
            if start_s <= r.submit_s and not math.isnan(r.finish_s) and r.finish_s <= end_s
        ]
        first = [
            r for r in list(self.requests.values()) if start_s <= r.submit_s and r.first_s <= end_s
        ]
        prefill = [s.seconds for s in steps if s.prompt_tokens]
        decode = [s.seconds for s in steps if not s.prompt_tokens]
        busy_s = sum(s.seconds for s in steps)
        tpot = [(r.finish_s - r.first_s) / (r.tokens - 1) for r in done if r.tokens > 1]
        ttft = [r.first_s - r.submit_s for r in first]
        return {
            "seconds": end_s - start_s,
            "steps": len(steps),
            "requests_done": len(done),
            "tokens_per_s": sum(s.sampled_tokens for s in steps) / (end_s - start_s),
            "prefill_step_ms": _mean_ms(prefill),
            "decode_step_ms": _mean_ms(decode),
            "compute_share": sum(prefill) / busy_s if busy_s else 0.0,
            "tpot_p50_ms": _quantile_ms(tpot, 0.5),
            "tpot_p90_ms": _quantile_ms(tpot, 0.9),
            "ttft_p50_ms": _quantile_ms(ttft, 0.5),
            "ttft_p90_ms": _quantile_ms(ttft, 0.9),
        }


def _mean_ms(values: Sequence[float]) -> float | None:
    return round(1e3 * statistics.fmean(values), 3) if values else None


def _quantile_ms(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def build_engine(args: argparse.Namespace) -> Any:
    import torch
    from tessera.agents.engine.config import LlamaConfig
    from tessera.agents.engine.engine import Engine, EngineConfig
    from tessera.agents.engine.scheduler import SchedulerConfig
    from tessera.agents.engine.weights import random_llama_weights

    if args.smoke:
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        )  # fmt: skip
        device, dtype, graphs = "cpu", torch.float32, False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        config = LlamaConfig.llama3_8b()
        device, dtype, graphs = "cuda", torch.bfloat16, True
    weights = random_llama_weights(config, device, dtype, seed=args.seed)
    per_request = -(-(args.prompt_tokens + args.output_tokens) // 16)
    engine_config = EngineConfig(
        num_kv_blocks=2 * args.concurrency * per_request,
        block_size=16,
        scheduler=SchedulerConfig(
            max_num_seqs=args.concurrency, max_num_batched_tokens=args.batched_tokens
        ),
        use_cuda_graphs=graphs,
        cuda_graph_batch_sizes=tuple(b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
                                     if b <= args.concurrency) or (1,),
    )  # fmt: skip
    return Engine(config, weights, engine_config)


# ---- the agent and the control path ------------------------------------------------------


class Telemetry:
    """The agent's Telemetry.Watch stream, read on a thread; the latest sample of the device."""

    def __init__(self, channel: Any, uuid: str, interval_ms: int) -> None:
        from tessera.agents.server import SCHEMA_VERSION
        from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

        self.uuid = uuid
        self.latest: Any = None
        self.latest_s = 0.0  # the agent's timestamp of `latest`
        self.count = 0
        self._stub = agent_pb2_grpc.TelemetryStub(channel)
        self._request = agent_pb2.WatchRequest(
            schema_version=SCHEMA_VERSION, min_interval_ms=interval_ms, device_uuids=[uuid]
        )
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import grpc

        try:
            self._call = self._stub.Watch(self._request)
            for snapshot in self._call:
                for sample in snapshot.devices:
                    if sample.uuid == self.uuid:
                        self.latest, self.latest_s = sample, snapshot.timestamp_unix_ns / 1e9
                        self.count += 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                say(f"telemetry stream ended: {error.code().name} {error.details()}")

    def wait(self, count: int, timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no telemetry from the agent within {timeout_s} s")
            time.sleep(0.02)
        return self.latest

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


class _Reading:
    """A backend reading with the proto's HasField, so both telemetry paths read alike."""

    def __init__(self, reading: Any) -> None:
        self._reading = reading

    def HasField(self, name: str) -> bool:
        return getattr(self._reading, name) is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reading, name)


class BackendTelemetry(Telemetry):
    """Where no agent runs: the backend read directly every `interval_ms` (said so in the
    output)."""

    def __init__(self, backend: Any, uuid: str, interval_ms: int) -> None:
        self.uuid = uuid
        self.latest = None
        self.latest_s = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._backend, self._period_s = backend, interval_ms / 1e3
        self._thread = threading.Thread(target=self._poll, name="telemetry", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            reading = self._backend.read(self.uuid)
            self.latest, self.latest_s = _Reading(reading), reading.timestamp_s
            self.count += 1
            self._stop.wait(self._period_s)

    def close(self) -> None:
        self._stop.set()


class Control:
    """Control of the one device: the agent's RPCs over mutual TLS, or the backend in-process
    where no agent could be started. Records a refused control once and skips it after."""

    def __init__(
        self, client: Any, backend: Any, uuid: str, min_mhz: int, observe_only: bool = False
    ) -> None:
        self.client, self.backend, self.uuid, self.min_mhz = client, backend, uuid, min_mhz
        # --observe-only: every control counts as refused up front, so nothing is ever sent
        self.refused: dict[str, str] = (
            {kind: OBSERVE_ONLY for kind in ("limit", "clocks")} if observe_only else {}
        )
        self.in_force = FREE
        self.calls: list[dict[str, Any]] = []

    def apply(self, wanted: Actuation) -> bool:
        """Bring the device to `wanted`; False when a control was refused (nothing applied)."""
        applied = True
        for action, value in actuation_steps(self.in_force, wanted):
            kind = "limit" if "power-limit" in action else "clocks"
            if kind in self.refused:
                applied = False
                continue
            error = self._call(action, value)
            self.calls.append({"action": action, "value": value, "error": error})
            if error is not None:
                self.refused[kind] = error
                applied = False
                say(
                    f"  {action} refused: {error}. The device's {kind} stay as they are; the "
                    "controller's decisions are logged as not applied and latency is measured "
                    "without them (run as root on a GPU that allows it)"
                )
        if applied:
            self.in_force = wanted
        return applied

    def _call(self, action: str, value: float | None) -> str | None:
        import grpc

        try:
            if self.client is not None:
                if action == "set-power-limit":
                    self.client.set_power_limit(self.uuid, float(value or 0))
                elif action == "reset-power-limit":
                    self.client.reset_power_limit(self.uuid)
                elif action == "lock-clocks":
                    self.client.lock_clocks(self.uuid, self.min_mhz, int(value or 0))
                else:
                    self.client.reset_clocks(self.uuid)
            elif action == "set-power-limit":
                self.backend.set_power_limit(self.uuid, float(value or 0))
            elif action == "reset-power-limit":
                self.backend.reset_power_limit(self.uuid)
            elif action == "lock-clocks":
                self.backend.lock_sm_clocks(self.uuid, self.min_mhz, int(value or 0))
            else:
                self.backend.reset_sm_clocks(self.uuid)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
        except Exception as error:  # a backend error, in-process
            return f"{type(error).__name__}: {error}"
        return None


OBSERVE_ONLY = "not sent (--observe-only)"


def make_certs(folder: Path) -> dict[str, Path]:
    from tessera.agents.local_certs import make_ca, make_leaf

    make_ca("ca", folder)
    make_leaf(
        "agent", "ca",
        f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", folder,
    )  # fmt: skip
    make_leaf(
        "operator", "ca", f"subjectAltName=URI:{OPERATOR_SAN}\nextendedKeyUsage=clientAuth\n",
        folder,
    )  # fmt: skip
    return {name: folder / name for name in ("ca.pem", "agent.pem", "agent.key",
                                             "operator.pem", "operator.key")}  # fmt: skip


def start_agent(backend: Any, folder: Path) -> tuple[Any, Any, Any, str]:
    """(agent, Control client, telemetry channel, how): the agent on loopback with mTLS, or
    (None, None, None, why not) where it cannot be started here."""
    try:
        from tessera.agents.client import AgentClient, ClientTls
        from tessera.agents.local_certs import OpenSslMissingError
        from tessera.agents.server import AgentServer, ServerTls
    except ImportError as error:
        return None, None, None, f"no agent ({error}): Control called on the backend in-process"
    try:
        files = make_certs(folder)
    except (OpenSslMissingError, OSError) as error:
        return None, None, None, f"no certificates ({error}): Control on the backend in-process"
    tls = ServerTls.from_files(
        files["agent.pem"], files["agent.key"], files["ca.pem"], allowed_client_sans=[OPERATOR_SAN]
    )
    agent = AgentServer(backend, node_name=NODE, listen="127.0.0.1:0", tls=tls, interval_s=0.25)
    agent.start()
    client_tls = ClientTls.from_files(
        files["ca.pem"], files["operator.pem"], files["operator.key"], SERVER_NAME
    )
    address = f"127.0.0.1:{agent.port}"
    client = AgentClient(client_tls.channel(address), timeout_s=10.0)
    info = client.info()
    how = (
        f"agent {info.node_name} on {address} over mutual TLS (control "
        f"{'enabled' if info.control_enabled else 'DISABLED'}; power limit settable: "
        f"{[d.power_limit_settable for d in info.devices]}, clocks lockable: "
        f"{[d.clocks_lockable for d in info.devices]})"
    )
    return agent, client, client_tls.channel(address), how


# ---- phases -------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    wanted: Actuation | None  # fixed actuation; None: the controller decides
    budget_w: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    applied: bool = True
    decisions: list[dict[str, Any]] = field(default_factory=list)
    draw_w: float | None = None
    in_force: str = "free"


class Run:
    def __init__(self, args: argparse.Namespace, backend: Any, uuid: str) -> None:
        self.args = args
        self.backend = backend
        self.uuid = uuid
        info = next(d for d in backend.devices() if d.uuid == uuid)
        self.info = info
        self.model: ClassPowerModel = model_for_device(
            info.power_limit_max_w, info.power_limit_min_w, info.model
        )
        self.phases: list[Phase] = []
        self.document: dict[str, Any] = {}

    def energy_power_w(self, telemetry: Telemetry, seconds: float) -> float | None:
        """Mean power over the next `seconds`: from the energy counter between two of the
        agent's samples (exact), else the mean of the power samples (NVML's lag)."""
        telemetry.wait(telemetry.count + 1)
        first, first_s = telemetry.latest, telemetry.latest_s
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            samples.append(telemetry.latest)
        last, last_s = telemetry.latest, telemetry.latest_s
        if first.HasField("energy_j") and last.HasField("energy_j") and last_s > first_s:
            return (last.energy_j - first.energy_j) / (last_s - first_s)
        powers = [s.power_w for s in samples if s.HasField("power_w")]
        return statistics.fmean(powers) if powers else None

    def predicted(self, actuation: Actuation, free: Phase, share: float) -> dict[str, float | None]:
        """The power model's prediction for the device under `actuation`, against `free`."""
        model = self.model
        base = free.measured
        out: dict[str, float | None] = {
            "decode_step_x": model.phase_slowdown(False, actuation),
            "prefill_step_x": model.phase_slowdown(True, actuation),
            "tpot_x": model.slowdown(share, actuation),
        }
        if free.draw_w is not None:
            out["draw_w"] = model.predict_draw_w(free.draw_w, share, FREE, actuation)
        pairs = (
            ("decode_step_ms", "decode_step_x"),
            ("prefill_step_ms", "prefill_step_x"),
            ("tpot_p50_ms", "tpot_x"),
        )
        for key, base_key in pairs:
            value = base.get(key)
            factor = out[base_key]
            out[key] = round(value * factor, 3) if value is not None and factor else None
        return out

    def write(self) -> None:
        self.document["phases"] = [asdict(p) | {"wanted": _describe(p.wanted)} for p in self.phases]
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "power_gpu_run.json").write_text(
            json.dumps(self.document, indent=1, default=str) + "\n"
        )


def _describe(actuation: Actuation | None) -> str:
    return "controller" if actuation is None else actuation.describe()


def run_phases(run: Run, load: ClosedLoopLoad, control: Control, telemetry: Telemetry) -> None:
    args = run.args
    info = run.info
    phase_s = args.phase_s

    def measure(phase: Phase, seconds: float, tick: Callable[[], None] | None = None) -> None:
        start = time.perf_counter()
        settle_end = start + min(SETTLE_S, seconds / 3)
        while time.perf_counter() < settle_end:
            load.check()
            if tick:
                tick()
            else:
                time.sleep(0.05)
        window_start = time.perf_counter()
        draws: list[float] = []
        while time.perf_counter() < start + seconds:
            load.check()
            if tick:
                tick()
            else:
                power = run.energy_power_w(
                    telemetry, min(1.0, start + seconds - time.perf_counter())
                )
                if power is not None:
                    draws.append(power)
        phase.measured = load.window(window_start, time.perf_counter())
        if tick is None:
            phase.draw_w = round(statistics.fmean(draws), 1) if draws else None
        else:
            recent = [d["draw_w"] for d in phase.decisions if d["t_s"] >= window_start - start]
            phase.draw_w = round(statistics.fmean(recent), 1) if recent else None
        phase.in_force = control.in_force.describe()
        run.phases.append(phase)
        run.write()
        m = phase.measured
        say(
            f"  {phase.name:<28} in force {phase.in_force:<22} draw {phase.draw_w} W, "
            f"{m['tokens_per_s']:.0f} tok/s, decode step {m['decode_step_ms']} ms, prefill step "
            f"{m['prefill_step_ms']} ms, TPOT p50 {m['tpot_p50_ms']} ms, TTFT p50 "
            f"{m['ttft_p50_ms']} ms ({m['requests_done']} requests)"
        )

    # 1. fixed actuations through the agent
    say("phase 1: fixed actuations through the agent's Control")
    fixed: list[tuple[str, Actuation]] = [("free", FREE)]
    for limit in args.limits:
        if limit < (info.power_limit_max_w or math.inf) - 0.5:
            low = info.power_limit_min_w or 0.0
            fixed.append((f"limit {limit:g} W", Actuation(power_limit_w=max(limit, low))))
    if args.lock_mhz:
        fixed.append(
            (f"SM clock <= {args.lock_mhz} MHz", Actuation(sm_clock_max_mhz=args.lock_mhz))
        )
    free: Phase | None = None
    for name, wanted in fixed:
        phase = Phase(name, wanted)
        phase.applied = control.apply(wanted)
        measure(phase, phase_s)
        if free is None:
            free = phase
    control.apply(FREE)
    assert free is not None
    share = free.measured["compute_share"]

    # 2. the controller in the loop
    say("phase 2: the PowerBudget decision in the loop (policies.power.decide)")
    uncapped_w = free.draw_w or run.model.draw_w(1.0, share)
    steps: list[tuple[str, float]] = [("budget not binding", 2.0 * run.model.tdp_w)]
    for fraction in args.budget_fractions:
        target_w = fraction * uncapped_w
        steps.append((f"target {fraction:.2f} x draw ({target_w:.0f} W)", target_w / 0.9))
    steps.append(("budget lifted", 2.0 * run.model.tdp_w))
    for name, budget_w in steps:
        spec = PowerBudgetSpec(
            budget_w=budget_w,
            control_interval_seconds=args.interval_s,
            min_power_fraction=args.min_power_fraction,
            thresholds=CappingThresholds(emergency_above=args.emergency_above),
        )
        phase = Phase(name, None, budget_w=round(budget_w, 1))
        began = time.perf_counter()

        def tick(spec: PowerBudgetSpec = spec, phase: Phase = phase, began: float = began) -> None:
            now = time.perf_counter()
            due = began + args.interval_s * len(phase.decisions)  # one round per interval
            if now < due:
                time.sleep(min(0.05, due - now))
                return
            power = run.energy_power_w(telemetry, args.interval_s * 0.8)
            sample = telemetry.latest
            observed = reported_actuation(
                sample.power_limit_w if sample.HasField("power_limit_w") else None,
                info.power_limit_max_w,
                sample.locked_sm_clock_max_mhz
                if sample.HasField("locked_sm_clock_max_mhz")
                else None,
            )
            view = DeviceView(
                uuid=run.uuid,
                node=NODE,
                power_w=power,
                fresh=power is not None,
                role="colocated",
                priority="low",
                in_force=observed if not control.refused else control.in_force,
                tdp_w=info.power_limit_max_w,
                power_limit_min_w=info.power_limit_min_w,
                compute_share=share,
            )
            decision = decide(spec, [view])
            wanted = decision.actuations.get(run.uuid, FREE)
            applied = control.apply(wanted)
            phase.applied = phase.applied and applied
            phase.decisions.append({
                "t_s": round(time.perf_counter() - began, 2),
                "draw_w": round(power, 1) if power is not None else None,
                "mode": decision.mode.value,
                "wanted": wanted.describe(),
                "applied": applied,
                "predicted_w": round(decision.predicted_draw_w, 1),
                "reason": decision.reason,
            })  # fmt: skip

        measure(phase, args.controller_s, tick)
        say(f"    decisions: {[(d['mode'], d['wanted']) for d in phase.decisions]}")
    run.document["compute_share_free"] = share
    run.document["uncapped_draw_w"] = uncapped_w


def report(run: Run) -> None:
    free = run.phases[0]
    share = free.measured["compute_share"]
    rows = []
    say("")
    header = (
        f"{'phase':<32} {'in force':<22} {'applied':>7} {'draw W':>7} {'pred W':>7} "
        f"{'dec ms':>7} {'pred':>7} {'pre ms':>7} {'pred':>7} {'TPOT50':>7} {'pred':>7} "
        f"{'TTFT50':>7} {'tok/s':>6}"
    )
    say(header)
    for phase in run.phases:
        actuation = _parse(phase.in_force)
        predicted = run.predicted(actuation, free, share)
        m = phase.measured
        row = {
            "phase": phase.name,
            "in_force": phase.in_force,
            "applied": phase.applied,
            "draw_w": phase.draw_w,
            "measured": m,
            "predicted": predicted,
        }
        rows.append(row)
        say(
            f"{phase.name:<32} {phase.in_force:<22} {phase.applied!s:>7} {_f(phase.draw_w):>7} "
            f"{_f(predicted.get('draw_w')):>7} {_f(m['decode_step_ms']):>7} "
            f"{_f(predicted['decode_step_ms']):>7} {_f(m['prefill_step_ms']):>7} "
            f"{_f(predicted['prefill_step_ms']):>7} {_f(m['tpot_p50_ms']):>7} "
            f"{_f(predicted['tpot_p50_ms']):>7} {_f(m['ttft_p50_ms']):>7} "
            f"{m['tokens_per_s']:6.0f}"
        )
    say(
        "pred: the power model (policies/power_model.py, the H100 measurement carried to this "
        f"device's limits) applied to the uncapped phase; compute-bound share {share:.2f}"
    )
    run.document["table"] = rows


def _parse(described: str) -> Actuation:
    """An Actuation back from Actuation.describe() (what the phase had in force)."""
    limit: float | None = None
    lock: int | None = None
    for part in described.split(", "):
        if part.startswith("limit "):
            limit = float(part.removeprefix("limit ").removesuffix(" W"))
        elif part.startswith("SM clock <= "):
            lock = int(part.removeprefix("SM clock <= ").removesuffix(" MHz"))
    return Actuation(limit, lock)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/power_gpu")
    parser.add_argument("--smoke", action="store_true", help="CPU: simulated device, tiny model")
    parser.add_argument("--device-index", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=None, help="live requests (64)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="(1024)")
    parser.add_argument("--output-tokens", type=int, default=None, help="(256)")
    parser.add_argument("--batched-tokens", type=int, default=2048, help="tokens per step")
    parser.add_argument("--limits", type=float, nargs="*", default=[500.0, 350.0])
    parser.add_argument("--lock-mhz", type=int, default=990, help="0: no clock-lock phase")
    parser.add_argument("--budget-fractions", type=float, nargs="*", default=[0.8, 0.6])
    parser.add_argument("--min-power-fraction", type=float, default=0.5)
    parser.add_argument(
        "--emergency-above",
        type=float,
        default=1.5,
        help="emergencyAbove: above 1.125 a budget step of 0.8 x draw is graded capping, not "
        "every device to its floor at once",
    )
    parser.add_argument("--interval-s", type=float, default=1.0, help="controlIntervalSeconds")
    parser.add_argument(
        "--observe-only",
        action="store_true",
        help="send no control and reset nothing: telemetry, load and the controller's decisions "
        "only (for a GPU whose power limit and clocks must be left as found)",
    )
    parser.add_argument("--phase-s", type=float, default=None, help="per fixed phase (12)")
    parser.add_argument("--controller-s", type=float, default=None, help="per budget (15)")
    parser.add_argument("--warmup-s", type=float, default=None, help="(10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = (
        {"concurrency": 4, "prompt_tokens": 48, "output_tokens": 24, "phase_s": 2.5,
         "controller_s": 3.0, "warmup_s": 1.0}
        if args.smoke
        else {"concurrency": 64, "prompt_tokens": 1024, "output_tokens": 256, "phase_s": 14.0,
              "controller_s": 16.0, "warmup_s": 10.0}
    )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("concurrency", "prompt_tokens", "output_tokens", "batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not all(0 < f < 1 for f in args.budget_fractions):
        parser.error("--budget-fractions must each be in (0, 1)")
    if not 0 < args.min_power_fraction <= 1:
        parser.error("--min-power-fraction must be in (0, 1]")
    if any(not math.isfinite(w) or w <= 0 for w in args.limits):
        parser.error("--limits must be watts > 0 (below the device's minimum: its minimum)")
    for name in ("interval_s", "phase_s", "controller_s"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds > 0")
    if not math.isfinite(args.warmup_s) or args.warmup_s < 0:
        parser.error("--warmup-s must be a finite number of seconds >= 0")
    if args.lock_mhz < 0:
        parser.error("--lock-mhz must be >= 0 (0: no clock-lock phase)")
    started = time.perf_counter()

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(f"signal {signum}: restoring the device's defaults")

    signal.signal(signal.SIGTERM, on_sigterm)

    if args.smoke:
        from tessera.agents.sim_backend import SimBackend

        backend: Any = SimBackend(device_count=1, node_name=NODE, workloads=[("decode", 1.0)])
    else:
        from tessera.agents.nvml_backend import NvmlBackend

        backend = NvmlBackend()
    info = backend.devices()[args.device_index]
    uuid = info.uuid
    run = Run(args, backend, uuid)
    run.document = {
        "what": __doc__.splitlines()[0],
        "command": " ".join(sys.argv),
        "smoke": args.smoke,
        "device": {k: str(getattr(info, k)) for k in info.__dataclass_fields__},
        "load": {
            k: getattr(args, k)
            for k in ("concurrency", "prompt_tokens", "output_tokens", "batched_tokens")
        },
        "power_model": {
            "name": run.model.name,
            "tdp_w": run.model.tdp_w,
            "power_limit_min_w": run.model.power_limit_min_w,
        },
    }
    say(
        f"device {info.index}: {info.model} {uuid}; limits [{info.power_limit_min_w}, "
        f"{info.power_limit_max_w}] W, default {info.power_limit_default_w} W; SM clocks "
        f"[{info.sm_clock_min_mhz}, {info.sm_clock_max_mhz}] MHz"
    )
    agent = client = channel = telemetry = load = None
    folder = Path(tempfile.mkdtemp(prefix="power-gpu-run-"))
    try:
        agent, client, channel, how = start_agent(backend, folder)
        say(f"control: {how}")
        run.document["control_path"] = how
        control = Control(client, backend, uuid, info.sm_clock_min_mhz or 0, args.observe_only)
        if agent is None:  # still the decision path and the device, without the gRPC hop
            telemetry = BackendTelemetry(backend, uuid, 250)
        else:
            telemetry = Telemetry(channel, uuid, 250)
        telemetry.wait(1)
        say(f"building the engine ({time.perf_counter() - started:.0f} s)")
        engine = build_engine(args)
        load = ClosedLoopLoad(
            engine, args.concurrency, args.prompt_tokens, args.output_tokens, args.seed
        )
        load.start()
        say(f"warming up under load {args.warmup_s:g} s ({time.perf_counter() - started:.0f} s)")
        time.sleep(args.warmup_s)
        load.check()
        run_phases(run, load, control, telemetry)
        report(run)
        run.document["control_calls"] = control.calls
        run.document["refused"] = control.refused
        if control.refused:
            say(f"NOTE: controls refused by the device: {control.refused}")
    finally:
        if load is not None:
            load.stop()
        restore: dict[str, Any] = {}
        resets = (
            ()
            if args.observe_only
            else (
                ("agent reset_clocks", lambda: client.reset_clocks(uuid) if client else None),
                (
                    "agent reset_power_limit",
                    lambda: client.reset_power_limit(uuid) if client else None,
                ),
                ("backend reset_sm_clocks", lambda: backend.reset_sm_clocks(uuid)),
                ("backend reset_power_limit", lambda: backend.reset_power_limit(uuid)),
            )
        )
        for what, call in resets[:2]:
            try:
                call()
            except Exception as error:  # report and go on restoring
                restore[what] = repr(error)
                say(f"{what} failed: {error!r}")
        if telemetry is not None:
            telemetry.close()
        if agent is not None:
            agent.stop(grace_s=0)  # resets whatever it set
        for what, call in resets[2:]:
            try:
                call()
            except Exception as error:
                restore[what] = repr(error)
                say(f"{what} failed: {error!r}")
        final = backend.read(uuid)
        restore["final_power_limit_w"] = final.power_limit_w
        restore["final_locked_sm_clock_max_mhz"] = final.locked_sm_clock_max_mhz
        say(
            f"restored: power limit {final.power_limit_w} W (default "
            f"{info.power_limit_default_w} W), SM clock lock {final.locked_sm_clock_max_mhz}"
        )
        run.document["restore"] = restore
        run.document["wall_s"] = round(time.perf_counter() - started, 1)
        run.write()
        backend.close()
    say(f"wrote {args.out / 'power_gpu_run.json'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
