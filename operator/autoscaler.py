"""The closed loop of a ModelDeployment: telemetry -> `policies.replan` -> replicas -> status.

One kopf daemon per ModelDeployment with `spec.autoscaling.enabled` runs a round every
`autoscaling.intervalSeconds` (read afresh each round):

1. observe: the serving instances of the deployment (the telemetry the node agents stream,
   `operator.collector`: instances whose `model` is the served model name, the
   ModelDeployment's name). `LoadWindow` turns their counters into what `replan` needs: the
   request rate (requests finished plus the growth of queued and running ones, per second, over
   `windowSeconds`) and the mean output length (tokens generated per request finished). Prompt
   lengths are not reported by the instances; the spec's stay.
2. decide: `policies.replan.replan` from the plan in force (`status.plan`), with the spec's
   hysteresis (`scaleDownDelaySeconds` since `status.autoscaling.lastScaleTime`,
   `scaleDownUtilization`) and the offers the reconcile plans with.
3. act (a changed plan only): render the plan's children and apply them through the reconcile's
   apply path (`apply.apply_children`: server-side apply, the same field manager), under the
   deployment's lock. Only the Deployments' replicas change; a replica taken away drains through
   its pod's preStop hook (`operator/render.py`: `tessera drain`, which migrates its running
   requests to the other replicas, bounded by `drainDeadlineSeconds`).
4. report: `status.plan` is the plan in force, `status.autoscaling` what was observed and why
   the plan changed or stayed; one Event per change.

No telemetry (no agents, or no instance reported twice within the window) changes nothing: the
loop never scales on missing data. While autoscaling is enabled the reconcile keeps the replica
counts of the plan in force when its layout is unchanged (`reconcile.reconcile`), so a spec edit
does not undo the loop's sizing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from tessera.api.common import GROUP, VERSION, utc_now
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.operator import apply, render
from tessera.operator.collector import AgentStatus, FleetSnapshot, InstanceTelemetry
from tessera.operator.events import event_body, rfc3339
from tessera.operator.reconcile import (
    MODEL_DEPLOYMENTS,
    Kube,
    as_object,
    is_dry_run,
    parse_plan,
    plan_summary,
    planning_inputs,
)
from tessera.operator.rounds import run_rounds
from tessera.policies.placement import InfeasiblePlanError
from tessera.policies.replan import ObservedLoad, ReplanSettings, replan

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
RETRY_S = 10.0


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Sample:
    time_s: float
    completed: int
    tokens: int
    in_system: int


class LoadWindow:
    """Counter samples of a deployment's instances over a time window -> `ObservedLoad`.

    Pure bookkeeping (the caller passes the time): arrivals over a span are the requests that
    finished plus the growth of those queued or running, so a saturated pool whose completions
    lag its arrivals still shows the rate it is offered. A counter that went down (the instance
    restarted) counts from zero.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: dict[str, deque[_Sample]] = {}

    def add(self, now_s: float, instances: Sequence[InstanceTelemetry]) -> None:
        seen = set()
        for i in instances:
            seen.add(i.instance_id)
            history = self.samples.setdefault(i.instance_id, deque())
            history.append(
                _Sample(
                    now_s,
                    i.requests_completed_total,
                    i.tokens_generated_total,
                    i.queue_length + i.running_batch,
                )
            )
        for key in list(self.samples):
            history = self.samples[key]
            while history and history[0].time_s < now_s - self.window_s:
                history.popleft()
            if key not in seen and not history:
                del self.samples[key]

    def observed(self) -> tuple[ObservedLoad | None, int]:
        """The load over the window (None without two samples of any instance), and how many
        instances it is measured on."""
        rate = 0.0
        completed = 0
        tokens = 0
        measured = 0
        for history in self.samples.values():
            if len(history) < 2:
                continue
            first, last = history[0], history[-1]
            span = last.time_s - first.time_s
            if span <= 0:
                continue
            done = last.completed - first.completed
            made = last.tokens - first.tokens
            if done < 0 or made < 0:  # restarted: its counters began again at zero
                done, made = last.completed, last.tokens
            arrived = max(0, done + last.in_system - first.in_system)
            rate += arrived / span
            completed += done
            tokens += made
            measured += 1
        if not measured:
            return None, 0
        mean_output = tokens / completed if completed else None
        return ObservedLoad(rate, None, mean_output), measured


Telemetry = Callable[[], FleetSnapshot]
"""The node agents' current telemetry (`Collector.snapshot`)."""


def instances_of(snapshot: FleetSnapshot, served_name: str) -> list[InstanceTelemetry]:
    """The serving instances of one deployment that fresh agents report."""
    return [
        instance
        for agent in snapshot.agents.values()
        if agent.status == AgentStatus.FRESH
        for instance in agent.instances
        if instance.model == served_name
    ]


def replan_settings(spec: ModelDeploymentSpec) -> ReplanSettings:
    scaling = spec.autoscaling
    return ReplanSettings(
        scale_down_utilization=scaling.scale_down_utilization,
        scale_down_delay_s=scaling.scale_down_delay_seconds,
    )


