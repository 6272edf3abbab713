"""The PowerBudget controller: telemetry in, `policies.power.decide`, Control RPCs out, status.

One kopf daemon per PowerBudget runs a control round every `controlIntervalSeconds` (read
afresh each round, so an edit takes effect at the next one):

1. read: the collector's snapshot (`memo.agents`, one Telemetry.Watch per agent), the nodes the
   budget covers (`nodeSelector`), the ModelDeployments (their `priority`, matched to the
   instances the agents report by `namespace/name`, name or served model name), and the record
   of what this controller imposed (`status.capped`);
2. decide: `policies.power.decide` on plain `DeviceView`s;
3. act: the agent's Control RPCs over the collector's (mutual-TLS) channels, cuts before lifts so
   the group never swings over the budget while it is being changed;
4. report: status (draw, budget, headroom, mode, capped devices, last action, conditions with
   observedGeneration), Events, Prometheus metrics.

What is in force is read from the agents (their telemetry reports each device's power limit and
clock lock) and, for a device whose agent is stale or gone, from `status.capped`: so a restarted
operator re-asserts what the decision still wants and lifts what it no longer wants, and a cap
whose lift failed stays recorded until a lift succeeds. Deleting a PowerBudget lifts every cap it
set (kopf's finalizer holds the object until then).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import grpc
import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from tessera.agents.client import AgentClient
from tessera.api.common import GROUP, VERSION, Condition, utc_now
from tessera.api.power_budget import DeviceCap, PowerBudgetSpec
from tessera.operator.collector import (
    AgentStatus,
    AgentView,
    Collector,
    DeviceTelemetry,
    FleetSnapshot,
)
from tessera.operator.reconcile import Kube, as_object, describe_spec_error, items_of
from tessera.operator.rounds import run_rounds
from tessera.operator.status import merge_conditions
from tessera.policies.power import (
    DeviceView,
    Mode,
    PowerDecision,
    actuation_steps,
    decide,
    reported_actuation,
)
from tessera.policies.power_model import FREE, Actuation

log = logging.getLogger(__name__)

POWER_BUDGETS = "powerbudgets"
MODEL_DEPLOYMENTS = "modeldeployments"
MERGE_PATCH = "application/merge-patch+json"
CONTROL_TIMEOUT_S = 5.0
"""Deadline of one Control RPC."""

READY = "Ready"
CAPPED = "Capped"
TELEMETRY_STALE = "TelemetryStale"

DRAW_W = Gauge(
    "tessera_power_budget_draw_watts",
    "Draw of the devices a PowerBudget covers (devices without fresh telemetry at their limit).",
    ["budget"],
)
BUDGET_W = Gauge("tessera_power_budget_watts", "A PowerBudget's budget.", ["budget"])
HEADROOM_W = Gauge(
    "tessera_power_budget_headroom_watts", "Budget minus draw (negative: over).", ["budget"]
)
CAPPED_DEVICES = Gauge(
    "tessera_power_budget_capped_devices", "Devices under a power limit or clock lock.", ["budget"]
)
ACTIONS = Counter(
    "tessera_power_budget_actions_total",
    "Control RPCs the power controller made, by action and result (ok or the gRPC code).",
    ["budget", "action", "result"],
)
OVER_BUDGET_SECONDS = Counter(
    "tessera_power_budget_over_budget_seconds_total",
    "Control-round time during which the measured draw was above the budget.",
    ["budget"],
)
PREDICTED_DRAW_W = Gauge(
    "tessera_power_budget_predicted_draw_watts",
    "The draw the controller expects under the caps it decided, at the load it measured.",
    ["budget"],
)
MODE = Gauge(
    "tessera_power_budget_mode",
    "1 for the controller's mode now (Normal, Holding, Capping, Releasing, Emergency), else 0.",
    ["budget", "mode"],
)
LAST_ACTION_TIME = Gauge(
    "tessera_power_budget_last_action_timestamp_seconds",
    "Unix time of the controller's last Control RPC round (status.lastActionTime).",
    ["budget"],
)
DEVICE_LABELS = ["budget", "node", "device"]
DEVICE_POWER_LIMIT_W = Gauge(
    "tessera_power_budget_device_power_limit_watts",
    "The power limit the controller holds on a device (devices it has not limited: no series).",
    DEVICE_LABELS,
)
DEVICE_CLOCK_LOCK_HZ = Gauge(
    "tessera_power_budget_device_sm_clock_max_hertz",
    "The top SM clock the controller locked a device to (devices without a lock: no series).",
    DEVICE_LABELS,
)
DEVICE_GAUGES = {"limit": DEVICE_POWER_LIMIT_W, "lock": DEVICE_CLOCK_LOCK_HZ}
BUDGET_GAUGES = (DRAW_W, BUDGET_W, HEADROOM_W, CAPPED_DEVICES, PREDICTED_DRAW_W, LAST_ACTION_TIME)


# ---- reading ------------------------------------------------------------------------------


def observed_actuation(device: DeviceTelemetry) -> Actuation:
    """What the agent reports in force on a device (a limit at the maximum is no limit)."""
    return reported_actuation(
        device.power_limit_w, device.power_limit_max_w, device.locked_sm_clock_max_mhz
    )


def priority_index(model_deployments: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Instance model string -> priority: by `namespace/name`, and by name or served model name
    where only one ModelDeployment has it."""
    index: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    for md in model_deployments:
        meta = md.get("metadata", {})
        spec = md.get("spec", {})
        priority = str(spec.get("priority", "normal"))
        index[f"{meta.get('namespace')}/{meta.get('name')}"] = priority
        for key in (meta.get("name"), (spec.get("model") or {}).get("name")):
            if key:
                seen.setdefault(str(key), set()).add(priority)
    for key, priorities in seen.items():
        if len(priorities) == 1 and key not in index:
            index[key] = next(iter(priorities))
    return index


