"""Live migration (Llumnix) and autoscaling in the simulator, on the Azure conversation trace.

The deployment is Llama-3-70B on H100s at tensor parallelism 2, colocated, chunked prefill: a
replica holds ~40k tokens of KV after its weights, so at high load memory binds (the regime
Llumnix targets; an 8B model on an 80 GB GPU never fills its cache on this trace). The layout
is the planner's own candidate (`policies.placement`), so that `policies.replan` re-sizes it.
Requests go to the replica of lowest virtual usage (`least-virtual-usage` dispatch); with
migration on, `policies.migration` runs every 0.25 s in the loop (sim/migration.py: pre-copy
while decoding, stall = stop-and-copy of the last tokens, from `--costs` JSON if given, else
the KV transfer model over the class's network link).

Three questions, each with migration off and on:

1. fixed: N replicas at high load: P99 TTFT and TPOT, SLO attainment, replica-hours;
2. sizing: the fewest replicas that meet the SLO (attainment >= target of requests within the
   TTFT and TPOT targets) at the same load;
3. autoscale: the trace's first `--autoscale-window-s` of the full hour (its rate varies) at the
   same load scale, replicas re-planned every 15 s by `policies.replan` from observed load
   (sim/autoscale.py); scale-down drains (by migration when on): replica-hours and P99s.

Prints a table; writes JSON under bench/results/migration/.

    .venv/bin/python bench/migration_experiment.py             # ~3-4 min on 2 cores
    .venv/bin/python bench/migration_experiment.py --quick     # shorter windows (smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.loader import load_kind
from tessera.api.model_deployment import (
    LengthDistribution,
    ModelArchitecture,
    ModelDeployment,
    ModelDeploymentSpec,
    Plan,
    ServingMode,
)
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.migration import MigrationSettings
from tessera.policies.placement import enumerate_candidates, to_plan
from tessera.sim.autoscale import AutoscaleSettings, SimulatedAutoscaler
from tessera.sim.cluster import Cluster
from tessera.sim.metrics import RunResult
from tessera.sim.migration import MigrationCosts, SimulatedMigrator
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.workload import Workload, load_trace, resolve_trace

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sim" / "data"
HOUR_TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
RESULTS = ROOT / "bench" / "results" / "migration"
CLASS = "h100"
TENSOR_PARALLEL = 2

LLAMA3_70B = ModelArchitecture(
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=28672,
    vocab_size=128256,
    max_context_tokens=8192,
)


@dataclass(frozen=True)
class Outcome:
    """One run, as the tables report it."""

    label: str
    migration: bool
    replicas: float
    rate_per_s: float
    summary: dict[str, Any]
    replica_hours: float
    migrations: dict[str, Any] | None
    autoscale: dict[str, Any] | None
    wall_s: float

    def row(self) -> dict[str, Any]:
        s = self.summary
        return {
            "label": self.label,
            "migration": self.migration,
            "replicas": self.replicas,
            "rate_per_s": round(self.rate_per_s, 3),
            "ttft_ms_p99": s["ttft_ms_p99"],
            "tpot_ms_p99": s["tpot_ms_p99"],
            "ttft_ms_p50": s["ttft_ms_p50"],
            "tpot_ms_p50": s["tpot_ms_p50"],
            "attainment": s["attainment"],
            "meets_slo": s["meets_targets"],
            "preemptions": s["preemptions"],
            "replica_hours": round(self.replica_hours, 4),
            "migrations": self.migrations,
            "autoscale": self.autoscale,
            "wall_s": round(self.wall_s, 1),
        }


def deployment_spec(trace: Workload) -> ModelDeploymentSpec:
    """The example chat deployment on Llama-3-70B, lengths set to the trace's."""
    [base] = load_kind([DATA / "example-llama3-8b-chat.yaml"], ModelDeployment)
    spec = base.spec
    model = spec.model.model_copy(update={"name": "llama3-70b", "architecture": LLAMA3_70B})
    traffic = spec.traffic.model_copy(
        update={
            "profile": None,
            "request_rate_per_second": trace.rate_per_s,
            "prompt_tokens": _lengths(trace.prompt_tokens),
            "output_tokens": _lengths(trace.output_tokens),
        }
    )
    hardware = spec.hardware.model_copy(update={"accelerator_classes": [CLASS]})
    return spec.model_copy(
        update={
            "model": model,
            "traffic": traffic,
            "hardware": hardware,
            "serving_mode": ServingMode.COLOCATED,
        }
    )


def _lengths(values: np.ndarray) -> LengthDistribution:
    return LengthDistribution(
        distribution="lognormal",
        mean=float(values.mean()),
        stddev=float(values.std()),
        max=int(values.max()),
    )


def cluster(replicas: int) -> Cluster:
    documents = load_kind([DATA / "example-sim-cluster.yaml"], AcceleratorClass)
    classes = {c.metadata.name: c.spec for c in documents}
    per_node = classes[CLASS].accelerators_per_node
    nodes = math.ceil(replicas * TENSOR_PARALLEL / per_node)
    return Cluster("migration-bench", {CLASS: classes[CLASS]}, {CLASS: nodes})


