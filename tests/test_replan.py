"""Re-planning: up at once, down only after the delay and below the threshold, no thrash."""

from __future__ import annotations

from api_samples import chat_deployment, example_documents
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.model_deployment import ModelDeployment, ModelDeploymentSpec, PoolRole, ServingMode
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import plan_deployment
from tessera.policies.replan import ObservedLoad, ReplanSettings, layout_of, replan

OFFERS = [
    ClassOffer.from_resource(AcceleratorClass.model_validate(d))
    for d in example_documents("accelerator-classes.yaml")
]
SETTINGS = ReplanSettings(scale_down_delay_s=300, relayout_delay_s=900)


def chat_spec(rate: float = 20.0) -> ModelDeploymentSpec:
    document = chat_deployment()
    document["spec"]["traffic"]["requestRatePerSecond"] = rate
    document["spec"]["servingMode"] = "disaggregated"
    document["spec"]["hardware"]["acceleratorClasses"] = ["h100", "a100"]
    return ModelDeployment.model_validate(document).spec


def replicas(plan_pools: list[object]) -> dict[str, int]:
    return {p.name: p.replicas for p in plan_pools}  # type: ignore[attr-defined]


def test_unchanged_load_keeps_plan() -> None:
    spec = chat_spec()
    current = plan_deployment(spec, OFFERS)
    decision = replan(spec, current, ObservedLoad(20.0), OFFERS, 0.0, SETTINGS)
    assert not decision.changed
    assert decision.plan == current


def test_load_spike_scales_up_immediately_keeping_layout() -> None:
    spec = chat_spec()
    current = plan_deployment(spec, OFFERS)
    decision = replan(spec, current, ObservedLoad(60.0), OFFERS, 0.0, SETTINGS)
    assert decision.changed
    assert layout_of(decision.plan) == layout_of(current)
    before, after = replicas(current.pools), replicas(decision.plan.pools)
    assert all(after[name] >= before[name] for name in before)
    assert sum(after.values()) > sum(before.values())


def test_scale_down_waits_for_the_delay() -> None:
    spec = chat_spec()
    current = plan_deployment(chat_spec(60.0), OFFERS)
    early = replan(spec, current, ObservedLoad(5.0), OFFERS, 10.0, SETTINGS)
    assert not early.changed
    late = replan(spec, current, ObservedLoad(5.0), OFFERS, 10_000.0, SETTINGS)
    assert late.changed
    assert sum(replicas(late.plan.pools).values()) < sum(replicas(current.pools).values())


def test_small_dip_does_not_scale_down() -> None:
    spec = chat_spec()
    current = plan_deployment(chat_spec(60.0), OFFERS)
    decision = replan(spec, current, ObservedLoad(55.0), OFFERS, 10_000.0, SETTINGS)
    assert not decision.changed


def test_prefill_and_decode_scale_together() -> None:
    spec = chat_spec()
    current = plan_deployment(spec, OFFERS)
    decision = replan(spec, current, ObservedLoad(200.0), OFFERS, 0.0, SETTINGS)
    by_role = {p.role: p.replicas for p in decision.plan.pools}
    before = {p.role: p.replicas for p in current.pools}
    assert by_role[PoolRole.PREFILL] > before[PoolRole.PREFILL]
    assert by_role[PoolRole.DECODE] > before[PoolRole.DECODE]


def test_oscillating_load_does_not_thrash() -> None:
    spec = chat_spec()
    plan = plan_deployment(spec, OFFERS)
    changes = 0
    since_change = 0.0
    for step in range(40):
        rate = 20.0 if step % 2 == 0 else 14.0
        decision = replan(spec, plan, ObservedLoad(rate), OFFERS, since_change, SETTINGS)
        since_change = 0.0 if decision.changed else since_change + 30.0
        changes += decision.changed
        plan = decision.plan
    assert changes <= 2


def test_the_engine_scheduler_of_the_plan_in_force_is_kept_while_scaling() -> None:
    spec = chat_spec().model_copy(update={"serving_mode": ServingMode.COLOCATED})
    current = plan_deployment(spec, OFFERS, chunked_prefill=False)
    chunked = plan_deployment(spec, OFFERS, chunked_prefill=True)
    assert layout_of(current) != layout_of(chunked)
    for rate in (20.0, 60.0):
        decision = replan(spec, current, ObservedLoad(rate), OFFERS, 0.0, SETTINGS)
        assert layout_of(decision.plan) == layout_of(current), decision.reason
        for pool in decision.plan.pools:
            assert pool.prefill_chunk_tokens is None
            assert pool.max_running_requests == current.pools[0].max_running_requests