@dataclass(frozen=True)
class Placed:
    """A covered device and where to reach it (None: its agent is not known now)."""

    view: DeviceView
    agent: AgentView | None
    observed: DeviceTelemetry | None


def device_views(
    spec: PowerBudgetSpec,
    snapshot: FleetSnapshot,
    covered_nodes: set[str] | None,
    priorities: Mapping[str, str],
    record: Mapping[str, DeviceCap],
) -> list[Placed]:
    """The devices the budget covers, as the policy sees them; recorded ones not seen are
    included as untrusted so their caps are held."""
    unassigned = spec.priority_order[0] if spec.priority_order else "low"
    placed: list[Placed] = []
    seen: set[str] = set()
    for agent in snapshot.agents.values():
        if covered_nodes is not None and agent.node_name not in covered_nodes:
            continue
        fresh = agent.status == AgentStatus.FRESH
        serving = {u: i for i in agent.instances for u in i.device_uuids}
        for device in agent.devices:
            seen.add(device.uuid)
            instance = serving.get(device.uuid)
            in_force = observed_actuation(device)
            cap = record.get(device.uuid)
            if not fresh and cap is not None:
                in_force = Actuation(cap.power_limit_w, cap.sm_clock_max_mhz)
            view = DeviceView(
                uuid=device.uuid,
                node=agent.node_name,
                power_w=device.power_w,
                fresh=fresh,
                role=instance.role if instance else "idle",
                priority=priorities.get(instance.model, "normal") if instance else unassigned,
                in_force=in_force,
                tdp_w=device.power_limit_max_w,
                power_limit_min_w=device.power_limit_min_w,
            )
            placed.append(Placed(view, agent, device))
    anywhere = {d.uuid for a in snapshot.agents.values() for d in a.devices}
    for uuid, cap in record.items():
        if uuid not in seen and uuid not in anywhere:  # on no agent: held, not forgotten
            in_force = Actuation(cap.power_limit_w, cap.sm_clock_max_mhz)
            placed.append(
                Placed(DeviceView(uuid, cap.node, None, False, in_force=in_force), None, None)
            )
    return placed