def base_plan(spec: ModelDeploymentSpec) -> Plan:
    """The planner's colocated, chunked-prefill TP2 candidate on the class."""
    offers = cluster(64).offers()
    for candidate in enumerate_candidates(spec, offers, chunked_prefill=True):
        [(sizing, _)] = candidate.pools
        if sizing.tensor_parallel == TENSOR_PARALLEL:
            return to_plan(candidate, spec)
    raise SystemExit(f"the planner has no TP{TENSOR_PARALLEL} colocated candidate on {CLASS}")


def with_replicas(plan: Plan, replicas: int) -> Plan:
    pools = [p.model_copy(update={"replicas": replicas}) for p in plan.pools]
    return plan.model_copy(update={"pools": pools})


@dataclass(frozen=True)
class Scenario:
    """One simulated deployment under one workload: the runs of the experiment differ only in
    its replicas, its workload and whether migration is on (`dataclasses.replace`)."""

    spec: ModelDeploymentSpec
    plan: Plan
    workload: Workload
    migration: bool
    costs: MigrationCosts
    seed: int

    def with_replicas(self, replicas: int) -> Scenario:
        return replace(self, plan=with_replicas(self.plan, replicas))


def simulate(
    scenario: Scenario,
    autoscale: AutoscaleSettings | None = None,
    initial: int | None = None,
) -> tuple[RunResult, SimulatedMigrator | None, SimulatedAutoscaler | None]:
    plan = scenario.plan
    replicas = plan.pools[0].replicas
    setup = DeploymentSetup(
        "chat", scenario.spec, plan, dispatch=DispatchPolicy.LEAST_VIRTUAL_USAGE
    )
    simulation = Simulation(
        cluster(replicas), [setup], [scenario.workload], SimConfig(seed=scenario.seed)
    )
    migrator = (
        SimulatedMigrator(simulation, MigrationSettings(), scenario.costs, interval_s=0.25)
        if scenario.migration
        else None
    )
    scaler = None
    if autoscale is not None:
        scaler = SimulatedAutoscaler(
            simulation, {plan.pools[0].name: initial or replicas}, autoscale
        )
    return simulation.run(), migrator, scaler


def fixed_run(label: str, scenario: Scenario) -> Outcome:
    started = time.perf_counter()
    result, migrator, _ = simulate(scenario)
    replicas = scenario.plan.pools[0].replicas
    return Outcome(
        label,
        scenario.migration,
        replicas,
        scenario.workload.rate_per_s,
        result.summary(),
        replicas * result.makespan_s / 3600.0,
        migrator.stats.summary() if migrator else None,
        None,
        time.perf_counter() - started,
    )


def fewest_replicas(scenario: Scenario, low: int, high: int) -> tuple[int | None, list[Outcome]]:
    """Smallest N in [low, high] meeting the SLO (attainment falls as N shrinks: bisect)."""
    tried: dict[int, Outcome] = {}

    def passes(n: int) -> bool:
        if n not in tried:
            run = fixed_run("sizing", scenario.with_replicas(n))
            tried[n] = run
            print(
                f"    N={n} migration={'on' if scenario.migration else 'off'}: attainment "
                f"{run.summary['attainment']}, {run.wall_s:.1f} s",
                flush=True,
            )
        return bool(tried[n].summary["meets_targets"])

    if not passes(high):
        return None, [tried[n] for n in sorted(tried)]
    while low < high:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return high, [tried[n] for n in sorted(tried)]


def autoscale_run(scenario: Scenario, max_replicas: int, initial: int) -> Outcome:
    started = time.perf_counter()
    result, migrator, scaler = simulate(
        scenario.with_replicas(max_replicas), AutoscaleSettings(), initial
    )
    assert scaler is not None
    end = result.makespan_s
    summary = scaler.summary(end)
    return Outcome(
        "autoscale",
        scenario.migration,
        round(summary["replica_hours"] * 3600.0 / end, 2) if end else 0.0,
        scenario.workload.rate_per_s,
        result.summary(),
        summary["replica_hours"],
        migrator.stats.summary() if migrator else None,
        summary,
        time.perf_counter() - started,
    )


