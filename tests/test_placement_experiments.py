"""The issue-4 experiment inputs (examples/experiments/) load, and the planner makes the
choices docs/placement-experiments.md measures; the measurements themselves are
bench/placement_experiments.py, not tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tessera.api.loader import load_kind
from tessera.api.model_deployment import ModelDeployment, PoolRole, ServingMode
from tessera.policies.placement import plan_deployment
from tessera.sim.cluster import load_cluster

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "examples" / "experiments"
CLASSES = ROOT / "examples" / "accelerator-classes.yaml"


def load_deployment(name: str) -> ModelDeployment:
    (deployment,) = load_kind([EXPERIMENTS / name], ModelDeployment)
    return deployment


@pytest.mark.parametrize(
    ("deployment", "fleet"),
    [
        ("splitwise-llama3-70b.yaml", [CLASSES, EXPERIMENTS / "splitwise-fleet.yaml"]),
        (
            "llama3-70b-long-context.yaml",
            [CLASSES, EXPERIMENTS / "h20-class.yaml", EXPERIMENTS / "offload-fleet.yaml"],
        ),
        (
            "llama3-70b-long-decode.yaml",
            [CLASSES, EXPERIMENTS / "h20-class.yaml", EXPERIMENTS / "offload-fleet.yaml"],
        ),
        ("distserve-13b-a100.yaml", [CLASSES, EXPERIMENTS / "distserve-fleet.yaml"]),
    ],
)
def test_experiment_deployments_plan_on_their_fleets(deployment: str, fleet: list[Path]) -> None:
    cluster = load_cluster(fleet)
    plan = plan_deployment(load_deployment(deployment).spec, cluster.offers())
    assert plan.pools
    assert plan.predicted_attainment is not None and plan.predicted_attainment >= 0.9


def test_planner_puts_prefill_on_h100_and_decode_on_a100_on_a_mixed_fleet() -> None:
    cluster = load_cluster([CLASSES, EXPERIMENTS / "splitwise-fleet.yaml"])
    plan = plan_deployment(load_deployment("splitwise-llama3-70b.yaml").spec, cluster.offers())
    classes = {pool.role: pool.accelerator_class for pool in plan.pools}
    assert plan.mode is ServingMode.DISAGGREGATED
    assert classes == {PoolRole.PREFILL: "h100", PoolRole.DECODE: "a100"}


def test_with_a_decode_capable_memory_class_the_planner_decodes_on_it_rather_than_offload() -> None:
    """bench/decode_economics.py: at 12k context an H20 decoding alone serves more tokens per
    dollar than H100 replicas with attention offloaded to H20s, so the planner must pick it."""
    cluster = load_cluster(
        [CLASSES, EXPERIMENTS / "h20-class.yaml", EXPERIMENTS / "offload-fleet.yaml"]
    )
    plan = plan_deployment(load_deployment("llama3-70b-long-decode.yaml").spec, cluster.offers())
    classes = {pool.role: pool.accelerator_class for pool in plan.pools}
    assert plan.mode is ServingMode.DISAGGREGATED
    assert classes == {PoolRole.PREFILL: "h100", PoolRole.DECODE: "h20"}
