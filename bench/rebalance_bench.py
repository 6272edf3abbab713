"""Rebalancing quality vs solve time: the fast policy against the HiGHS MIP (issue 17).

Usage: python bench/rebalance_bench.py [--exact-nodes 1000] [--seeds 1 2 3] [--budget 16]
           [--mip-time-limit 60] [--mip-threads 1] [--mip-start none|fast]
           [--large-nodes 10000] [--out DIR] [--smoke]
On seeded fragmented clusters (sim/fragmented_clusters.py) it runs the fast policy and, on the
`--exact-nodes` sizes, the time-limited MIP; then the fast policy alone on `--large-nodes`.
Prints a table and writes DIR/rebalance_bench.json (default bench/results/rebalance/), rewritten
after every instance. `--smoke`: one 200-node instance, a 10 s MIP, 2,000 nodes for the large
run (proves the script end to end in well under a minute).

Score = 1 - fragmentation (higher is better). The MIP rarely proves optimality at 1,000 nodes
within its limit, so each row has both of its numbers: the incumbent (its best plan) and the
dual bound (no plan scores more). `vs bound` = (bound - fast) / bound: an upper bound on the
fast plan's distance from the optimum, which is what issue 17's "within 2% of the optimum"
needs; `vs MIP` = (incumbent - fast) / incumbent (negative: the fast plan is better). With
`--mip-start fast` HiGHS starts from the fast plan (its incumbent is then never worse; the
bound is unaffected in validity). Fast times are CPU seconds of this process (wall beside
it); the MIP's limit is wall time, so on a loaded machine it gets less CPU than it seems: the
JSON records the load average.
Target (issue 17): at 1,000 nodes, `vs bound` <= 2 % and fast CPU < 1 s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tessera.policies.fragmentation import FragmentationObjective, shapes_from_pods
from tessera.policies.rebalance_exact import solve_exact
from tessera.policies.rebalance_fast import FastOptions, solve_fast
from tessera.policies.rebalance_model import RebalanceProblem, RebalanceRules, plan_violations
from tessera.sim.fragmented_clusters import generate_cluster

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench/results/rebalance"
TARGET_GAP_PCT = 2.0
TARGET_FAST_S = 1.0
"""Issue 17's acceptance at 1,000 nodes: within 2 % of the optimum in under a second."""