def uncovered(
    snapshot: FleetSnapshot, placed: Sequence[Placed], record: Mapping[str, DeviceCap]
) -> list[Placed]:
    """Devices this budget capped that it no longer covers (its nodeSelector or the node's
    labels changed): to be lifted, and kept in the record until a lift succeeds."""
    covered = {p.view.uuid for p in placed}
    found = []
    for agent in snapshot.agents.values():
        for device in agent.devices:
            if device.uuid in record and device.uuid not in covered:
                view = DeviceView(
                    device.uuid,
                    agent.node_name,
                    device.power_w,
                    agent.status == AgentStatus.FRESH,
                    in_force=observed_actuation(device),
                    tdp_w=device.power_limit_max_w,
                    power_limit_min_w=device.power_limit_min_w,
                )
                found.append(Placed(view, agent, device))
    return found


# ---- acting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    uuid: str
    agent: str
    action: str  # set-power-limit, reset-power-limit, lock-clocks, reset-clocks
    value: float | None
    error: str | None = None


def actuate(
    placed: Sequence[Placed],
    wanted: Mapping[str, Actuation],
    channel_factory: Callable[[str], grpc.Channel],
) -> list[Action]:
    """Bring every reachable device to what is wanted: fresh agents first, cuts before lifts.

    An agent that fails with UNAVAILABLE or DEADLINE_EXCEEDED is not called again this round, so
    one vanished node costs one timeout, not one per device.
    """

    def order(p: Placed) -> tuple[bool, bool]:
        model = p.view.power_model
        target = wanted.get(p.view.uuid, FREE)
        lowers = model.busy_draw_w(p.view.share, target) < model.busy_draw_w(
            p.view.share, p.view.in_force
        )
        return (not p.view.fresh, not lowers)

    todo = [
        p
        for p in placed
        if p.agent is not None and wanted.get(p.view.uuid, FREE) != p.view.in_force
    ]
    todo.sort(key=order)
    actions: list[Action] = []
    clients: dict[str, AgentClient] = {}
    unreachable: dict[str, str] = {}
    try:
        for p in todo:
            assert p.agent is not None
            endpoint = p.agent.endpoint
            agent = clients.get(endpoint.name)
            if agent is None:
                channel = channel_factory(endpoint.address)
                agent = clients[endpoint.name] = AgentClient(channel, CONTROL_TIMEOUT_S)
            min_mhz = p.view.power_model.sm_clock_min_mhz
            for action, value in actuation_steps(p.view.in_force, wanted.get(p.view.uuid, FREE)):
                error = unreachable.get(endpoint.name)
                if error is None:
                    error = _call(agent, action, p.view.uuid, value, min_mhz)
                    if error is not None:
                        log.warning(
                            "%s on %s via %s failed: %s", action, p.view.uuid, endpoint.name, error
                        )
                        if error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")):
                            unreachable[endpoint.name] = error
                actions.append(Action(p.view.uuid, endpoint.name, action, value, error))
    finally:
        for agent in clients.values():
            agent.close()
    return actions


def _call(
    agent: AgentClient, action: str, uuid: str, value: float | None, min_mhz: int
) -> str | None:
    """One Control RPC; the error as `CODE: details`, None when it succeeded."""
    try:
        if action == "set-power-limit":
            agent.set_power_limit(uuid, float(value or 0))
        elif action == "reset-power-limit":
            agent.reset_power_limit(uuid)
        elif action == "lock-clocks":
            agent.lock_clocks(uuid, min(min_mhz, int(value or 0)), int(value or 0))
        else:
            agent.reset_clocks(uuid)
    except grpc.RpcError as failure:
        return f"{failure.code().name}: {failure.details()}"
    return None


