"""The status a ModelDeployment reports: conditions, plan, readiness (pure).

Three conditions, in the metav1.Condition shape:

- Ready: the plan in force has all its replicas ready (True), or why not (False).
- Progressing: children are being rolled out towards the plan (True until they report ready).
- Degraded: the operator cannot do what the spec asks: Infeasible (no class fits; the planner's
  message), InvalidSpec (the field that is wrong), ApplyFailed (the API server refused a child)
  or NameConflict (a child's name is held by another owner; the message names both).

lastTransitionTime changes only when a condition's status changes, so a level-based reconcile
that runs again on the same state writes the same status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from tessera.api.common import Condition
from tessera.api.model_deployment import Plan

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)


class Outcome(StrEnum):
    """What the last reconcile of a generation did; each value is also a condition reason."""

    APPLIED = "PlanApplied"
    DRY_RUN = "DryRun"
    INFEASIBLE = "Infeasible"
    INVALID_SPEC = "InvalidSpec"
    APPLY_FAILED = "ApplyFailed"
    NAME_CONFLICT = "NameConflict"

    @property
    def degraded(self) -> bool:
        return self in (
            Outcome.INFEASIBLE,
            Outcome.INVALID_SPEC,
            Outcome.APPLY_FAILED,
            Outcome.NAME_CONFLICT,
        )


@dataclass(frozen=True)
class Rollout:
    """How far the pool workloads are from the replicas they want."""

    desired_replicas: int
    ready_replicas: int
    up_to_date: bool
    """Every workload's controller has seen its latest spec and updated all its replicas."""

    @classmethod
    def of_workloads(cls, workloads: Iterable[Mapping[str, Any]]) -> Rollout:
        """From Deployment objects as the API returns them (status written by their controller)."""
        desired = ready = 0
        up_to_date = True
        for workload in workloads:
            if workload.get("kind", "Deployment") != "Deployment":
                continue
            replicas = int(workload.get("spec", {}).get("replicas", 1))
            status = workload.get("status") or {}
            generation = int(workload.get("metadata", {}).get("generation") or 0)
            observed = int(status.get("observedGeneration") or 0)
            updated = int(status.get("updatedReplicas") or 0)
            desired += replicas
            ready += min(int(status.get("readyReplicas") or 0), replicas)
            if observed < generation or updated < replicas:
                up_to_date = False
        return cls(desired, ready, up_to_date)

    @property
    def complete(self) -> bool:
        return self.up_to_date and self.ready_replicas >= self.desired_replicas


def _readiness(rollout: Rollout | None, outcome: Outcome) -> tuple[Condition, Condition]:
    """Ready and Progressing from the children's rollout (None: no plan has been applied)."""
    if rollout is None:
        reason = outcome.value
        why = {
            Outcome.DRY_RUN: "dry run: the plan is reported, nothing is applied",
            Outcome.INFEASIBLE: "no feasible plan, nothing is applied",
            Outcome.INVALID_SPEC: "the spec is invalid, nothing is applied",
            Outcome.APPLY_FAILED: "the plan could not be applied",
            Outcome.NAME_CONFLICT: "a child's name is held by another owner, nothing is applied",
            Outcome.APPLIED: "no workloads yet",
        }[outcome]
        return (
            Condition(type=READY, status="False", reason=reason, message=why),
            Condition(type=PROGRESSING, status="False", reason=reason, message=why),
        )
    counts = f"{rollout.ready_replicas}/{rollout.desired_replicas} replicas ready"
    if rollout.complete:
        ready = Condition(type=READY, status="True", reason="ReplicasReady", message=counts)
    else:
        ready = Condition(type=READY, status="False", reason="ReplicasNotReady", message=counts)
    if outcome.degraded:
        progressing = Condition(
            type=PROGRESSING,
            status="False",
            reason=outcome.value,
            message=f"the spec cannot be applied; the previous plan stays in force ({counts})",
        )
    elif rollout.complete:
        progressing = Condition(
            type=PROGRESSING, status="False", reason="RolloutComplete", message=counts
        )
    else:
        progressing = Condition(
            type=PROGRESSING, status="True", reason="RollingOut", message=counts
        )
    return ready, progressing


def desired_conditions(
    outcome: Outcome, message: str, rollout: Rollout | None, generation: int | None
) -> list[Condition]:
    """Ready, Progressing and Degraded for an outcome and the children's rollout."""
    ready, progressing = _readiness(rollout, outcome)
    if outcome.degraded:
        degraded = Condition(type=DEGRADED, status="True", reason=outcome.value, message=message)
    else:
        degraded = Condition(type=DEGRADED, status="False", reason=outcome.value, message=message)
    conditions = [ready, progressing, degraded]
    for condition in conditions:
        condition.observed_generation = generation
    return conditions


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], desired: Sequence[Condition], now: datetime
) -> list[dict[str, Any]]:
    """Wire-form conditions; a condition keeps its lastTransitionTime while its status holds."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    merged: list[dict[str, Any]] = []
    for condition in desired:
        old = before.get(condition.type)
        wire = condition.model_copy(update={"last_transition_time": now}).to_wire()
        if old is not None and old.get("status") == condition.status:
            wire["lastTransitionTime"] = old.get("lastTransitionTime", wire["lastTransitionTime"])
        merged.append(wire)
    return merged


def build_status(
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    outcome: Outcome,
    message: str,
    plan: Plan | None,
    rollout: Rollout | None,
    endpoint: str | None,
    now: datetime,
) -> dict[str, Any]:
    """The whole status (wire form). Keys set to None are removed by a merge patch."""
    previous = previous or {}
    conditions = merge_conditions(
        previous.get("conditions") or [],
        desired_conditions(outcome, message, rollout, generation),
        now,
    )
    return {
        "observedGeneration": generation,
        "conditions": conditions,
        "plan": plan.to_wire() if plan is not None else None,
        "readyReplicas": rollout.ready_replicas if rollout is not None else 0,
        "endpoint": endpoint,
    }


def outcome_of(status: Mapping[str, Any] | None) -> tuple[Outcome, str] | None:
    """The outcome and message a status records (from its Degraded condition), if any."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == DEGRADED:
            try:
                return Outcome(condition.get("reason", "")), str(condition.get("message", ""))
            except ValueError:
                return None
    return None


def refreshed_readiness(
    status: Mapping[str, Any] | None, rollout: Rollout, now: datetime
) -> dict[str, Any] | None:
    """The status patch after the children's readiness changed, or None if nothing changes.

    Used between reconciles (on workload status events): keeps the recorded outcome, plan and
    observedGeneration, and recomputes only Ready, Progressing and readyReplicas.
    """
    if not status or not status.get("plan"):
        return None
    recorded = outcome_of(status)
    if recorded is None or recorded[0] is Outcome.DRY_RUN:
        return None
    outcome, message = recorded
    generation = status.get("observedGeneration")
    conditions = merge_conditions(
        status.get("conditions") or [],
        desired_conditions(outcome, message, rollout, generation),
        now,
    )
    patch = {"conditions": conditions, "readyReplicas": rollout.ready_replicas}
    if all(status.get(key) == value for key, value in patch.items()):
        return None
    return patch


def comparable(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A status without None values, for "did anything change" comparisons."""
    return {k: v for k, v in (status or {}).items() if v is not None}
