"""How fast `tessera simulate` is: wall time and requests simulated per second at scale.

Scenarios (all on the Azure 2023 conversation trace, Llama-3-70B-shaped chat model, TP4
replicas, least-tokens dispatch):

- `100 GPUs, 1 h`: the whole hour (19,366 requests at its own rate) on a 100-GPU fleet of
  6 H100 nodes, 6 A100 nodes and one 4-GPU L40S node (25 replicas), colocated with chunked
  prefill (Sarathi); then the same fleet disaggregated (H100 prefill, A100 + L40S decode).
  Target: under 60 s on a 2-core machine.
- `100 GPUs, 15/30/60 min`: the same run on growing windows, to show that the cost grows about
  linearly with the number of requests.
- `10,000 GPUs`: the fleet times 100 (2,500 replicas), the trace superposed 100 times (shifted
  copies, ~540 req/s, the same load per replica), on a window of the hour.

Prints a table and writes JSON (default bench/results/sim_scale.json).

    python bench/sim_scale.py                       # all scenarios
    python bench/sim_scale.py --skip-10k            # only the 100-GPU ones
    python bench/sim_scale.py --window-10k 3600     # the 10,000-GPU run on the whole hour
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.loader import load_kind
from tessera.api.model_deployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    Plan,
    PoolPlan,
    PoolRole,
    ServingMode,
)
from tessera.policies.perfmodel import PREFILL_CHUNK_TOKENS
from tessera.sim.cluster import Cluster
from tessera.sim.metrics import RunResult
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.workload import Workload, load_trace

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
FLEET_NODES = {"h100": 6, "a100": 6, "l40s": 1}
TENSOR_PARALLEL = 4


def llama3_70b_chat() -> ModelDeploymentSpec:
    """The example chat deployment with a Llama-3-70B-shaped model."""
    (example,) = load_kind([ROOT / "examples" / "llama3-8b-chat.yaml"], ModelDeployment)
    spec = example.spec
    architecture = spec.model.architecture.model_copy(
        update={
            "num_layers": 80,
            "hidden_size": 8192,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "intermediate_size": 28672,
        }
    )
    model = spec.model.model_copy(
        update={"name": "meta-llama/Llama-3.1-70B-Instruct", "architecture": architecture}
    )
    return spec.model_copy(update={"model": model})


def fleet(multiplier: int) -> Cluster:
    classes = {
        c.metadata.name: c.spec
        for c in load_kind([ROOT / "examples" / "accelerator-classes.yaml"], AcceleratorClass)
    }
    nodes = {name: count * multiplier for name, count in FLEET_NODES.items()}
    return Cluster(f"fleet-x{multiplier}", classes, nodes)


def fleet_plan(cluster: Cluster, layout: str) -> Plan:
    """Every device of the fleet in TP4 replicas: colocated, or H100 prefill / rest decode."""
    pools = []
    for name in FLEET_NODES:
        if layout == "colocated":
            role = PoolRole.COLOCATED
        else:
            role = PoolRole.PREFILL if name == "h100" else PoolRole.DECODE
        pools.append(
            PoolPlan(
                name=f"{role.value}-{name}",
                role=role,
                accelerator_class=name,
                tensor_parallel=TENSOR_PARALLEL,
                replicas=cluster.accelerators(name) // TENSOR_PARALLEL,
                prefill_chunk_tokens=PREFILL_CHUNK_TOKENS if role is PoolRole.COLOCATED else None,
            )
        )
    mode = ServingMode.COLOCATED if layout == "colocated" else ServingMode.DISAGGREGATED
    return Plan(mode=mode, pools=pools, cost_per_hour=0, power_w=0, rationale=f"bench {layout}")


def run(
    name: str, cluster: Cluster, layout: str, workload: Workload, spec: ModelDeploymentSpec
) -> dict[str, Any]:
    plan = fleet_plan(cluster, layout)
    setup = DeploymentSetup("chat", spec, plan)  # each pool runs the scheduler it records
    started = time.perf_counter()
    simulation = Simulation(cluster, [setup], [workload], SimConfig(seed=0), layout)
    result: RunResult = simulation.run()
    wall = time.perf_counter() - started
    summary = result.summary()
    return {
        "scenario": name,
        "layout": layout,
        "gpus": cluster.total_accelerators,
        "replicas": sum(p.replicas for p in result.pools),
        "requests": len(workload),
        "rate_per_s": round(workload.rate_per_s, 2),
        "simulated_s": round(result.makespan_s, 1),
        "wall_s": round(wall, 2),
        "requests_per_wall_s": round(len(workload) / wall, 1),
        "simulated_s_per_wall_s": round(result.makespan_s / wall, 1),
        "iterations": result.iterations,
        "events": result.events,
        "attainment": summary["attainment"],
        "ttft_ms_p90": summary["ttft_ms_p90"],
        "tpot_ms_p90": summary["tpot_ms_p90"],
        "preemptions": summary["preemptions"],
        "mean_power_kw": round(summary["mean_power_w"] / 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=TRACE, help="Azure conversation trace CSV")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sim_scale.json")
    parser.add_argument("--skip-10k", action="store_true", help="skip the 10,000-GPU run")
    parser.add_argument(
        "--window-10k", type=float, default=600.0, help="seconds of the hour for the 10k run"
    )
    args = parser.parse_args()
    console = Console(width=110)
    load_before = os.getloadavg()
    spec = llama3_70b_chat()
    trace = load_trace(args.trace, "azure-conv")
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        console.print(
            f"{row['scenario']} ({row['layout']}): {row['requests']} requests in "
            f"{row['wall_s']} s = {row['requests_per_wall_s']} req/s simulated"
        )

    hundred = fleet(1)
    record(run("100 GPUs, 1 h", hundred, "colocated", trace, spec))
    record(run("100 GPUs, 1 h", hundred, "disaggregated", trace, spec))
    for minutes in (15, 30):
        part = trace.window(0, minutes * 60)
        record(run(f"100 GPUs, {minutes} min", hundred, "colocated", part, spec))
    if not args.skip_10k:
        big = fleet(100)
        part = trace.window(0, args.window_10k)
        superposed = part.scaled(100, "superpose", np.random.default_rng(0))
        label = f"10,000 GPUs, {args.window_10k / 60:g} min x100"
        record(run(label, big, "colocated", superposed, spec))

    table = Table(title="tessera simulate at scale (Llama-3-70B chat, Azure conv trace)")
    for header in ("run", "GPUs", "requests", "sim s", "wall s", "req/s simulated", "SLO met"):
        table.add_column(header, justify="left" if header == "run" else "right")
    for row in rows:
        table.add_row(
            f"{row['scenario']}, {row['layout']}",
            f"{row['gpus']:,}",
            f"{row['requests']:,}",
            f"{row['simulated_s']:,.0f}",
            f"{row['wall_s']:.2f}",
            f"{row['requests_per_wall_s']:,.0f}",
            f"{row['attainment']:.1%}",
        )
    console.print(table)
    document = {
        "what": "bench/sim_scale.py: wall time of tessera simulate at scale",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            # Wall times are only comparable between runs on an equally idle machine.
            "load_average_1m_before_after": [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ],
        },
        "trace": str(args.trace),
        "model": spec.model.name,
        "tensor_parallel": TENSOR_PARALLEL,
        "fleet_nodes_per_100_gpus": FLEET_NODES,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
