"""One reconcile of a ModelDeployment: read the fleet, plan, render, apply, report.

Level-based: everything is computed from the object and the cluster as they are now, never from
the event that triggered the call, so running it again on an unchanged world changes nothing.
The decisions live in `tessera.policies` (planning), `render` and `status`; this module only
reads and writes through the Kubernetes API.

Choices a user can observe:

- Dry run (`tessera.dev/dry-run: "true"`): the plan is computed and written to status, and the
  cluster is not touched at all: nothing is created, changed or removed, children a previous
  plan created included. Removing the annotation applies the plan.
- Infeasible or invalid spec: Degraded=True with the planner's message or the invalid field.
  Nothing is created; children of an earlier, feasible generation are left running and their
  plan stays in status.plan (a failed update does not take a working service down).
- Name conflict: a child's name is held by another ModelDeployment's child (or by an object
  Tessera does not manage): Degraded=True, reason NameConflict, naming both; nothing is applied
  and what runs keeps running, as for an infeasible spec (see `apply`).
- Autoscaling (`spec.autoscaling.enabled`): the closed loop (`autoscaler`) sizes the pools; a
  reconcile keeps the replica counts of the plan in force while the planned layout is the same.
- InferencePool: where the Gateway API Inference Extension's CRD is served, an applied plan
  also publishes one InferencePool of the entry pods (`inference_pool`); a pool it cannot
  publish (a name held by another owner, forbidden, invalid) is a Warning event, and the
  deployment is applied all the same.
- Deletion: every child has an owner reference to the ModelDeployment, so Kubernetes' garbage
  collector removes the children; the operator adds no finalizer (nothing outside the cluster
  must be released).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.common import GROUP, VERSION
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.operator import apply, inventory, render
from tessera.operator.inference_pool import InferencePoolPublisher
from tessera.operator.plan_scoring import PlanScorer
from tessera.operator.status import Outcome, Rollout, build_status, outcome_of
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import InfeasiblePlanError, plan_deployment
from tessera.policies.replan import layout_of

MODEL_DEPLOYMENTS = "modeldeployments"
ACCELERATOR_CLASSES = "acceleratorclasses"
DRY_RUN_ANNOTATION = "tessera.dev/dry-run"
CLASSES_FINGERPRINT_ANNOTATION = "tessera.dev/classes-fingerprint"
PERMANENT_API_ERRORS = (400, 422)
"""API answers that retrying cannot fix (invalid object): reported as ApplyFailed, no retry."""

logger = logging.getLogger(__name__)


@dataclass
class Kube:
    """The API clients the operator uses, all on one configured ApiClient."""

    api_client: client.ApiClient
    custom: client.CustomObjectsApi = field(init=False)
    core: client.CoreV1Api = field(init=False)
    applier: apply.ChildApplier = field(init=False)
    inference_pools: InferencePoolPublisher = field(init=False)

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.applier = apply.ChildApplier(self.api_client)
        self.inference_pools = InferencePoolPublisher(self.api_client)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the ModelDeployment."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Reconciled:
    """The result of one reconcile: the status to write and the events to post."""

    outcome: Outcome
    status: dict[str, Any]
    events: list[Event]
    pruned: list[str] = field(default_factory=list)
    """`Kind/name` of the children this reconcile deleted."""


def as_object(value: object) -> dict[str, Any]:
    """A custom-objects API answer (typed `object` by the client) as the dict it is."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API, got {type(value).__name__}")
    return value


def items_of(listed: object) -> list[dict[str, Any]]:
    """The items of a custom-objects list answer."""
    return [as_object(item) for item in as_object(listed).get("items", [])]


def is_dry_run(metadata: Mapping[str, Any]) -> bool:
    annotations = metadata.get("annotations") or {}
    return str(annotations.get(DRY_RUN_ANNOTATION, "")).strip().lower() == "true"


def describe_spec_error(error: ValidationError) -> str:
    """One line naming every invalid field as it is spelled in YAML (spec.x.y: problem)."""
    problems = []
    for problem in error.errors():
        path = ".".join(str(part) for part in ("spec", *problem["loc"]))
        problems.append(f"{path}: {problem['msg']}")
    return "; ".join(problems)