def run_instance(
    nodes: int,
    seed: int,
    budget: int,
    mip: dict[str, Any] | None,
    options: FastOptions,
) -> dict[str, Any]:
    """One instance: the fast policy, and the MIP where `mip` gives its settings."""
    snapshot = generate_cluster(nodes, seed)
    problem = RebalanceProblem.build(snapshot, RebalanceRules(move_budget=budget))
    objective = FragmentationObjective(problem, shapes_from_pods(problem, max_shapes=12))
    base = objective.score(problem.free)
    row: dict[str, Any] = {
        "nodes": nodes,
        "seed": seed,
        "pods": len(snapshot.pods),
        "movable_pods": int(problem.movable.sum()),
        "signatures": len(problem.signature_requests),
        "shapes": len(objective.shapes),
        "budget": budget,
        "fragmentation_before": 1 - base,
    }
    wall, cpu = time.perf_counter(), time.process_time()
    fast = solve_fast(problem, objective, options)
    row["fast_cpu_s"] = time.process_time() - cpu
    row["fast_wall_s"] = time.perf_counter() - wall
    assert not plan_violations(problem, fast.moves), "fast plan breaks a rule"
    fast_score = objective.score(problem.free_after(fast.moves))
    row |= {"fast_moves": len(fast.moves), "fast_fragmentation": 1 - fast_score}
    if mip is not None:
        wall = time.perf_counter()
        result = solve_exact(
            problem,
            objective,
            mip["time_limit_s"],
            threads=mip["threads"],
            start=fast.moves if mip["start"] == "fast" else (),
        )
        row["mip_wall_s"] = time.perf_counter() - wall
        assert not plan_violations(problem, result.moves), "MIP plan breaks a rule"
        mip_score = objective.score(problem.free_after(result.moves))
        bound = result.score_bound if result.score_bound is not None else mip_score
        row |= {
            "mip_status": result.status,
            "mip_moves": len(result.moves),
            "mip_fragmentation": 1 - mip_score,
            "mip_bound_fragmentation": 1 - bound,
            "fast_vs_mip_pct": 100 * (mip_score - fast_score) / mip_score,
            "fast_vs_bound_pct": 100 * (bound - fast_score) / bound,
            "gain_captured_pct": (
                100 * (fast_score - base) / (mip_score - base) if mip_score > base else None
            ),
        }
        row["meets_target"] = (
            row["fast_vs_bound_pct"] <= TARGET_GAP_PCT and row["fast_cpu_s"] < TARGET_FAST_S
        )
    return row


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Rebalance: fast policy vs HiGHS MIP (score = 1 - fragmentation)")
    for name in (
        "nodes", "seed", "pods", "budget", "frag before", "fast frag", "fast moves",
        "fast cpu s", "fast wall s", "MIP frag", "bound frag", "MIP moves", "MIP s",
        "MIP status", "vs MIP %", "vs bound %", "gain %",
    ):  # fmt: skip
        table.add_column(name, justify="right")

    def fmt(row: dict[str, Any], key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else "-"

    for r in rows:
        table.add_row(
            str(r["nodes"]), str(r["seed"]), str(r["pods"]), str(r["budget"]),
            fmt(r, "fragmentation_before", ".4f"), fmt(r, "fast_fragmentation", ".4f"),
            str(r["fast_moves"]), fmt(r, "fast_cpu_s", ".3f"), fmt(r, "fast_wall_s", ".3f"),
            fmt(r, "mip_fragmentation", ".4f"), fmt(r, "mip_bound_fragmentation", ".4f"),
            str(r.get("mip_moves", "-")),
            fmt(r, "mip_wall_s", ".1f"), str(r.get("mip_status", "-")),
            fmt(r, "fast_vs_mip_pct", "+.2f"), fmt(r, "fast_vs_bound_pct", ".2f"),
            fmt(r, "gain_captured_pct", ".0f"),
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fast rebalancing policy vs the HiGHS MIP (incumbent and dual bound)."
    )
    parser.add_argument("--exact-nodes", type=int, nargs="*", default=[1000])
    parser.add_argument("--large-nodes", type=int, nargs="*", default=[10000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--mip-time-limit", type=float, default=60.0, help="seconds per MIP")
    parser.add_argument("--mip-threads", type=int, default=1)
    parser.add_argument("--mip-start", choices=("none", "fast"), default="none")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory for the JSON")
    parser.add_argument("--smoke", action="store_true", help="one small instance, short MIP")
    args = parser.parse_args()
    for name in ("budget", "mip_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.mip_time_limit <= 0:
        parser.error(f"--mip-time-limit {args.mip_time_limit}: must be > 0 seconds")
    if args.smoke:
        args.exact_nodes, args.large_nodes, args.seeds = [200], [2000], args.seeds[:1]
        args.mip_time_limit = min(args.mip_time_limit, 10.0)
    options = FastOptions()
    mip = {
        "time_limit_s": args.mip_time_limit,
        "threads": args.mip_threads,
        "start": args.mip_start,
    }
    out = args.out / "rebalance_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "config": vars(args) | {"out": str(out), "fast_options": options.__dict__},
        "highspy": _version("highspy"),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "rows": [],
    }
    runs = [(n, seed, mip) for n in args.exact_nodes for seed in args.seeds]
    runs += [(n, seed, None) for n in args.large_nodes for seed in args.seeds[:1]]
    for nodes, seed, settings in runs:
        print(f"{nodes} nodes, seed {seed}{', MIP' if settings else ''} ...", flush=True)
        result["rows"].append(run_instance(nodes, seed, args.budget, settings, options))
        result["load_average_at_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=2) + "\n")
    Console(width=220).print(_table(result["rows"]))
    checked = [r for r in result["rows"] if r["nodes"] == 1000 and "meets_target" in r]
    if checked:
        met = sum(r["meets_target"] for r in checked)
        print(
            f"issue 17 target at 1,000 nodes (vs bound <= {TARGET_GAP_PCT} %, fast < "
            f"{TARGET_FAST_S} s): {met}/{len(checked)} instances"
        )
    print(f"wrote {out}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