def new_record(
    placed: Sequence[Placed],
    wanted: Mapping[str, Actuation],
    actions: Sequence[Action],
    record: Mapping[str, DeviceCap],
) -> list[DeviceCap]:
    """What is imposed now: the wanted actuation where it was applied (or already in force), the
    old record where an RPC failed or the agent could not be reached, so none is forgotten."""
    failed = {a.uuid for a in actions if a.error is not None}
    caps: dict[str, DeviceCap] = {}
    for p in placed:
        uuid = p.view.uuid
        if p.agent is None or uuid in failed:
            if not p.view.in_force.is_free:  # unchanged: what was imposed stays imposed
                caps[uuid] = record.get(uuid) or _cap(p, p.view.in_force)
            continue
        target = wanted.get(uuid, FREE)
        if not target.is_free:
            caps[uuid] = _cap(p, target)
    return [caps[u] for u in sorted(caps)]


def _cap(p: Placed, actuation: Actuation) -> DeviceCap:
    return DeviceCap(
        uuid=p.view.uuid,
        node=p.view.node,
        agent=p.agent.endpoint.name if p.agent else "",
        power_limit_w=actuation.power_limit_w,
        sm_clock_max_mhz=actuation.sm_clock_max_mhz,
    )


# ---- reporting ----------------------------------------------------------------------------


def summarize(actions: Sequence[Action]) -> str:
    done = [a for a in actions if a.error is None]
    parts = []
    for name in ("set-power-limit", "lock-clocks", "reset-power-limit", "reset-clocks"):
        uuids = sorted({a.uuid for a in done if a.action == name})
        if uuids:
            parts.append(f"{name} {', '.join(uuids)}")
    failed = [a for a in actions if a.error is not None]
    if failed:
        parts.append(
            f"{len(failed)} failed ({failed[0].action} {failed[0].uuid}: {failed[0].error})"
        )
    return "; ".join(parts)


def conditions(
    decision: PowerDecision, actions: Sequence[Action], fresh: int, generation: int | None
) -> list[Condition]:
    failed = [a for a in actions if a.error is not None]
    ready: tuple[Literal["True", "False"], str, str]
    if failed:
        ready = ("False", "ActuationFailed", summarize(failed))
    elif fresh == 0:
        ready = ("False", "NoTelemetry", "no covered device reports fresh telemetry")
    else:
        ready = ("True", "Controlling", decision.reason)
    capped = decision.capped
    return [
        Condition(
            type=READY,
            status=ready[0],
            reason=ready[1],
            message=ready[2],
            observed_generation=generation,
        ),
        Condition(
            type=CAPPED,
            status="True" if capped else "False",
            reason=decision.mode.value if capped else "Uncapped",
            message=f"{len(capped)} device(s) slowed" if capped else "no device is slowed",
            observed_generation=generation,
        ),
        Condition(
            type=TELEMETRY_STALE,
            status="True" if decision.untrusted else "False",
            reason="StaleTelemetry" if decision.untrusted else "AllFresh",
            message=(
                "held at a safe share: " + ", ".join(decision.untrusted)
                if decision.untrusted
                else "every covered device reports fresh telemetry"
            ),
            observed_generation=generation,
        ),
    ]


# ---- one control round --------------------------------------------------------------------


