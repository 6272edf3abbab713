"""An experiment: deployments on a cluster under several policies, fed the same workload.

The CLI, the benchmarks and the tests all go through here, so they simulate the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.dispatch import DispatchPolicy
from tessera.sim.baselines import Baseline, setups_for
from tessera.sim.cluster import Cluster
from tessera.sim.metrics import RunResult, SweepResult, goodput_sweep
from tessera.sim.simulation import SimConfig, Simulation
from tessera.sim.workload import RateMode, Workload, synthetic_workload

Progress = Callable[[int, int], None]

MAX_SIMULATED_REQUESTS = 4_000_000
"""Most requests one simulated run may hold: twice the largest run docs/simulator.md reports
(1,936,600, the hour-long trace superposed x100). Superposed rate scales and synthetic traffic
multiply the request count; `--rate-scale 1e9` superposed once asked for 3e12 requests and grew
memory until it died. bench/sim_scale.py's 286,700-request run peaked at 113 MB in 92 s on a
2-core machine (~3,100 requests/s, ~0.1 kB a request), so a run at the limit takes about 20
minutes and well under 1 GB; past it the workload is refused up front (the CLI names the
flag)."""

SWEEP_MAX_EXPANSIONS = 8
"""Doublings (or halvings) a goodput sweep may take to bracket the edge: up to 256x."""


class WorkloadTooLargeError(ValueError):
    """The workload would hold more than MAX_SIMULATED_REQUESTS requests."""


@dataclass(frozen=True)
class WorkloadSpec:
    """Where requests come from: a trace (split across deployments by declared rate) or each
    deployment's own TrafficSpec (synthetic), then windowed and rate-scaled."""

    trace: Workload | None = None
    synthetic_arrival: Literal["poisson", "gamma"] = "poisson"
    synthetic_cv: float = 1.0
    synthetic_duration_s: float = 600.0
    window_s: tuple[float, float] | None = None
    rate_scale: float = 1.0
    rate_mode: RateMode = "compress"
    seed: int = 0

    def base_requests(self, deployments: Sequence[ModelDeployment]) -> float:
        """Requests at rate scale 1: the trace window's count, or synthetic traffic's expected
        count (each deployment's declared rate over the duration)."""
        if self.trace is not None:
            base = self.trace if self.window_s is None else self.trace.window(*self.window_s)
            return float(len(base))
        duration = self.synthetic_duration_s
        if self.window_s is not None:
            duration = self.window_s[1] - self.window_s[0]
        return sum(d.spec.traffic.request_rate_per_second for d in deployments) * duration

    def requests_at(self, deployments: Sequence[ModelDeployment], rate_scale: float) -> float:
        """Requests (expected) at a rate scale: compressing keeps the count, superposing
        multiplies it."""
        factor = rate_scale if self.rate_mode == "superpose" else 1.0
        return self.base_requests(deployments) * factor

    def max_rate_scale(self, deployments: Sequence[ModelDeployment]) -> float:
        """Highest rate scale within MAX_SIMULATED_REQUESTS (infinite when compressing)."""
        if self.rate_mode != "superpose":
            return math.inf
        return MAX_SIMULATED_REQUESTS / max(self.base_requests(deployments), 1.0)

    def build(
        self, deployments: Sequence[ModelDeployment], rate_scale: float | None = None
    ) -> list[Workload]:
        """One workload per deployment, reproducible from the seed.

        Raises WorkloadTooLargeError, before drawing anything, if it would hold more than
        MAX_SIMULATED_REQUESTS requests.
        """
        scale = self.rate_scale if rate_scale is None else rate_scale
        requests = self.requests_at(deployments, scale)
        if not requests <= MAX_SIMULATED_REQUESTS:
            raise WorkloadTooLargeError(
                f"the workload at rate scale {scale:g} ({self.rate_mode}) would hold about "
                f"{requests:.3g} requests; at most {MAX_SIMULATED_REQUESTS:,} can be simulated"
            )
        rng = np.random.default_rng([self.seed, 17])
        if self.trace is not None:
            base = self.trace
            if self.window_s is not None:
                base = base.window(*self.window_s)
            rates = [d.spec.traffic.request_rate_per_second for d in deployments]
            parts = base.split(rates, rng)
        else:
            duration = self.synthetic_duration_s
            if self.window_s is not None:
                duration = self.window_s[1] - self.window_s[0]
            parts = [
                synthetic_workload(
                    d.spec.traffic, duration, rng, self.synthetic_arrival, self.synthetic_cv
                )
                for d in deployments
            ]
        if scale == 1.0:
            return parts
        return [part.scaled(scale, self.rate_mode, rng) for part in parts]


def run_policy(
    baseline: Baseline,
    cluster: Cluster,
    deployments: Sequence[ModelDeployment],
    workloads: Sequence[Workload],
    config: SimConfig | None = None,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
    fast_forward: bool = True,
    progress: Progress | None = None,
) -> RunResult:
    """One simulation of a policy (raises InfeasiblePlanError if it cannot be planned)."""
    setups = setups_for(baseline, deployments, cluster, dispatch)
    config = replace(config or SimConfig(), fast_forward=fast_forward)
    simulation = Simulation(cluster, setups, workloads, config, baseline.value)
    return simulation.run(progress)


def sweep_policy(
    baseline: Baseline,
    cluster: Cluster,
    deployments: Sequence[ModelDeployment],
    workload: WorkloadSpec,
    config: SimConfig | None = None,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
    fast_forward: bool = True,
    bisections: int = 6,
    on_point: Callable[[float], None] | None = None,
) -> SweepResult:
    """Goodput of a policy: the highest rate scale (of the workload's) meeting every target.

    The plan is made once, for the declared traffic, and held while the rate is swept: the
    sweep measures how much traffic that plan carries within the SLO. A superposing sweep
    doubles the rate only while the workload stays within MAX_SIMULATED_REQUESTS; if the plan
    still passes there, the goodput reported is that bound (a lower bound on the true one).
    """
    base = workload.build(deployments, 1.0)
    base_rate = sum(w.rate_per_s for w in base)
    setups = setups_for(baseline, deployments, cluster, dispatch)
    config = replace(config or SimConfig(), fast_forward=fast_forward)

    runs: dict[float, RunResult] = {}

    def run_at(scale: float) -> RunResult:
        if scale not in runs:
            if on_point is not None:
                on_point(scale)
            workloads = workload.build(deployments, scale)
            runs[scale] = Simulation(cluster, setups, workloads, config, baseline.value).run()
        return runs[scale]

    start = workload.rate_scale
    expansions = SWEEP_MAX_EXPANSIONS
    headroom = workload.max_rate_scale(deployments) / start
    if headroom < 2**SWEEP_MAX_EXPANSIONS and run_at(start).meets_targets():
        expansions = math.floor(math.log2(headroom))  # doubling, not halving, needs the room
    return goodput_sweep(
        baseline.value,
        run_at,
        base_rate,
        start_scale=start,
        bisections=bisections,
        max_expansions=expansions,
    )


def with_seed(config: SimConfig | None, seed: int) -> SimConfig:
    return replace(config or SimConfig(), seed=seed)
