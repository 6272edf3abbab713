"""Issue 4's placement experiments, each a `tessera simulate` run (the command is printed):

1. DistServe: a 13B model on A100s, chat lengths, TTFT 250 ms / TPOT 100 ms: per-GPU goodput
   of disaggregated vs colocated plans (also with NVLink-speed KV transfers, DistServe's
   intra-node placement).
2. Splitwise: Llama-3-70B on the Azure conversation trace, on H100 + A100: Tessera's plan on
   the mixed fleet vs the same planner restricted to one class, in goodput per dollar.
3. Lamina: long-context Llama-3-70B on H100 + H20: attention offload vs not, goodput per
   dollar, and what the planner picks.

Prints a comparison table and saves bench/results/placement_experiments.json.
Run: python bench/placement_experiments.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "examples" / "experiments"
CLASSES = ROOT / "examples" / "accelerator-classes.yaml"
RESULTS = ROOT / "bench" / "results" / "placement_experiments.json"


def variant(source: Path, folder: Path, name: str, changes: dict[str, Any]) -> Path:
    """A copy of a deployment file with spec fields replaced (for one-class baselines)."""
    document = yaml.safe_load(source.read_text())
    document["spec"].update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def simulate(args: list[str], out: Path) -> dict[str, dict[str, Any]]:
    """Run `tessera simulate`, return per-policy summary + goodput efficiency."""
    command = [sys.executable, "-m", "tessera", "simulate", *args, "--sweep-steps", "8"]
    command += ["--out", str(out), "--no-plots"]
    print("$", shlex.join(["tessera", *command[3:]]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    document = json.loads((out / "results.json").read_text())
    runs: dict[str, dict[str, Any]] = {}
    for run in document["runs"]:
        summary = run["summary"]
        sweep = run["sweep"] or {}
        runs[summary["policy"]] = {
            "plan": next(iter(run["plans"].values()))["rationale"] if run["plans"] else "",
            "accelerators": summary["accelerators"],
            "cost_per_hour": summary["cost_per_hour"],
            "attainment": summary["attainment"],
            "goodput_rate_per_s": sweep.get("goodput_rate_per_s"),
            **run["goodput_efficiency"],
        }
    return runs


def distserve(folder: Path, duration: str) -> dict[str, Any]:
    cluster = EXPERIMENTS / "distserve-fleet.yaml"
    source = EXPERIMENTS / "distserve-13b-a100.yaml"
    traffic = {**_spec(source)["traffic"], "requestRatePerSecond": 16.0}
    deployment = variant(source, folder, "distserve-16rps", {"traffic": traffic})
    common = [
        "--cluster", str(CLASSES), "--cluster", str(cluster), "--deployment", str(deployment),
        "--synthetic", "poisson", "--duration", duration,
        "--policy", "vllm", "--policy", "sarathi", "--policy", "disaggregated",
    ]  # fmt: skip
    # DistServe's Figure 1 microbenchmark: fixed 512-token prompts and 64-token outputs, TTFT
    # 400 ms and TPOT 40 ms (a tighter TPOT than the chatbot setting).
    figure1 = variant(
        source,
        folder,
        "distserve-figure1",
        {
            "slo": {"ttftMs": 400, "tpotMs": 40, "percentile": 90, "attainmentTarget": 0.9},
            "traffic": {
                "requestRatePerSecond": 16.0,
                "promptTokens": {"distribution": "fixed", "mean": 512},
                "outputTokens": {"distribution": "fixed", "mean": 64},
            },
        },
    )
    figure1_args = [arg if arg != str(deployment) else str(figure1) for arg in common]
    return {
        "network_kv": simulate(common, folder / "distserve"),
        "nvlink_kv": simulate([*common, "--kv-link-gbps", "300"], folder / "distserve-nvlink"),
        "figure1": simulate(figure1_args, folder / "distserve-figure1"),
    }


def splitwise(folder: Path, window: str) -> dict[str, Any]:
    source = EXPERIMENTS / "splitwise-llama3-70b.yaml"
    fleet = EXPERIMENTS / "splitwise-fleet.yaml"
    results: dict[str, Any] = {}
    for name, classes in (("h100+a100", ["h100", "a100"]), ("h100", ["h100"]), ("a100", ["a100"])):
        hardware = {**_spec(source)["hardware"], "acceleratorClasses": classes}
        deployment = variant(source, folder, f"splitwise-{name}", {"hardware": hardware})
        args = [
            "--cluster", str(CLASSES), "--cluster", str(fleet), "--deployment", str(deployment),
            "--trace", "azure-conv", "--window", window,
            "--rate-scale", "3.7", "--rate-mode", "superpose", "--policy", "tessera",
        ]  # fmt: skip
        results[name] = simulate(args, folder / f"splitwise-{name}")["tessera"]
    return results


def lamina(folder: Path, duration: str) -> dict[str, Any]:
    """Both long-context specs on H100 + H20: attention offload, plain disaggregation and
    Tessera's own pick; and the decode-heavy one on H100 alone (no memory class: Lamina's
    baseline)."""
    fleet = [
        "--cluster", str(CLASSES),
        "--cluster", str(EXPERIMENTS / "h20-class.yaml"),
        "--cluster", str(EXPERIMENTS / "offload-fleet.yaml"),
        "--synthetic", "poisson", "--duration", duration,
    ]  # fmt: skip
    policies = ["--policy", "disaggregated", "--policy", "attention-offload", "--policy", "tessera"]
    results: dict[str, Any] = {}
    for name in ("llama3-70b-long-context", "llama3-70b-long-decode"):
        deployment = ["--deployment", str(EXPERIMENTS / f"{name}.yaml")]
        results[name] = simulate([*fleet, *deployment, *policies], folder / name)
    source = EXPERIMENTS / "llama3-70b-long-decode.yaml"
    hardware = {**_spec(source)["hardware"], "acceleratorClasses": ["h100"]}
    h100_only = variant(source, folder, "long-decode-h100", {"hardware": hardware})
    only_args = [*fleet, "--deployment", str(h100_only), "--policy", "tessera"]
    runs = simulate(only_args, folder / "h100")
    results["llama3-70b-long-decode"]["tessera on h100 only"] = runs["tessera"]
    return results


def _spec(path: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(path.read_text())["spec"]
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Shorter runs (a smoke check).")
    options = parser.parse_args()
    duration, window = ("2m", "0:5m") if options.quick else ("5m", "0:10m")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {
            "distserve": distserve(folder, duration),
            "splitwise": splitwise(folder, window),
            "lamina": lamina(folder, duration),
        }
    print()
    header = ("devices", "$/h", "goodput", "/device", "req/$")
    print(f"{'experiment':<40} " + " ".join(f"{name:>8}" for name in header))
    rows: list[tuple[str, dict[str, Any]]] = []
    for kv, runs in results["distserve"].items():
        rows += [(f"distserve {kv} {policy}", run) for policy, run in runs.items()]
    rows += [(f"splitwise {name}", run) for name, run in results["splitwise"].items()]
    for name, runs in results["lamina"].items():
        rows += [(f"{name[len('llama3-70b-') :]} {policy}", run) for policy, run in runs.items()]
    for label, run in rows:
        print(
            f"{label:<40} {run['accelerators']:>8} {run['cost_per_hour']:>8.2f} "
            f"{run['goodput_rate_per_s'] or 0:>8.2f} {run.get('goodput_per_accelerator', 0):>8.3f} "
            f"{run.get('goodput_requests_per_dollar', 0):>8.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