def plan_summary(plan: Plan) -> str:
    """One line: mode, pools (replicas x TP on class), cost."""
    pools = ", ".join(
        f"{p.name} {p.replicas}x TP{p.tensor_parallel} on {p.accelerator_class}" for p in plan.pools
    )
    return f"{plan.mode.value}: {pools}; {plan.cost_per_hour:.2f}/h, {plan.power_w:.0f} W"


def classes_fingerprint(
    allowed: Iterable[str], classes: Mapping[str, Mapping[str, Any] | None]
) -> str:
    """A hash of the AcceleratorClass specs a deployment may use (all when `allowed` is empty).

    Written on a ModelDeployment when those specs change, so that its own handler re-plans it.
    """
    names = sorted(set(allowed) or set(classes))
    relevant = {name: classes.get(name) for name in names}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ClusterReader:
    """Reads what planning needs: accelerator classes, node capacity, other deployments' plans."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def accelerator_classes(self) -> dict[str, AcceleratorClassSpec]:
        """Every valid AcceleratorClass by name; invalid ones are logged and skipped."""
        listed = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, ACCELERATOR_CLASSES)
        classes: dict[str, AcceleratorClassSpec] = {}
        for item in items_of(listed):
            try:
                resource = AcceleratorClass.model_validate(item)
            except ValidationError as error:
                name = item.get("metadata", {}).get("name", "?")
                logger.warning("skipping invalid AcceleratorClass %s: %s", name, error)
                continue
            classes[resource.metadata.name] = resource.spec
        return classes

    def capacity(self, classes: Mapping[str, AcceleratorClassSpec]) -> dict[str, int | None]:
        """Devices per class on matching nodes; None where unknown (no match, or no access)."""
        capacity: dict[str, int | None] = {}
        for name, spec in classes.items():
            if not spec.node_selector:
                capacity[name] = None
                continue
            try:
                nodes = self.kube.core.list_node(
                    label_selector=inventory.node_selector_query(spec), _preload_content=False
                )
            except ApiException as error:
                if error.status != 403:
                    raise
                logger.warning("cannot list nodes (forbidden): capacity of %s is unknown", name)
                capacity[name] = None
                continue
            raw = cast(Any, nodes).data  # _preload_content=False: the HTTP response
            capacity[name] = inventory.class_capacity(spec, json.loads(raw)["items"])
        return capacity

    def other_plans(self, own_uid: str | None) -> list[Plan]:
        """The plans in force of every other ModelDeployment that is not a dry run."""
        try:
            listed = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, MODEL_DEPLOYMENTS)
        except ApiException as error:
            if error.status != 403:
                raise
            logger.warning("cannot list ModelDeployments cluster-wide: other plans not counted")
            return []
        plans = []
        for item in items_of(listed):
            meta = item.get("metadata", {})
            raw = (item.get("status") or {}).get("plan")
            if meta.get("uid") == own_uid or is_dry_run(meta) or not raw:
                continue
            try:
                plans.append(Plan.model_validate(raw))
            except ValidationError:
                logger.warning("ignoring unreadable status.plan of %s", meta.get("name"))
        return plans


def planning_inputs(
    kube: Kube, owner_uid: str | None
) -> tuple[dict[str, AcceleratorClassSpec], list[ClassOffer]]:
    """The accelerator classes, and the offers a deployment is planned on (capacity left by
    the other deployments' plans): the reconcile's and the autoscaler's inputs."""
    reader = ClusterReader(kube)
    classes = reader.accelerator_classes()
    offers = inventory.build_offers(
        classes, reader.capacity(classes), reader.other_plans(owner_uid)
    )
    return classes, offers


def rollout_of_existing(kube: Kube, owner: render.Owner) -> Rollout | None:
    """The rollout of a deployment's existing workloads (None when it has none)."""
    children = kube.applier.list_children(owner.namespace, render.children_selector(owner))
    deployments = apply.workloads(children)
    return Rollout.of_workloads(deployments) if deployments else None


def reconcile(
    kube: Kube, body: Mapping[str, Any], now: datetime, scorer: PlanScorer | None = None
) -> Reconciled:
    """Bring the children of one ModelDeployment to its spec; the status and events to write.

    Raises ApiException (other than 400/422 on apply) for the caller to retry with backoff.
    """
    meta = body.get("metadata", {})
    owner = render.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    generation = meta.get("generation")
    previous = body.get("status") or {}
    previous_plan = parse_plan(previous.get("plan"))
    recorded = outcome_of(previous)

    def settle(
        outcome: Outcome,
        message: str,
        plan: Plan | None,
        rollout: Rollout | None,
        endpoint: str | None,
        events: list[Event],
        pruned: list[str] | None = None,
    ) -> Reconciled:
        status = build_status(
            previous,
            generation=generation,
            outcome=outcome,
            message=message,
            plan=plan,
            rollout=rollout,
            endpoint=endpoint,
            now=now,
        )
        if outcome.degraded and recorded != (outcome, message):
            events.append(Event("Warning", outcome.value, message))
        return Reconciled(outcome, status, events, pruned or [])

    def keep_previous(outcome: Outcome, message: str) -> Reconciled:
        """Degraded: whatever runs keeps running, and its plan (if one was applied) stays."""
        rollout = rollout_of_existing(kube, owner)
        applied = recorded is None or recorded[0] is not Outcome.DRY_RUN
        plan = previous_plan if rollout is not None and applied else None
        endpoint = previous.get("endpoint") if rollout is not None else None
        return settle(outcome, message, plan, rollout, endpoint, [])

    try:
        spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        return keep_previous(Outcome.INVALID_SPEC, describe_spec_error(error))

    classes, offers = planning_inputs(kube, owner.uid)
    try:
        evaluator = scorer.evaluator(classes) if scorer is not None else None
        plan = plan_deployment(spec, offers, evaluator)
    except InfeasiblePlanError as error:
        return keep_previous(Outcome.INFEASIBLE, str(error))
    if (
        spec.autoscaling.enabled
        and previous_plan is not None
        and layout_of(previous_plan) == layout_of(plan)
    ):
        # The closed loop (operator/autoscaler.py) sizes the pools from observed load.
        plan = previous_plan

    changed = previous_plan is None or previous_plan.to_wire() != plan.to_wire()
    if is_dry_run(meta):
        events = []
        if changed or recorded is None or recorded[0] is not Outcome.DRY_RUN:
            events.append(Event("Normal", Outcome.DRY_RUN.value, plan_summary(plan)))
        message = f"dry run, nothing applied; plan: {plan.rationale}"
        return settle(Outcome.DRY_RUN, message, plan, None, None, events)

    desired = render.render_children(owner, spec, plan, classes)
    try:
        result = apply.apply_children(kube.applier, owner, desired)
    except apply.NameConflictError as error:
        return keep_previous(Outcome.NAME_CONFLICT, str(error))
    except ApiException as error:
        if error.status not in PERMANENT_API_ERRORS:
            raise
        return keep_previous(Outcome.APPLY_FAILED, _api_message(error))
    events = []
    if changed or recorded is None or recorded[0] is not Outcome.APPLIED:
        events.append(Event("Normal", Outcome.APPLIED.value, plan_summary(plan)))
    if result.pruned:
        events.append(Event("Normal", "Pruned", "removed " + ", ".join(result.pruned)))
    published = kube.inference_pools.publish(owner, spec, plan)
    if published.warning:
        events.append(Event("Warning", published.outcome.value, published.message))
    rollout = Rollout.of_workloads(apply.workloads(result.applied))
    return settle(
        Outcome.APPLIED,
        plan.rationale,
        plan,
        rollout,
        render.endpoint_url(owner, spec),
        events,
        result.pruned,
    )


def parse_plan(raw: Any) -> Plan | None:
    """The plan a status records (None when it has none, or one this version cannot read: the
    caller then plans afresh rather than trusting it)."""
    if not raw:
        return None
    try:
        return Plan.model_validate(raw)
    except ValidationError:
        return None


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
