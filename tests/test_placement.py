"""The first placement planner: honours classes, bounds, capacity and memory; sizes by traffic."""

from __future__ import annotations

from typing import Any

import pytest
from api_samples import chat_deployment, example_documents
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.loader import parse_resource
from tessera.api.model_deployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    Plan,
    PoolRole,
    ServingMode,
)
from tessera.policies.capacity import ClassOffer
from tessera.policies.perfmodel import (
    MAX_RUNNING_REQUESTS,
    OFFLOADED_MAX_RUNNING_REQUESTS,
    PREFILL_CHUNK_TOKENS,
    ReplicaPerformance,
)
from tessera.policies.placement import InfeasiblePlanError, enumerate_candidates, plan_deployment

CLASSES = {
    d["metadata"]["name"]: AcceleratorClass.model_validate(d)
    for d in example_documents("accelerator-classes.yaml")
}


def offers(capacity: dict[str, int] | None = None) -> list[ClassOffer]:
    capacity = capacity or {}
    return [ClassOffer.from_resource(c, capacity.get(name)) for name, c in CLASSES.items()]


def spec(**changes: Any) -> ModelDeploymentSpec:
    document = chat_deployment()
    for path, value in changes.items():
        node = document["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    deployment = parse_resource(document)
    assert isinstance(deployment, ModelDeployment)
    return deployment.spec


def llama_70b(**changes: Any) -> ModelDeploymentSpec:
    return spec(
        model__architecture={
            "numLayers": 80,
            "hiddenSize": 8192,
            "numAttentionHeads": 64,
            "numKeyValueHeads": 8,
            "intermediateSize": 28672,
            "vocabSize": 128256,
            "maxContextTokens": 8192,
        },
        **changes,
    )


def test_plan_uses_only_allowed_classes() -> None:
    for allowed in (["h100"], ["a100"], ["l40s", "a100"]):
        plan = plan_deployment(spec(hardware={"acceleratorClasses": allowed}), offers())
        assert {p.accelerator_class for p in plan.pools} <= set(allowed)


def test_large_model_gets_tensor_parallel_so_weights_and_kv_fit() -> None:
    plan = plan_deployment(llama_70b(hardware={"acceleratorClasses": ["h100"]}), offers())
    for pool in plan.pools:
        if pool.role is PoolRole.ATTENTION:
            continue  # holds KV only, no weights
        assert pool.tensor_parallel >= 2
        performance = ReplicaPerformance(
            llama_70b().model.architecture, CLASSES["h100"].spec, pool.tensor_parallel
        )
        assert performance.fits()


def test_replicas_grow_with_traffic() -> None:
    small = plan_deployment(spec(traffic={"requestRatePerSecond": 1, "profile": "chat"}), offers())
    large = plan_deployment(spec(traffic={"requestRatePerSecond": 80, "profile": "chat"}), offers())
    assert large.accelerators > small.accelerators
    assert large.cost_per_hour > small.cost_per_hour


def test_replica_bounds_are_honoured() -> None:
    plan = plan_deployment(
        spec(servingMode="colocated", pools={"colocated": {"minReplicas": 3, "maxReplicas": 4}}),
        offers(),
    )
    assert plan.mode is ServingMode.COLOCATED
    assert [p.replicas for p in plan.pools if p.role is PoolRole.COLOCATED] == [3]


def test_max_replicas_too_low_is_infeasible_with_reason() -> None:
    with pytest.raises(InfeasiblePlanError, match="replica bounds"):
        plan_deployment(
            spec(
                servingMode="colocated",
                traffic={"requestRatePerSecond": 500, "profile": "chat"},
                pools={"colocated": {"maxReplicas": 1}},
            ),
            offers(),
        )


def test_model_that_fits_nowhere_is_infeasible_naming_memory() -> None:
    with pytest.raises(InfeasiblePlanError, match="GiB"):
        plan_deployment(llama_70b(hardware={"acceleratorClasses": ["l40s"]}), offers({"l40s": 2}))


def test_unreachable_tpot_names_the_slo() -> None:
    with pytest.raises(InfeasiblePlanError, match="tpotMs"):
        plan_deployment(spec(slo={"ttftMs": 2000, "tpotMs": 2}), offers())


def test_unknown_class_is_infeasible_naming_the_field() -> None:
    with pytest.raises(InfeasiblePlanError, match="acceleratorClasses"):
        plan_deployment(spec(hardware={"acceleratorClasses": ["tpu-v9"]}), offers())


def test_impossible_ttft_names_the_slo() -> None:
    with pytest.raises(InfeasiblePlanError, match="ttftMs"):
        plan_deployment(spec(slo={"ttftMs": 1, "tpotMs": 50}), offers())


def test_serving_mode_is_respected() -> None:
    plan = plan_deployment(spec(servingMode="disaggregated"), offers())
    assert plan.mode is ServingMode.DISAGGREGATED
    assert {p.role for p in plan.pools} == {PoolRole.PREFILL, PoolRole.DECODE}


def test_every_planned_pool_records_the_engine_scheduler_it_was_sized_with() -> None:
    def schedulers(plan: Plan) -> dict[PoolRole, tuple[int | None, int | None]]:
        return {p.role: (p.prefill_chunk_tokens, p.max_running_requests) for p in plan.pools}

    colocated = spec(servingMode="colocated")
    chunked = plan_deployment(colocated, offers(), chunked_prefill=True)
    whole = plan_deployment(colocated, offers(), chunked_prefill=False)
    assert schedulers(chunked) == {PoolRole.COLOCATED: (PREFILL_CHUNK_TOKENS, MAX_RUNNING_REQUESTS)}
    assert schedulers(whole) == {PoolRole.COLOCATED: (None, MAX_RUNNING_REQUESTS)}
    assert "whole prompts" in whole.rationale and "chunked prefill 512" in chunked.rationale
    disaggregated = plan_deployment(spec(servingMode="disaggregated"), offers())
    assert schedulers(disaggregated) == {
        PoolRole.PREFILL: (None, MAX_RUNNING_REQUESTS),
        PoolRole.DECODE: (None, MAX_RUNNING_REQUESTS),
    }
    offloaded = plan_deployment(spec(servingMode="attention-offload"), offers())
    assert schedulers(offloaded) == {
        PoolRole.PREFILL: (None, MAX_RUNNING_REQUESTS),
        PoolRole.DECODE: (None, OFFLOADED_MAX_RUNNING_REQUESTS),
        PoolRole.ATTENTION: (None, None),
    }


def test_colocated_replicas_are_candidates_with_chunked_prefill_and_with_whole_prompts() -> None:
    candidates = enumerate_candidates(spec(servingMode="colocated"), offers())
    by_replica: dict[tuple[str, int], set[str]] = {}
    for candidate in candidates:
        ((sizing, _),) = candidate.pools
        by_replica.setdefault((sizing.offer.name, sizing.tensor_parallel), set()).add(
            candidate.mode_label
        )
    assert by_replica
    for labels in by_replica.values():
        assert labels == {"colocated, chunked prefill 512", "colocated, whole prompts"}
    assert len({c.layout for c in candidates}) == len(candidates)


def test_plan_has_rationale_and_predictions_within_slo() -> None:
    deployment = spec()
    plan = plan_deployment(deployment, offers())
    assert plan.rationale
    assert plan.predicted_ttft_ms is not None and plan.predicted_ttft_ms <= deployment.slo.ttft_ms
    assert plan.predicted_tpot_ms is not None and plan.predicted_tpot_ms <= deployment.slo.tpot_ms


@settings(max_examples=40, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=200),
    h100=st.integers(min_value=0, max_value=64),
    a100=st.integers(min_value=0, max_value=64),
    l40s=st.integers(min_value=0, max_value=64),
)
def test_plan_never_exceeds_capacity(rate: float, h100: int, a100: int, l40s: int) -> None:
    capacity = {"h100": h100, "a100": a100, "l40s": l40s}
    deployment = spec(traffic={"requestRatePerSecond": rate, "profile": "chat"})
    try:
        plan = plan_deployment(deployment, offers(capacity))
    except InfeasiblePlanError:
        return
    used: dict[str, int] = {}
    for pool in plan.pools:
        used[pool.accelerator_class] = (
            used.get(pool.accelerator_class, 0) + pool.replicas * pool.tensor_parallel
        )
    for name, count in used.items():
        assert count <= capacity[name]


@settings(max_examples=30, deadline=None)
@given(
    ttft_ms=st.floats(min_value=150, max_value=3000),
    tpot_ms=st.floats(min_value=25, max_value=200),
    tighten=st.floats(min_value=0.5, max_value=1.0),
)
def test_tighter_slo_is_never_cheaper(ttft_ms: float, tpot_ms: float, tighten: float) -> None:
    loose = spec(slo={"ttftMs": ttft_ms, "tpotMs": tpot_ms})
    tight = spec(slo={"ttftMs": ttft_ms * tighten, "tpotMs": tpot_ms * tighten})
    try:
        tight_plan = plan_deployment(tight, offers())
    except InfeasiblePlanError:
        return
    loose_plan = plan_deployment(loose, offers())
    assert tight_plan.cost_per_hour >= loose_plan.cost_per_hour