class BudgetController:
    """The control rounds of one PowerBudget (state between rounds: none but the status)."""

    def __init__(self, name: str, kube: Kube, agents: Collector) -> None:
        self.name = name
        self.kube = kube
        self.agents = agents
        self._last_round: float | None = None

    def _get(self) -> dict[str, Any] | None:
        try:
            return as_object(
                self.kube.custom.get_cluster_custom_object(GROUP, VERSION, POWER_BUDGETS, self.name)
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _covered_nodes(self, spec: PowerBudgetSpec) -> set[str] | None:
        if not spec.node_selector:
            return None
        selector = ",".join(f"{k}={v}" for k, v in sorted(spec.node_selector.items()))
        nodes = self.kube.core.list_node(label_selector=selector)
        return {str(n.metadata.name) for n in nodes.items if n.metadata is not None}

    def _priorities(self) -> dict[str, str]:
        listed = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, MODEL_DEPLOYMENTS)
        return priority_index(items_of(listed))

    def round(self) -> float | None:
        """One control round; the seconds until the next (None: the budget is gone)."""
        body = self._get()
        if body is None:
            return None
        status = body.get("status") or {}
        generation = body.get("metadata", {}).get("generation")
        try:
            spec = PowerBudgetSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            self._write(
                status,
                {
                    "conditions": merge_conditions(
                        status.get("conditions") or [],
                        [
                            Condition(
                                type=READY,
                                status="False",
                                reason="InvalidSpec",
                                message=describe_spec_error(error),
                                observed_generation=generation,
                            )
                        ],
                        utc_now(),
                    ),
                    "observedGeneration": generation,
                },
            )
            return 10.0
        record = {
            c.uuid: c for c in (DeviceCap.model_validate(x) for x in status.get("capped") or [])
        }
        snapshot = self.agents.snapshot()
        placed = device_views(spec, snapshot, self._covered_nodes(spec), self._priorities(), record)
        views = [p.view for p in placed]
        decision = decide(spec, views)
        orphans = uncovered(snapshot, placed, record)
        actions = actuate([*placed, *orphans], decision.actuations, self.agents.channel_factory)
        capped = new_record([*placed, *orphans], decision.actuations, actions, record)
        self._report(body, spec, decision, actions, capped, sum(1 for v in views if v.trusted))
        return spec.control_interval_seconds

    def _report(
        self,
        body: Mapping[str, Any],
        spec: PowerBudgetSpec,
        decision: PowerDecision,
        actions: Sequence[Action],
        capped: Sequence[DeviceCap],
        fresh: int,
    ) -> None:
        now = utc_now()
        status = body.get("status") or {}
        generation = body.get("metadata", {}).get("generation")
        labels = (self.name,)
        for action in actions:
            ACTIONS.labels(
                *labels, action.action, "ok" if action.error is None else action.error.split(":")[0]
            ).inc()
        export_metrics(self.name, spec, decision, capped, bool(actions))
        clock = time.monotonic()
        over = OVER_BUDGET_SECONDS.labels(*labels)  # the series exists from the first round
        if self._last_round is not None and decision.draw_w > spec.budget_w:
            over.inc(clock - self._last_round)
        self._last_round = clock
        patch: dict[str, Any] = {
            "observedGeneration": generation,
            "drawW": round(decision.draw_w, 1),
            "budgetW": spec.budget_w,
            "headroomW": round(decision.headroom_w, 1),
            "mode": decision.mode.value,
            "cappedDevices": len(capped),
            "capped": [c.to_wire() for c in capped],
            "conditions": merge_conditions(
                status.get("conditions") or [],
                conditions(decision, actions, fresh, generation),
                now,
            ),
        }
        summary = summarize(actions)
        if summary:
            patch["lastAction"] = summary
            patch["lastActionTime"] = now.isoformat().replace("+00:00", "Z")
        self._write(status, patch)
        if actions:
            failed = any(a.error is not None for a in actions)
            reason = (
                "ActuationFailed"
                if failed
                else (
                    "EmergencyCap"
                    if decision.mode is Mode.EMERGENCY
                    else "PowerCapped"
                    if any(a.action in ("set-power-limit", "lock-clocks") for a in actions)
                    else "CapsLifted"
                )
            )
            kopf.event(
                kopf.Body(cast(kopf.RawBody, dict(body))),
                type="Warning" if failed or decision.mode is Mode.EMERGENCY else "Normal",
                reason=reason,
                message=f"{decision.reason}: {summary}"[:1024],
            )

    def _write(self, status: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        if all(status.get(k) == v for k, v in patch.items()):
            return
        # A list in a merge patch replaces the old one, so `capped` shrinks as caps lift.
        self.kube.custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            POWER_BUDGETS,
            self.name,
            {"status": dict(patch)},
            _content_type=MERGE_PATCH,
        )

    def release_all(self) -> list[Action]:
        """Lift every cap this budget recorded or a covered device shows (on deletion)."""
        body = self._get()
        status = (body or {}).get("status") or {}
        record = {
            c.uuid: c for c in (DeviceCap.model_validate(x) for x in status.get("capped") or [])
        }
        try:
            spec = PowerBudgetSpec.model_validate((body or {}).get("spec") or {})
            nodes = self._covered_nodes(spec)
        except ValidationError:
            spec, nodes = None, None
        snapshot = self.agents.snapshot()
        placed = [
            p
            for p in device_views(spec or _ANY, snapshot, nodes, {}, record)
            if p.view.uuid in record or not p.view.in_force.is_free
        ]
        return actuate(placed, {}, self.agents.channel_factory)