class AutoscaleController:
    """The rounds of one ModelDeployment's closed loop (state between rounds: the window)."""

    def __init__(
        self,
        namespace: str,
        name: str,
        kube: Kube,
        telemetry: Telemetry | None,
        lock: Callable[[], Any],
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.kube = kube
        self.telemetry = telemetry
        self.lock = lock
        self.now = now
        self.window: LoadWindow | None = None

    def _get(self) -> dict[str, Any] | None:
        try:
            return as_object(
                self.kube.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, MODEL_DEPLOYMENTS, self.name
                )
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def round(self) -> float | None:
        """One round; the seconds until the next (None: the deployment is gone)."""
        with self.lock():
            body = self._get()
            if body is None:
                return None
            try:
                spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                return RETRY_S  # the reconcile reports the invalid spec
            self._round(body, spec)
            return spec.autoscaling.interval_seconds

    def _round(self, body: Mapping[str, Any], spec: ModelDeploymentSpec) -> None:
        status = body.get("status") or {}
        record = dict(status.get("autoscaling") or {})
        now = self.now()
        record["lastRoundTime"] = rfc3339(now)
        scaling = spec.autoscaling
        if self.window is None or self.window.window_s != scaling.window_seconds:
            self.window = LoadWindow(scaling.window_seconds)
        if self.telemetry is not None:
            self.window.add(now.timestamp(), instances_of(self.telemetry(), self.name))
        observed, instances = self.window.observed()
        record["instances"] = instances
        current = parse_plan(status.get("plan"))
        if not scaling.enabled:
            record["reason"] = "autoscaling is disabled"
        elif current is None or is_dry_run(body.get("metadata") or {}):
            record["reason"] = "no plan applied yet"
        elif observed is None:
            record["reason"] = "no telemetry from the deployment's instances yet"
        else:
            record["observedRequestRatePerSecond"] = round(observed.request_rate_per_second, 4)
            if observed.mean_output_tokens is not None:
                record["observedMeanOutputTokens"] = round(observed.mean_output_tokens, 1)
            self._decide(body, spec, current, observed, record, now)
        self._write({"autoscaling": record})

    def _decide(
        self,
        body: Mapping[str, Any],
        spec: ModelDeploymentSpec,
        current: Plan,
        observed: ObservedLoad,
        record: dict[str, Any],
        now: datetime,
    ) -> None:
        meta = body["metadata"]
        owner = render.Owner(meta["name"], meta["namespace"], meta["uid"])
        changed_at = _parse_time(record.get("lastScaleTime")) or _parse_time(
            meta.get("creationTimestamp")
        )
        since = (now - changed_at).total_seconds() if changed_at is not None else float("inf")
        classes, offers = planning_inputs(self.kube, owner.uid)
        try:
            decision = replan(spec, current, observed, offers, since, replan_settings(spec))
        except InfeasiblePlanError as error:
            record["reason"] = f"no plan carries the observed load: {error}"
            return
        record["reason"] = decision.reason
        record["replicas"] = {p.name: p.replicas for p in current.pools}
        if not decision.changed:
            return
        desired = render.render_children(owner, spec, decision.plan, classes)
        try:
            apply.apply_children(self.kube.applier, owner, desired)
        except apply.NameConflictError as error:
            record["reason"] = f"not applied: {error}"
            return
        record["replicas"] = {p.name: p.replicas for p in decision.plan.pools}
        record["lastScaleTime"] = rfc3339(now)
        self._write({"plan": decision.plan.to_wire()})
        self._event(body, decision.reason, plan_summary(decision.plan), now)

    def _write(self, status: Mapping[str, Any]) -> None:
        self.kube.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            MODEL_DEPLOYMENTS,
            self.name,
            {"status": dict(status)},
            _content_type=MERGE_PATCH,
        )

    def _event(self, body: Mapping[str, Any], reason: str, summary: str, now: datetime) -> None:
        """A core/v1 Event on the ModelDeployment (posted through the API: a round may run
        outside kopf's handler context)."""
        event = event_body(
            kind="ModelDeployment",
            name=self.name,
            uid=(body.get("metadata") or {}).get("uid"),
            object_namespace=self.namespace,
            event_namespace=self.namespace,
            type_="Normal",
            reason="Scaled",
            message=f"{reason}: {summary}",
            now=now,
            component="tessera-autoscaler",
        )
        try:
            self.kube.core.create_namespaced_event(self.namespace, cast(Any, event))
        except ApiException as error:  # the scale happened; a lost Event is only logged
            log.warning("could not post the Scaled event of %s: %s", self.name, error)


def _autoscaling_enabled(spec: Mapping[str, Any], **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.daemon(
    GROUP, VERSION, MODEL_DEPLOYMENTS, when=_autoscaling_enabled, cancellation_timeout=10.0
)
def run_autoscaler(
    name: str,
    namespace: str | None,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Rounds while autoscaling is enabled (kopf stops the daemon when it is turned off)."""
    if namespace is None:
        return
    agents = getattr(memo, "agents", None)
    if agents is None:
        logger.warning(
            "ModelDeployment %s: no node agents configured (TESSERA_AGENT_SERVICE); "
            "autoscaling has no telemetry and keeps the plan",
            name,
        )
    controller = AutoscaleController(
        namespace,
        name,
        memo.kube,
        agents.snapshot if agents is not None else None,
        lambda: memo.locks(namespace, name),
    )
    run_rounds(controller.round, stopped, logger, f"autoscaling {namespace}/{name}", RETRY_S)
