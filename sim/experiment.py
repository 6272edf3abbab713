"""An experiment: deployments on a cluster under several policies, fed the same workload.

The CLI, the benchmarks and the tests all go through here, so they simulate the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.dispatch import DispatchPolicy
from tessera.sim.baselines import Baseline, setups_for
from tessera.sim.cluster import Cluster
from tessera.sim.engine import SimConfig, Simulation
from tessera.sim.metrics import RunResult, SweepResult, goodput_sweep
from tessera.sim.workload import RateMode, Workload, synthetic_workload

Progress = Callable[[int, int], None]


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

    def build(
        self, deployments: Sequence[ModelDeployment], rate_scale: float | None = None
    ) -> list[Workload]:
        """One workload per deployment, reproducible from the seed."""
        scale = self.rate_scale if rate_scale is None else rate_scale
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
    setups = setups_for(baseline, deployments, cluster, dispatch, fast_forward)
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
    sweep measures how much traffic that plan carries within the SLO.
    """
    base = workload.build(deployments, 1.0)
    base_rate = sum(w.rate_per_s for w in base)
    setups = setups_for(baseline, deployments, cluster, dispatch, fast_forward)

    def run_at(scale: float) -> RunResult:
        if on_point is not None:
            on_point(scale)
        workloads = workload.build(deployments, scale)
        return Simulation(cluster, setups, workloads, config, baseline.value).run()

    return goodput_sweep(
        baseline.value, run_at, base_rate, start_scale=workload.rate_scale, bisections=bisections
    )


def with_seed(config: SimConfig | None, seed: int) -> SimConfig:
    return replace(config or SimConfig(), seed=seed)
