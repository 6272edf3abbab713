"""Reports of simulation runs: a terminal table, a JSON file and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from rich.table import Table
from tessera.sim.metrics import RunResult, SweepResult

matplotlib.use("Agg")  # files only: no display needed, safe in CI and over ssh

import matplotlib.pyplot as plt


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def plan_label(result: RunResult) -> str:
    """'2 a100' or '1 a100 P + 2 h100x2 D' style summary of the pools that ran."""
    short = {"colocated": "", "prefill": " P", "decode": " D"}
    parts = [
        f"{p.replicas} {p.accelerator_class}"
        + (f"x{p.tensor_parallel}" if p.tensor_parallel > 1 else "")
        + short.get(p.role, f" {p.role}")
        + (f" (attention on {p.attention})" if p.attention else "")
        for p in result.pools
    ]
    return " + ".join(parts)


def summary_tables(
    results: Sequence[RunResult],
    sweeps: Mapping[str, SweepResult] | None = None,
    title: str = "tessera simulate",
) -> tuple[Table, Table]:
    """(latency and SLO, cost and power): one row per policy, each narrow enough for 80 columns."""
    latency = Table(title=f"{title}: latency and SLO")
    for name in (
        "policy",
        "TTFT ms\np50/p90",
        "TPOT ms\np50/p90",
        "E2E s\np90",
        "SLO met",
        "goodput\nreq/s",
    ):
        latency.add_column(name, justify="left" if name == "policy" else "right", no_wrap=True)
    cost = Table(title=f"{title}: plan, cost and power")
    for name in (
        "policy",
        "pools",
        "$/h",
        "goodput\n/device",
        "goodput\nreq/$",
        "mean\nkW",
        "J/out\ntoken",
        "pre-\nempted",
    ):
        cost.add_column(name, justify="left" if name in ("policy", "pools") else "right")
    for result in results:
        s = result.summary()
        sweep = (sweeps or {}).get(result.policy)
        e2e = s["e2e_ms_p90"]
        latency.add_row(
            result.policy,
            f"{_fmt(s['ttft_ms_p50'])}/{_fmt(s['ttft_ms_p90'])}",
            f"{_fmt(s['tpot_ms_p50'], 1)}/{_fmt(s['tpot_ms_p90'], 1)}",
            _fmt(e2e / 1e3 if e2e is not None else None, 1),
            f"{s['attainment']:.1%}" + ("" if s["meets_targets"] else " [red]x[/]"),
            _fmt(sweep.goodput_rate_per_s, 2) if sweep else "-",
        )
        efficiency = goodput_efficiency(result, sweep)
        cost.add_row(
            result.policy,
            plan_label(result),
            _fmt(s["cost_per_hour"], 2),
            _fmt(efficiency.get("goodput_per_accelerator"), 2),
            _fmt(efficiency.get("goodput_requests_per_dollar"), 0),
            _fmt(s["mean_power_w"] / 1e3, 2),
            _fmt(s["joules_per_output_token"], 2),
            str(s["preemptions"]),
        )
    return latency, cost


def goodput_efficiency(result: RunResult, sweep: SweepResult | None) -> dict[str, float]:
    """Goodput per accelerator (DistServe's per-GPU goodput) and per dollar (requests served
    within the SLO per dollar of accelerator time: Splitwise's throughput per cost)."""
    if sweep is None:
        return {}
    summary = result.summary()
    efficiency = {
        "goodput_per_accelerator": sweep.goodput_rate_per_s / max(1, summary["accelerators"])
    }
    if summary["cost_per_hour"] > 0:
        efficiency["goodput_requests_per_dollar"] = (
            sweep.goodput_rate_per_s * 3600 / summary["cost_per_hour"]
        )
    return efficiency


def write_json(
    path: Path,
    results: Sequence[RunResult],
    sweeps: Mapping[str, SweepResult],
    config: Mapping[str, Any],
    skipped: Mapping[str, str] | None = None,
    power_points: int = 400,
) -> None:
    """Everything needed to compare the runs later: config, summaries, pools, plans, sweeps."""
    runs = []
    for result in results:
        stride = max(1, len(result.power_w) // power_points)
        runs.append(
            {
                "summary": result.summary(),
                "pools": [asdict(p) for p in result.pools],
                "plans": result.plans,
                "power_timeline": {
                    "time_s": [round(float(t), 3) for t in result.power_time_s[::stride]],
                    "power_w": [round(float(w), 1) for w in result.power_w[::stride]],
                },
                "sweep": asdict(sweeps[result.policy]) if result.policy in sweeps else None,
                "goodput_efficiency": goodput_efficiency(result, sweeps.get(result.policy)),
            }
        )
    document = {"config": dict(config), "runs": runs, "skipped": dict(skipped or {})}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def write_requests_csv(path: Path, result: RunResult) -> None:
    """Per-request results of one run (times in seconds, NaN where a request was rejected)."""
    columns = np.column_stack(
        [
            np.arange(len(result.arrival_s)),
            result.deployment,
            result.arrival_s,
            result.prompt_tokens,
            result.output_tokens,
            result.ttft_s,
            result.tpot_s,
            result.e2e_s,
            result.preemptions,
            result.transfer_s,
            result.attained(),
        ]
    )
    header = (
        "id,deployment,arrival_s,prompt_tokens,output_tokens,ttft_s,tpot_s,e2e_s,preemptions,"
        "kv_transfer_s,attained"
    )
    fmt = ["%d", "%d", "%.6f", "%d", "%d", "%.6f", "%.6f", "%.6f", "%d", "%.6f", "%d"]
    np.savetxt(path, columns, delimiter=",", header=header, comments="", fmt=fmt)


LINE_STYLES = ("-", "--", "-.", ":")
"""Policies often coincide (tessera may choose sarathi's plan): styles keep both visible."""


def _style(index: int) -> str:
    return LINE_STYLES[index % len(LINE_STYLES)]


def _cdf(ax: Any, values: np.ndarray, label: str, style: str) -> None:
    values = np.sort(values[np.isfinite(values)])
    if len(values):
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=label)


def plot_latency_cdfs(path: Path, results: Sequence[RunResult]) -> None:
    """TTFT, TPOT and end-to-end CDFs per policy, with the first deployment's SLO marked."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, result in enumerate(results):
        done = result.finished & ~result.rejected
        style = _style(index)
        _cdf(axes[0], result.ttft_s[done] * 1e3, result.policy, style)
        _cdf(axes[1], result.tpot_s[done] * 1e3, result.policy, style)
        _cdf(axes[2], result.e2e_s[done], result.policy, style)
    if results:
        slo = results[0].slos[0]
        axes[0].axvline(slo.ttft_ms, color="grey", linestyle="--", linewidth=1, label="SLO")
        axes[1].axvline(slo.tpot_ms, color="grey", linestyle="--", linewidth=1, label="SLO")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)", "end-to-end (s)"), strict=True):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Latency CDFs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_attainment(
    path: Path, results: Sequence[RunResult], sweeps: Mapping[str, SweepResult], rate_per_s: float
) -> None:
    """SLO attainment against request rate: the sweep's points, or the single run's."""
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for index, result in enumerate(results):
        sweep = sweeps.get(result.policy)
        if sweep is not None:
            rates = [p.rate_per_s for p in sweep.points]
            attained = [p.attainment for p in sweep.points]
            line = ax.plot(rates, attained, _style(index), marker="o", label=result.policy)[0]
            if sweep.goodput_rate_per_s > 0:
                ax.axvline(
                    sweep.goodput_rate_per_s, color=line.get_color(), alpha=0.4, linestyle=":"
                )
        else:
            ax.plot([rate_per_s], [result.attainment()], marker="o", label=result.policy)
    if results:
        target = results[0].slos[0].attainment_target
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SLO attainment vs rate (dotted: goodput)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_power(path: Path, results: Sequence[RunResult]) -> None:
    """Cluster power draw over time per policy (devices of the plan, from the power model)."""
    figure, ax = plt.subplots(figsize=(9, 4))
    for index, result in enumerate(results):
        ax.plot(
            result.power_time_s,
            result.power_w / 1e3,
            _style(index),
            label=result.policy,
            linewidth=1,
        )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("power (kW)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Power of the devices each plan uses")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
