"""Planning time at fleet scale: one deployment over 5 accelerator classes x N nodes.

Usage: python bench/plan_scale.py [--nodes 1000] [--repeats 5]
Prints a table and writes bench/results/plan_scale.json. Target (issue 4): < 2 s at 1,000 nodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.loader import load_kind
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import enumerate_candidates, plan_deployment
from tessera.sim.evaluate import SimulatedEvaluator

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="Also simulate the cheapest candidates (sim.evaluate), as `tessera simulate` does.",
    )
    args = parser.parse_args()
    classes = load_kind([ROOT / "examples/accelerator-classes.yaml"], AcceleratorClass)
    deployments = load_kind(
        [
            ROOT / "examples/llama3-8b-chat.yaml",
            ROOT / "examples/experiments/distserve-13b-a100.yaml",
        ],
        ModelDeployment,
    )
    rows = []
    for deployment in deployments:
        spec = deployment.spec.model_copy(
            update={
                "hardware": deployment.spec.hardware.model_copy(update={"accelerator_classes": []})
            }
        )
        for nodes in args.nodes:
            offers = [
                ClassOffer.from_resource(c, nodes * c.spec.accelerators_per_node) for c in classes
            ]
            evaluator = SimulatedEvaluator.for_offers(offers) if args.simulate else None
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                plan = plan_deployment(spec, offers, evaluator)
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "deployment": deployment.metadata.name,
                    "classes": len(classes),
                    "nodes_per_class": nodes,
                    "simulated_candidates": args.simulate,
                    "candidates": len(enumerate_candidates(spec, offers)),
                    "median_s": statistics.median(times),
                    "max_s": max(times),
                    "plan": (
                        f"{plan.mode.value}, {plan.accelerators} accelerators, "
                        f"{plan.cost_per_hour}/h"
                    ),
                }
            )
    table = Table(title="Planning time (5 classes; target < 2 s at 1,000 nodes)")
    for column in ("deployment", "nodes/class", "candidates", "median s", "max s", "plan"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["deployment"],
            str(row["nodes_per_class"]),
            str(row["candidates"]),
            f"{row['median_s']:.3f}",
            f"{row['max_s']:.3f}",
            row["plan"],
        )
    Console(width=160).print(table)
    name = "plan_scale_simulated.json" if args.simulate else "plan_scale.json"
    out = ROOT / "bench/results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