_ANY = PowerBudgetSpec(budget_w=1.0)


def export_metrics(
    name: str,
    spec: PowerBudgetSpec,
    decision: PowerDecision,
    capped: Sequence[DeviceCap],
    acted: bool,
    now_s: Callable[[], float] = time.time,
) -> None:
    """One round's Prometheus gauges: the group's draw, budget, headroom, predicted draw, mode,
    capped devices (count and what each holds) and, when it made Control RPCs, their time."""
    DRAW_W.labels(name).set(decision.draw_w)
    BUDGET_W.labels(name).set(spec.budget_w)
    HEADROOM_W.labels(name).set(decision.headroom_w)
    PREDICTED_DRAW_W.labels(name).set(decision.predicted_draw_w)
    CAPPED_DEVICES.labels(name).set(len(capped))
    for mode in Mode:
        MODE.labels(name, mode.value).set(1.0 if mode is decision.mode else 0.0)
    if acted:
        LAST_ACTION_TIME.labels(name).set(now_s())
    wanted: dict[str, dict[tuple[str, str, str], float]] = {"limit": {}, "lock": {}}
    for cap in capped:
        labels = (name, cap.node, cap.uuid)
        if cap.power_limit_w is not None:
            wanted["limit"][labels] = cap.power_limit_w
        if cap.sm_clock_max_mhz is not None:
            wanted["lock"][labels] = cap.sm_clock_max_mhz * 1e6
    for kind, values in wanted.items():
        gauge = DEVICE_GAUGES[kind]
        exported = _DEVICE_SERIES.setdefault((name, kind), set())
        for labels in exported - values.keys():
            gauge.remove(*labels)
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        exported.clear()
        exported.update(values)


_DEVICE_SERIES: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
"""(budget, metric) -> the device label sets exported (prometheus-client keeps no public list;
a series is removed only once its device is no longer capped, so a scrape never misses one)."""


def _forget_devices(name: str) -> None:
    for kind, gauge in DEVICE_GAUGES.items():
        for labels in _DEVICE_SERIES.pop((name, kind), set()):
            gauge.remove(*labels)


def forget_metrics(name: str) -> None:
    """Drop a deleted budget's series, so that dashboards do not show a budget that is gone."""
    for metric in (*BUDGET_GAUGES, OVER_BUDGET_SECONDS):
        with contextlib.suppress(KeyError):
            metric.remove(name)
    for mode in Mode:
        with contextlib.suppress(KeyError):
            MODE.remove(name, mode.value)
    _forget_devices(name)


def _controller(name: str, memo: kopf.Memo) -> BudgetController | None:
    agents: Collector | None = getattr(memo, "agents", None)
    if agents is None:
        return None
    return BudgetController(name, memo.kube, agents)


# ---- kopf ---------------------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, POWER_BUDGETS, cancellation_timeout=10.0)
def control_power_budget(
    name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    """Control rounds until the budget is deleted or the operator stops."""
    controller = _controller(name, memo)
    if controller is None:
        logger.warning(
            "PowerBudget %s: no node agents configured (TESSERA_AGENT_SERVICE); not controlled",
            name,
        )
        return
    run_rounds(controller.round, stopped, logger, f"PowerBudget {name}", retry_s=5.0)


@kopf.on.delete(GROUP, VERSION, POWER_BUDGETS)
def release_power_budget(name: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Lift the budget's caps before the object goes (a failed lift retries)."""
    controller = _controller(name, memo)
    if controller is None:
        return
    failed = [a for a in controller.release_all() if a.error is not None]
    if failed:
        raise kopf.TemporaryError(f"lifting caps failed: {summarize(failed)}", delay=5.0)
    forget_metrics(name)
