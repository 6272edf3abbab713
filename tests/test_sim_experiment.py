"""WorkloadSpec bounds the requests a run may hold, and a superposing sweep stays within them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sim_samples import cluster, deployment
from tessera.sim import experiment
from tessera.sim.baselines import Baseline
from tessera.sim.experiment import WorkloadSpec, WorkloadTooLargeError, sweep_policy
from tessera.sim.workload import resolve_trace


def test_build_refuses_a_workload_past_the_request_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = [deployment()]
    spec = WorkloadSpec(trace=resolve_trace("azure-code"), rate_mode="superpose", rate_scale=3.0)
    base = spec.base_requests(deployments)
    assert base == 1482
    monkeypatch.setattr(experiment, "MAX_SIMULATED_REQUESTS", 2 * 1482)
    assert spec.max_rate_scale(deployments) == 2.0
    with pytest.raises(WorkloadTooLargeError, match="at most 2,964 can be simulated"):
        spec.build(deployments)
    assert sum(len(w) for w in spec.build(deployments, 2.0)) == pytest.approx(2 * base, rel=0.01)
    compressed = replace(spec, rate_mode="compress")  # the same requests, sooner: no bound
    assert compressed.max_rate_scale(deployments) == float("inf")
    assert sum(len(w) for w in compressed.build(deployments)) == base


def test_synthetic_requests_are_the_declared_rate_over_the_window() -> None:
    deployments = [deployment(), deployment()]
    rate = deployments[0].spec.traffic.request_rate_per_second
    spec = WorkloadSpec(synthetic_duration_s=100.0, window_s=(10.0, 30.0), rate_mode="superpose")
    assert spec.requests_at(deployments, 3.0) == pytest.approx(2 * rate * 20.0 * 3.0)


def test_a_superposed_sweep_stays_within_the_request_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep doubles a passing scale up to 256 times: superposed, each doubling doubles the
    requests, so it stops where the limit would be crossed."""
    deployments = [deployment()]
    spec = WorkloadSpec(
        trace=resolve_trace("azure-conv").window(0, 30), rate_mode="superpose", rate_scale=0.25
    )
    monkeypatch.setattr(
        experiment, "MAX_SIMULATED_REQUESTS", int(3 * spec.base_requests(deployments))
    )
    result = sweep_policy(
        Baseline.VLLM, cluster({"h100": 4, "a100": 4}), deployments, spec, bisections=2
    )
    scales = [p.rate_scale for p in result.points]
    assert spec.max_rate_scale(deployments) == pytest.approx(3.0)
    start = next(p for p in result.points if p.rate_scale == 0.25)
    assert start.meets_targets  # the plan passed, so the sweep doubled from there
    assert max(scales) == 2.0  # 0.25 -> 0.5 -> 1 -> 2; 4 would cross the limit
    assert len(scales) == len(set(scales))  # the start scale is simulated once
    assert result.goodput_scale <= 2.0
