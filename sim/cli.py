"""`tessera simulate`: replay a trace (or synthetic traffic) on a simulated cluster under one or
more serving policies, and print, save and plot what happened.

With no arguments it runs the bundled example: the Llama-3-8B chat deployment on one H100 node
and two A100 nodes, fed the first ten minutes of the Azure 2023 conversation trace, under the
vLLM-like, Sarathi-like, disaggregated and Tessera policies, with a goodput sweep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tessera.api.loader import InvalidResourceError, load_kind
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.placement import InfeasiblePlanError
from tessera.sim.baselines import Baseline
from tessera.sim.cluster import ClusterError, load_cluster
from tessera.sim.experiment import (
    MAX_SIMULATED_REQUESTS,
    WorkloadSpec,
    run_policy,
    sweep_policy,
)
from tessera.sim.metrics import RunResult, SweepResult
from tessera.sim.report import (
    plot_attainment,
    plot_latency_cdfs,
    plot_power,
    summary_tables,
    write_json,
    write_requests_csv,
)
from tessera.sim.simulation import SimConfig, SimulationSetupError
from tessera.sim.workload import (
    MAX_CV,
    MIN_CV,
    TraceFormatError,
    Workload,
    parse_duration_s,
    parse_window,
    resolve_trace,
)

from tessera.cli_params import FiniteFloatRange, ParsedText, assignments

DEFAULT_POLICIES = ("vllm", "sarathi", "disaggregated", "tessera")
MIN_RATE_SCALE = 1e-3
MAX_RATE_SCALE = 1e4
"""Rate scales `--rate-scale` accepts: a thousandth to ten thousand times the trace's rate
(superposed, the request count is bounded too: MAX_SIMULATED_REQUESTS)."""
MIN_KV_LINK_GBPS = 0.01
MAX_KV_LINK_GBPS = 1e4
"""KV link bandwidths `--kv-link-gbps` accepts: 80 Mbit/s to 10 TB/s (NVLink 5 is 1.8 TB/s).
Slower links make transfers last so long that the run's time series outgrow memory (1e-6 took
590 MB for 4 requests, 1e-300 raised MemoryError)."""
MAX_SWEEP_STEPS = 20
"""Bisection steps of a goodput sweep: 20 narrow the edge to about a millionth."""
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_file(name: str) -> Path:
    """An example from the checkout's examples/, else the copy shipped in tessera.sim's data."""
    checkout = EXAMPLES / name
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("tessera.sim").joinpath("data", f"example-{name}")))


def _duration_s(text: str) -> float:
    seconds = parse_duration_s(text)
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, got {text!r}")
    return seconds


def _watts(text: str) -> float:
    watts = float(text)
    if not math.isfinite(watts):
        raise ValueError("WATTS must be a finite number")
    return watts


def _check_window(trace: Workload, window_s: tuple[float, float]) -> None:
    """The window must start inside the trace and hold requests (an empty one would report
    its SLO met by nobody, as 100%)."""
    try:
        part = trace.window(*window_s)
    except ValueError as error:
        raise click.BadParameter(
            f"{error}; valid: START < {trace.duration_s:.1f} s", param_hint="--window"
        ) from error
    if not len(part):
        raise click.BadParameter(
            f"no request of {trace.name} arrives in [{window_s[0]:g}, {window_s[1]:g}) s",
            param_hint="--window",
        )


def _check_request_count(
    workload: WorkloadSpec, deployments: list[ModelDeployment], synthetic: bool
) -> None:
    """Refuse, naming the flag, a workload past MAX_SIMULATED_REQUESTS before drawing it."""
    requests = workload.requests_at(deployments, workload.rate_scale)
    if requests <= MAX_SIMULATED_REQUESTS:
        return
    base = workload.base_requests(deployments)
    limit = f"at most {MAX_SIMULATED_REQUESTS:,} can be simulated"
    if workload.rate_mode == "superpose" and workload.rate_scale > 1:
        hint = "--rate-scale"
        detail = (
            f"{workload.rate_scale:g} superposed copies of {base:,.0f} requests make about "
            f"{requests:.3g}; {limit} (rate scale <= {workload.max_rate_scale(deployments):.4g})"
        )
    elif synthetic:
        hint = "--duration"
        rate = sum(d.spec.traffic.request_rate_per_second for d in deployments)
        detail = (
            f"synthetic traffic at the deployments' {rate:g} req/s (requestRatePerSecond) "
            f"makes about {requests:.3g} requests; {limit}"
        )
    else:
        hint = "--window"
        detail = f"the trace holds {base:,.0f} requests; {limit}: replay a shorter window"
    raise click.BadParameter(detail, param_hint=hint)


def _describe_sweep(progress: Progress, task: Any, policy: str) -> Callable[[float], None]:
    def describe(scale: float) -> None:
        progress.update(task, description=f"{policy}: sweep x{scale:.2f}")

    return describe


@click.command("simulate")
@click.option(
    "--cluster",
    "cluster_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with AcceleratorClasses and node counts (repeatable). "
    "Default: examples/sim-cluster.yaml.",
)
@click.option(
    "--deployment",
    "deployment_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with ModelDeployment(s) (repeatable). Default: examples/llama3-8b-chat.yaml.",
)
@click.option(
    "--trace",
    default="azure-conv",
    show_default=True,
    help="Trace CSV path or bundled name (azure-conv, azure-code); ignored with --synthetic.",
)
@click.option(
    "--synthetic",
    type=click.Choice(["poisson", "gamma"]),
    default=None,
    help="Synthetic arrivals at each deployment's traffic rate and lengths instead of a trace.",
)
@click.option(
    "--cv",
    type=FiniteFloatRange(MIN_CV, MAX_CV),
    default=2.0,
    show_default=True,
    help=f"Burstiness of gamma arrivals (CV), {MIN_CV:g} to {MAX_CV:g}.",
)
@click.option(
    "--duration",
    type=ParsedText("duration", _duration_s),
    default="10m",
    show_default=True,
    help="Length of synthetic traffic (90s, 10m, 1h), > 0.",
)
@click.option(
    "--window", default=None, help="Part of the trace to replay: END or START:END (5m:15m)."
)
@click.option(
    "--rate-scale",
    type=FiniteFloatRange(MIN_RATE_SCALE, MAX_RATE_SCALE),
    default=1.0,
    show_default=True,
    help=f"Multiply the arrival rate ({MIN_RATE_SCALE:g} to {MAX_RATE_SCALE:g}; superposed, "
    f"at most {MAX_SIMULATED_REQUESTS:,} requests).",
)
@click.option(
    "--rate-mode",
    type=click.Choice(["compress", "superpose"]),
    default="compress",
    show_default=True,
    help="compress: divide timestamps; superpose: overlay shifted copies (keeps duration).",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    type=click.Choice([b.value for b in Baseline]),
    help=f"Policy to simulate (repeatable). Default: {', '.join(DEFAULT_POLICIES)}.",
)
@click.option(
    "--dispatch",
    type=click.Choice([p.value for p in DispatchPolicy]),
    default=DispatchPolicy.LEAST_TOKENS.value,
    show_default=True,
    help="Request dispatch policy (tessera.policies.dispatch).",
)
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Find each policy's goodput by a rate sweep (bisection on --rate-scale).",
)
@click.option(
    "--sweep-steps",
    type=click.IntRange(0, MAX_SWEEP_STEPS),
    default=5,
    show_default=True,
    help="Bisection steps of the sweep.",
)
@click.option(
    "--power-cap",
    "power_caps",
    multiple=True,
    help="Device power cap of a class, CLASS=WATTS (repeatable); overrides the cluster file.",
)
@click.option(
    "--kv-link-gbps",
    type=FiniteFloatRange(MIN_KV_LINK_GBPS, MAX_KV_LINK_GBPS),
    default=None,
    help=f"Bandwidth of KV transfers, GB/s ({MIN_KV_LINK_GBPS:g} to {MAX_KV_LINK_GBPS:g}).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of every random draw (>= 0).",
)
@click.option(
    "--out",
    "out_dir",
    default="results/simulate",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for results.json and the plots.",
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots.")
@click.option("--per-request", is_flag=True, help="Also write requests-<policy>.csv.")
@click.option(
    "--exact",
    is_flag=True,
    help="Step every decode iteration instead of summing runs in closed form (slow; a check).",
)
def simulate_command(
    cluster_files: tuple[Path, ...],
    deployment_files: tuple[Path, ...],
    trace: str,
    synthetic: str | None,
    cv: float,
    duration: float,
    window: str | None,
    rate_scale: float,
    rate_mode: str,
    policies: tuple[str, ...],
    dispatch: str,
    sweep: bool,
    sweep_steps: int,
    power_caps: tuple[str, ...],
    kv_link_gbps: float | None,
    seed: int,
    out_dir: Path,
    plots: bool,
    per_request: bool,
    exact: bool,
) -> None:
    """Simulate deployments on a cluster under serving policies, replaying a trace."""
    console = Console(stderr=False)
    started = time.perf_counter()
    cluster_paths = cluster_files or (example_file("sim-cluster.yaml"),)
    deployment_paths = deployment_files or (example_file("llama3-8b-chat.yaml"),)
    try:
        cluster = load_cluster(cluster_paths)
    except (InvalidResourceError, ClusterError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="--cluster") from error
    try:
        deployments = load_kind(deployment_paths, ModelDeployment)
    except (InvalidResourceError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="--deployment") from error
    if not deployments:
        raise click.BadParameter(
            "no ModelDeployment in " + ", ".join(map(str, deployment_paths)),
            param_hint="--deployment",
        )
    try:
        trace_workload = None if synthetic else resolve_trace(trace)
    except (TraceFormatError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="--trace") from error
    try:
        window_s = parse_window(window) if window else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--window") from error
    if trace_workload is not None and window_s is not None:
        _check_window(trace_workload, window_s)
    workload = WorkloadSpec(
        trace=trace_workload,
        synthetic_arrival="gamma" if synthetic == "gamma" else "poisson",
        synthetic_cv=cv if synthetic == "gamma" else 1.0,
        synthetic_duration_s=duration,
        window_s=window_s,
        rate_scale=rate_scale,
        rate_mode="superpose" if rate_mode == "superpose" else "compress",
        seed=seed,
    )
    _check_request_count(workload, deployments, trace_workload is None)
    caps = assignments(power_caps, "--power-cap", _watts, "WATTS")
    if caps or kv_link_gbps is not None:
        try:
            cluster = replace(
                cluster,
                power_cap_w={**cluster.power_cap_w, **caps},
                kv_link_gbps=kv_link_gbps or cluster.kv_link_gbps,
            )
        except ClusterError as error:
            raise click.BadParameter(str(error), param_hint="--power-cap") from error
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.BadParameter(str(error), param_hint="--out") from error
    chosen = [Baseline(p) for p in (policies or DEFAULT_POLICIES)]
    config = SimConfig(seed=seed)
    dispatch_policy = DispatchPolicy(dispatch)
    workloads = workload.build(deployments)
    if not any(len(w) for w in workloads):
        raise click.BadParameter(
            f"no request arrives in {workloads[0].name}: an empty run would meet every SLO",
            param_hint="--duration" if trace_workload is None else "--rate-scale",
        )
    rate = sum(w.rate_per_s for w in workloads)
    console.print(
        f"[bold]{cluster.name}[/]: "
        + ", ".join(
            f"{n} {c} node{'s' if n != 1 else ''}" for c, n in sorted(cluster.nodes.items())
        )
        + f" ({cluster.total_accelerators} devices); "
        + ", ".join(d.metadata.name for d in deployments)
        + f"; {sum(len(w) for w in workloads)} requests at {rate:.2f} req/s "
        + f"({workloads[0].name})"
    )
    results: list[RunResult] = []
    sweeps: dict[str, SweepResult] = {}
    skipped: dict[str, str] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for baseline in chosen:
            task = progress.add_task(f"{baseline.value}", total=sum(len(w) for w in workloads))

            def advance(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)

            try:
                result = run_policy(
                    baseline,
                    cluster,
                    deployments,
                    workloads,
                    config,
                    dispatch_policy,
                    not exact,
                    advance,
                )
            except (InfeasiblePlanError, SimulationSetupError) as error:
                skipped[baseline.value] = str(error)
                progress.remove_task(task)
                continue
            results.append(result)
            if sweep:
                progress.update(task, description=f"{baseline.value}: goodput sweep")
                sweeps[baseline.value] = sweep_policy(
                    baseline,
                    cluster,
                    deployments,
                    workload,
                    config,
                    dispatch_policy,
                    not exact,
                    bisections=sweep_steps,
                    on_point=_describe_sweep(progress, task, baseline.value),
                )
            progress.remove_task(task)
    for name, reason in skipped.items():
        console.print(f"[yellow]{name} skipped[/]: {reason}")
    if not results:
        raise click.ClickException("no policy could be simulated")
    for table in summary_tables(results, sweeps, workloads[0].name):
        console.print(table)
    for result in results:
        for name, plan in result.plans.items():
            console.print(f"[dim]{result.policy} plan for {name}: {plan['rationale']}[/]")
    run_config: dict[str, Any] = {
        "cluster": [str(p) for p in cluster_paths],
        "deployments": [str(p) for p in deployment_paths],
        "trace": None if synthetic else trace,
        "synthetic": synthetic,
        "window": window,
        "rate_scale": rate_scale,
        "rate_mode": rate_mode,
        "dispatch": dispatch,
        "seed": seed,
        "exact": exact,
        "power_cap_w": cluster.power_cap_w,
        "requests": sum(len(w) for w in workloads),
        "rate_per_s": rate,
    }
    write_json(out_dir / "results.json", results, sweeps, run_config, skipped)
    written = [out_dir / "results.json"]
    if per_request:
        for result in results:
            path = out_dir / f"requests-{result.policy}.csv"
            write_requests_csv(path, result)
            written.append(path)
    if plots:
        plot_latency_cdfs(out_dir / "latency_cdf.png", results)
        plot_attainment(out_dir / "attainment_vs_rate.png", results, sweeps, rate)
        plot_power(out_dir / "power.png", results)
        written += [out_dir / n for n in ("latency_cdf.png", "attainment_vs_rate.png", "power.png")]
    console.print(
        f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s"
    )