def table(title: str, outcomes: list[Outcome]) -> Table:
    out = Table(title=title)
    for column in (
        "run",
        "migration",
        "replicas",
        "req/s",
        "TTFT p99 ms",
        "TPOT p99 ms",
        "attainment",
        "SLO",
        "preempt",
        "migrations",
        "replica-h",
        "wall s",
    ):
        out.add_column(column, justify="right")
    for o in outcomes:
        r = o.row()
        moved = (o.migrations or {}).get("committed", 0) if o.migration else "-"
        out.add_row(
            o.label,
            "on" if o.migration else "off",
            f"{o.replicas:g}",
            f"{o.rate_per_s:.2f}",
            f"{r['ttft_ms_p99']:.0f}",
            f"{r['tpot_ms_p99']:.1f}",
            f"{r['attainment']:.3f}",
            "yes" if r["meets_slo"] else "no",
            str(r["preemptions"]),
            str(moved),
            f"{r['replica_hours']:.3f}",
            f"{o.wall_s:.1f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=6, help="replicas of the fixed runs")
    parser.add_argument(
        "--per-replica-rate",
        type=float,
        default=1.7,
        help="requests/s per replica (the load): 1.7 is past the planner's 1.12 per replica, "
        "where KV memory binds and requests are preempted",
    )
    parser.add_argument("--window-s", type=float, default=300.0, help="trace window, fixed runs")
    parser.add_argument("--autoscale-window-s", type=float, default=900.0)
    parser.add_argument(
        "--costs",
        type=Path,
        default=None,
        help="measured migration costs (JSON: see sim/migration.MigrationCosts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short windows, few sizing probes")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fixed", "sizing", "autoscale"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.window_s, args.autoscale_window_s = 90.0, 240.0
    costs = MigrationCosts.from_json(args.costs) if args.costs else MigrationCosts()
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)

    trace = resolve_trace("azure-conv").window(0.0, args.window_s)
    rate = args.per_replica_rate * args.replicas
    rng = np.random.default_rng([args.seed, 15])
    workload = trace.scaled(rate / trace.rate_per_s, "superpose", rng)
    spec = deployment_spec(workload)
    plan = with_replicas(base_plan(spec), args.replicas)
    pool = plan.pools[0]
    print(
        f"deployment: Llama-3-70B, {pool.name} TP{pool.tensor_parallel}, chunk "
        f"{pool.prefill_chunk_tokens}, max {pool.max_running_requests} running; SLO TTFT "
        f"{spec.slo.ttft_ms:g} ms, TPOT {spec.slo.tpot_ms:g} ms for "
        f"{spec.slo.attainment_target:.0%}; migration costs: {costs.source}",
        flush=True,
    )
    document: dict[str, Any] = {
        "trace": "azure-conv",
        "model": "llama3-70b",
        "layout": pool.to_wire(),
        "slo": spec.slo.to_wire(),
        "costs": costs.source,
        "seed": args.seed,
    }
    out_file = args.out / (
        "migration_experiment_quick.json" if args.quick else "migration_experiment.json"
    )

    def save() -> None:
        out_file.write_text(json.dumps(document, indent=1) + "\n")

    base = Scenario(spec, plan, workload, False, costs, args.seed)
    if "fixed" not in args.skip:
        print(f"fixed: {args.replicas} replicas, {rate:.2f} req/s, {args.window_s:g} s", flush=True)
        fixed = [fixed_run("fixed", replace(base, migration=on)) for on in (False, True)]
        console.print(table(f"{args.replicas} replicas at {rate:.2f} req/s", fixed))
        off, on = fixed
        document["fixed"] = {
            "runs": [o.row() for o in fixed],
            "ttft_p99_ratio_off_over_on": _ratio(
                off.summary["ttft_ms_p99"], on.summary["ttft_ms_p99"]
            ),
            "tpot_p99_ratio_off_over_on": _ratio(
                off.summary["tpot_ms_p99"], on.summary["tpot_ms_p99"]
            ),
        }
        save()
    if "sizing" not in args.skip:
        print(f"sizing: fewest replicas meeting the SLO at {rate:.2f} req/s", flush=True)
        low, high = max(1, args.replicas // 2), args.replicas * 2
        sizing: dict[str, Any] = {}
        for migrating in (False, True):
            needed, runs = fewest_replicas(replace(base, migration=migrating), low, high)
            sizing["on" if migrating else "off"] = {
                "replicas": needed,
                "runs": [r.row() for r in runs],
            }
        document["sizing"] = sizing
        console.print(
            f"replicas for the SLO at {rate:.2f} req/s: without migration "
            f"{sizing['off']['replicas']}, with {sizing['on']['replicas']}"
        )
        save()
    if "autoscale" not in args.skip:
        hour = load_trace(HOUR_TRACE) if HOUR_TRACE.is_file() else resolve_trace("azure-conv")
        window = hour.window(0.0, min(args.autoscale_window_s, hour.duration_s))
        scale = rate / trace.rate_per_s
        scaled = window.scaled(scale, "superpose", np.random.default_rng([args.seed, 16]))
        top = args.replicas * 2
        print(
            f"autoscale: {window.duration_s:g} s of {hour.name} x{scale:.2f} "
            f"({scaled.rate_per_s:.2f} req/s mean), 1..{top} replicas",
            flush=True,
        )
        runs = [
            autoscale_run(replace(base, workload=scaled, migration=on), top, args.replicas)
            for on in (False, True)
        ]
        console.print(table("autoscaled from observed load (policies.replan)", runs))
        document["autoscale"] = {"runs": [o.row() for o in runs]}
        save()
    print(f"wrote {out_file}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    main()
