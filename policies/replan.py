"""Re-planning as load changes: scale pools up at once, down slowly, re-layout rarely.

A pure function of (spec, plan in force, observed load, offers, time since the last change).
Hysteresis keeps the operator from thrashing: scaling up happens as soon as the observed rate
needs it; scaling down waits `scale_down_delay_s` and needs utilisation below
`scale_down_utilization`; switching to a different layout (other mode, classes, TP degrees or
engine scheduler) needs a cost gain above `relayout_min_gain` and `relayout_delay_s` of
stability. Prefill and decode pools are always sized from the same rate, so their ratio stays
balanced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tessera.api.model_deployment import (
    LengthDistribution,
    ModelDeploymentSpec,
    Plan,
)
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import (
    TARGET_UTILIZATION,
    Candidate,
    InfeasiblePlanError,
    enumerate_candidates,
    plan_deployment,
    shortlist_candidates,
    to_plan,
)


@dataclass(frozen=True)
class ObservedLoad:
    """What telemetry says the deployment is carrying now."""

    request_rate_per_second: float
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None


@dataclass(frozen=True)
class ReplanSettings:
    """Hysteresis knobs."""

    scale_down_utilization: float = 0.6
    scale_down_delay_s: float = 300.0
    relayout_min_gain: float = 0.2
    relayout_delay_s: float = 900.0


@dataclass(frozen=True)
class ReplanDecision:
    """The plan to run and why; `changed` is False when the plan in force stays."""

    plan: Plan
    changed: bool
    reason: str


def layout_of(plan: Plan) -> tuple[tuple[str, str, int, int, int], ...]:
    """What a plan runs where and how its engines schedule, without replica counts: a plan
    with whole prompts is another layout than the same replicas chunking prefill."""
    return tuple(
        sorted(
            (
                p.role.value,
                p.accelerator_class,
                p.tensor_parallel,
                p.prefill_chunk_tokens or 0,
                p.max_running_requests or 0,
            )
            for p in plan.pools
        )
    )


def observed_spec(spec: ModelDeploymentSpec, observed: ObservedLoad) -> ModelDeploymentSpec:
    """The spec with its traffic replaced by what is observed (lengths only where measured)."""
    prompt, output = spec.traffic.resolved_lengths()
    if observed.mean_prompt_tokens:
        prompt = _with_mean(prompt, observed.mean_prompt_tokens)
    if observed.mean_output_tokens:
        output = _with_mean(output, observed.mean_output_tokens)
    traffic = spec.traffic.model_copy(
        update={
            "request_rate_per_second": max(observed.request_rate_per_second, 1e-3),
            "prompt_tokens": prompt,
            "output_tokens": output,
        }
    )
    return spec.model_copy(update={"traffic": traffic})


def _with_mean(distribution: LengthDistribution, mean: float) -> LengthDistribution:
    limit = distribution.max
    if limit is not None and mean > limit:
        limit = int(mean)
    return distribution.model_copy(update={"mean": mean, "max": limit})


def _replicas(plan: Plan) -> dict[str, int]:
    return {pool.name: pool.replicas for pool in plan.pools}


def replan(
    spec: ModelDeploymentSpec,
    current: Plan | None,
    observed: ObservedLoad,
    offers: Sequence[ClassOffer],
    seconds_since_change: float,
    settings: ReplanSettings | None = None,
) -> ReplanDecision:
    """The plan to run given the observed load; raises InfeasiblePlanError if none exists."""
    settings = settings or ReplanSettings()
    target = observed_spec(spec, observed)
    if current is None:
        return ReplanDecision(plan_deployment(target, offers), True, "initial plan")
    candidates = enumerate_candidates(target, offers)
    if not candidates:
        raise InfeasiblePlanError(
            f"no plan carries the observed {observed.request_rate_per_second:g} req/s"
        )
    # The same choice as plan_deployment's: cheapest whose predicted attainment meets the
    # target (grown if need be), overall and within the layout in force.
    (best,) = shortlist_candidates(target, candidates, 1)
    same_layout = [c for c in candidates if layout_of(to_plan(c, target)) == layout_of(current)]
    if not same_layout:
        plan = to_plan(best, target)
        return ReplanDecision(plan, True, "current layout can no longer carry the load")
    (resized,) = shortlist_candidates(target, same_layout, 1)
    gain = 1.0 - best.cost_per_hour / max(resized.cost_per_hour, 1e-9)
    if gain > settings.relayout_min_gain and seconds_since_change >= settings.relayout_delay_s:
        plan = to_plan(best, target)
        return ReplanDecision(plan, True, f"re-layout saves {gain:.0%} of cost")
    return _scale(current, resized, target, seconds_since_change, settings)


def _scale(
    current: Plan,
    resized: Candidate,
    target: ModelDeploymentSpec,
    seconds_since_change: float,
    settings: ReplanSettings,
) -> ReplanDecision:
    proposal = to_plan(resized, target)
    now, wanted = _replicas(current), _replicas(proposal)
    if wanted == now:
        return ReplanDecision(current, False, "load fits the plan in force")
    if any(wanted[name] > now.get(name, 0) for name in wanted):
        # Scale up what is short at once, never shrink another pool in the same step.
        merged = {name: max(wanted[name], now.get(name, 0)) for name in wanted}
        pools = [p.model_copy(update={"replicas": merged[p.name]}) for p in proposal.pools]
        plan = proposal.model_copy(update={"pools": pools})
        return ReplanDecision(plan, True, "scale up: observed load exceeds capacity")
    utilization = _utilization_at(current, resized, target)
    if utilization > settings.scale_down_utilization:
        return ReplanDecision(current, False, f"utilisation {utilization:.0%} too high to shrink")
    if seconds_since_change < settings.scale_down_delay_s:
        return ReplanDecision(current, False, "scale down deferred (hysteresis delay)")
    return ReplanDecision(proposal, True, f"scale down: utilisation {utilization:.0%}")


def _utilization_at(current: Plan, resized: Candidate, target: ModelDeploymentSpec) -> float:
    """Highest busy fraction of any pool if it kept its current replica count."""
    rate = target.traffic.request_rate_per_second
    replicas = _replicas(current)
    busiest = 0.0
    for sizing, _ in resized.pools:
        name = f"{sizing.role.value}-{sizing.offer.name}"
        count = max(1, replicas.get(name, 1))
        per_replica = sizing.requests_per_second_per_replica
        busiest = max(busiest, TARGET_UTILIZATION * rate / (count * per_replica))
    return busiest
