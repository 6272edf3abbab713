"""Decode throughput per dollar by layout, from the performance model (no simulation): why the
planner does or does not offload attention for a long-context deployment.

For each context length and TPOT budget: plain decode replicas on each class and TP degree,
and attention-offloaded replicas (compute class x TP + N memory-class devices), at the largest
batch that fits the TPOT budget and the KV cache. Prints the table, saves
bench/results/decode_economics.json.

Run: python bench/decode_economics.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.loader import load_kind
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.perfmodel import ReplicaPerformance

ROOT = Path(__file__).resolve().parent.parent
CLASS_FILES = [
    ROOT / "examples/accelerator-classes.yaml",
    ROOT / "examples/experiments/h20-class.yaml",
]
DEPLOYMENT = ROOT / "examples/experiments/llama3-70b-long-context.yaml"
RESULTS = ROOT / "bench/results/decode_economics.json"
CONTEXTS = (8_000, 33_000)
TPOT_S = (0.05, 0.1)


def main() -> None:
    classes = {c.metadata.name: c.spec for c in load_kind(CLASS_FILES, AcceleratorClass)}
    (deployment,) = load_kind([DEPLOYMENT], ModelDeployment)
    arch = deployment.spec.model.architecture
    results = []
    for context in CONTEXTS:
        for tpot_s in TPOT_S:
            layouts: list[tuple[str, ReplicaPerformance | OffloadedDecodePerformance, float]] = []
            for name, spec in classes.items():
                if spec.kind == "CPU":
                    continue
                for tp in (1, 2, 4, 8):
                    layouts.append(
                        (
                            f"{name} TP{tp}",
                            ReplicaPerformance(arch, spec, tp),
                            spec.cost_per_hour * tp,
                        )
                    )
                    for devices in (2, 4, 8):
                        memory = classes["h20"]
                        cost = spec.cost_per_hour * tp + memory.cost_per_hour * devices
                        offloaded = OffloadedDecodePerformance(arch, spec, tp, memory, devices)
                        layouts.append(
                            (f"{name} TP{tp} + {devices} h20 attention", offloaded, cost)
                        )
            rows = []
            for label, perf, cost in layouts:
                if not perf.fits():
                    continue
                batch = perf.max_decode_batch_for_tpot(tpot_s, context)
                if batch == 0:
                    continue
                tokens_per_s = batch / perf.decode_step_time_s(batch, context)
                rows.append(
                    {
                        "layout": label,
                        "batch": batch,
                        "cost_per_hour": cost,
                        "tokens_per_s": round(tokens_per_s, 1),
                        "tokens_per_s_per_dollar_hour": round(tokens_per_s / cost, 1),
                    }
                )
            rows.sort(key=lambda row: -row["tokens_per_s_per_dollar_hour"])
            results.append({"context_tokens": context, "tpot_ms": tpot_s * 1e3, "layouts": rows})
            print(f"\ncontext {context} tokens, TPOT {tpot_s * 1e3:.0f} ms (best first)")
            print(f"  {'layout':<30} {'batch':>6} {'$/h':>6} {'tok/s':>8} {'tok/s per $/h':>14}")
            best_plain = next(r for r in rows if "attention" not in r["layout"])
            best_offload = next((r for r in rows if "attention" in r["layout"]), None)
            compute_only = next(
                r
                for r in rows
                if r["layout"].startswith("h100 TP") and "attention" not in r["layout"]
            )
            for row in [r for r in rows[:5]] + [compute_only]:
                print(
                    f"  {row['layout']:<30} {row['batch']:>6} {row['cost_per_hour']:>6.1f} "
                    f"{row['tokens_per_s']:>8.0f} {row['tokens_per_s_per_dollar_hour']:>14.1f}"
                )
            if best_offload is not None:
                per_dollar = "tokens_per_s_per_dollar_hour"
                versus_plain = best_offload[per_dollar] / best_plain[per_dollar]
                versus_compute = best_offload[per_dollar] / compute_only[per_dollar]
                print(
                    f"  best offload / best plain: {versus_plain:.2f}x; "
                    f"best offload / best H100-only: {versus_compute:.2f}x"
                )
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
