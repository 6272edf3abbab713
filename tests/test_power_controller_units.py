"""The PowerBudget controller's translation between telemetry, policy and Control RPCs, without a
cluster: what counts as in force, how instances find their priority, which devices a budget
covers, and what the record keeps when an RPC fails (operator/power_controller.py)."""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any

import grpc
from prometheus_client import REGISTRY
from tessera.agents.client import insecure_channel
from tessera.api.power_budget import DeviceCap, PowerBudgetSpec
from tessera.operator.collector import (
    AgentEndpoint,
    AgentStatus,
    AgentView,
    DeviceTelemetry,
    FleetSnapshot,
    InstanceTelemetry,
)
from tessera.operator.power_controller import (
    CONTROL_TIMEOUT_S,
    Action,
    actuate,
    device_views,
    export_metrics,
    forget_metrics,
    new_record,
    observed_actuation,
    priority_index,
    summarize,
    uncovered,
)
from tessera.policies.power import Mode, PowerDecision, actuation_steps
from tessera.policies.power_model import FREE, Actuation


def telemetry(uuid: str, limit_w: float = 700.0, lock: int | None = None) -> DeviceTelemetry:
    return DeviceTelemetry(
        uuid, 0, 500.0, None, limit_w, 200.0, 700.0, 1980, None, 1.0, None, None, None, (),
        locked_sm_clock_max_mhz=lock,
    )  # fmt: skip


def agent(
    name: str, node: str, devices: list[DeviceTelemetry], status: AgentStatus = AgentStatus.FRESH
) -> AgentView:
    instances = tuple(
        InstanceTelemetry(f"i-{d.uuid}", "team/chat", "decode", (d.uuid,), 0, 0, 0, 0, 0.0,
                          (), (), 0, 0)
        for d in devices[:1]
    )  # fmt: skip
    return AgentView(
        AgentEndpoint(name, f"10.0.0.1:{len(name)}", node), status, node, "v", 1, 1, 0.1,
        tuple(devices), instances, {}, 0, None,
    )  # fmt: skip


def test_a_limit_at_the_maximum_is_no_limit_and_a_reported_lock_is_in_force() -> None:
    assert observed_actuation(telemetry("a")) == FREE
    assert observed_actuation(telemetry("a", 699.8)) == FREE
    assert observed_actuation(telemetry("a", 450.0)) == Actuation(450.0)
    assert observed_actuation(telemetry("a", 700.0, 990)) == Actuation(None, 990)


def test_instances_find_their_priority_by_namespace_and_name_or_an_unambiguous_name() -> None:
    mds = [
        {"metadata": {"namespace": "team", "name": "chat"},
         "spec": {"priority": "high", "model": {"name": "llama"}}},
        {"metadata": {"namespace": "other", "name": "chat"},
         "spec": {"priority": "low", "model": {"name": "llama"}}},
        {"metadata": {"namespace": "team", "name": "batch"},
         "spec": {"priority": "low", "model": {"name": "mistral"}}},
    ]  # fmt: skip
    index = priority_index(mds)
    assert index["team/chat"] == "high" and index["other/chat"] == "low"
    assert "chat" not in index and "llama" not in index  # ambiguous: the tiers differ
    assert index["batch"] == "low" and index["mistral"] == "low"


def test_a_budget_covers_its_nodes_and_holds_recorded_devices_it_cannot_see() -> None:
    snapshot = FleetSnapshot(
        {
            "a": agent("a", "node-a", [telemetry("A0", 450.0), telemetry("A1")]),
            "b": agent("b", "node-b", [telemetry("B0")], AgentStatus.STALE),
            "c": agent("c", "node-c", [telemetry("C0")]),
        }
    )
    record = {
        "B0": DeviceCap(uuid="B0", node="node-b", agent="b", power_limit_w=400.0),
        "GONE": DeviceCap(uuid="GONE", node="node-x", agent="x", power_limit_w=380.0),
    }
    spec = PowerBudgetSpec(budget_w=2000)
    placed = device_views(spec, snapshot, {"node-a", "node-b"}, {"team/chat": "high"}, record)
    views = {p.view.uuid: p.view for p in placed}
    assert set(views) == {"A0", "A1", "B0", "GONE"}  # node-c is not covered
    assert views["A0"].in_force == Actuation(450.0) and views["A0"].priority == "high"
    assert views["A0"].role == "decode"
    assert views["A1"].role == "idle" and views["A1"].priority == "low"  # serves nothing known
    assert not views["B0"].fresh and views["B0"].in_force == Actuation(400.0)  # the record
    assert views["GONE"].power_w is None and views["GONE"].in_force == Actuation(380.0)
    assert [p.agent for p in placed if p.view.uuid == "GONE"] == [None]


def test_the_record_keeps_what_failed_or_could_not_be_reached_and_drops_what_was_lifted() -> None:
    snapshot = FleetSnapshot({"a": agent("a", "n", [telemetry("A0", 450.0), telemetry("A1")])})
    record = {
        "A0": DeviceCap(uuid="A0", node="n", agent="a", power_limit_w=450.0),
        "GONE": DeviceCap(uuid="GONE", node="x", power_limit_w=380.0),
    }
    placed = device_views(PowerBudgetSpec(budget_w=2000), snapshot, None, {}, record)
    wanted = {"A0": FREE, "A1": Actuation(None, 1400), "GONE": FREE}
    lifted_ok = [
        Action("A0", "a", "reset-power-limit", None),
        Action("A1", "a", "lock-clocks", 1400),
    ]
    kept = new_record(placed, wanted, lifted_ok, record)
    assert [(c.uuid, c.power_limit_w, c.sm_clock_max_mhz) for c in kept] == [
        ("A1", None, 1400),
        ("GONE", 380.0, None),
    ]
    failed = [Action("A0", "a", "reset-power-limit", None, "UNAVAILABLE: gone")]
    assert {c.uuid for c in new_record(placed, wanted, failed, record)} == {"A0", "A1", "GONE"}
    assert "1 failed" in summarize(failed)


def test_rpcs_are_the_difference_between_what_is_in_force_and_what_is_wanted() -> None:
    assert actuation_steps(FREE, FREE) == []
    assert actuation_steps(FREE, Actuation(400.0)) == [("set-power-limit", 400.0)]
    assert actuation_steps(Actuation(400.0, 990), Actuation(None, 1200)) == [
        ("reset-power-limit", None),
        ("lock-clocks", 1200.0),
    ]
    assert actuation_steps(Actuation(None, 990), FREE) == [("reset-clocks", None)]


def test_an_unreachable_agent_is_called_once_a_round_and_every_step_is_reported() -> None:
    """Two devices to cap on an agent whose port is closed: one RPC, both steps failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    dialled: list[str] = []
    calls: list[str] = []

    class Counting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def intercept_unary_unary(self, proceed: Any, details: Any, request: Any) -> Any:
            calls.append(details.method)
            return proceed(details, request)

    def factory(address: str) -> grpc.Channel:
        dialled.append(address)
        return grpc.intercept_channel(insecure_channel(address), Counting())

    view = agent("a", "n", [telemetry("A0"), telemetry("A1")])
    view = dataclasses.replace(view, endpoint=AgentEndpoint("a", dead, "n"))
    placed = device_views(PowerBudgetSpec(budget_w=2000), FleetSnapshot({"a": view}), None, {}, {})
    wanted = {"A0": Actuation(400.0), "A1": Actuation(400.0)}
    started = time.monotonic()
    actions = actuate(placed, wanted, factory)
    assert [(a.uuid, a.action) for a in actions] == [
        ("A0", "set-power-limit"),
        ("A1", "set-power-limit"),
    ]
    assert all(a.error and a.error.startswith("UNAVAILABLE") for a in actions)
    assert dialled == [dead]
    assert calls == ["/tessera.agent.v1.Control/SetPowerLimit"]  # once, not once per device
    assert time.monotonic() - started < CONTROL_TIMEOUT_S
    assert new_record(placed, wanted, actions, {}) == []  # nothing was capped


def test_caps_on_devices_the_budget_no_longer_covers_are_lifted_and_kept_until_they_are() -> None:
    snapshot = FleetSnapshot(
        {
            "a": agent("a", "node-a", [telemetry("A0")]),
            "b": agent("b", "node-b", [telemetry("B0", 400.0), telemetry("B1")]),
        }
    )
    record = {"B0": DeviceCap(uuid="B0", node="node-b", agent="b", power_limit_w=400.0)}
    spec = PowerBudgetSpec(budget_w=2000)
    placed = device_views(spec, snapshot, {"node-a"}, {}, record)  # node-b left the selector
    orphans = uncovered(snapshot, placed, record)
    assert [(p.view.uuid, p.view.in_force) for p in orphans] == [("B0", Actuation(400.0))]
    failed = [Action("B0", "b", "reset-power-limit", None, "UNAVAILABLE: down")]
    assert [c.uuid for c in new_record([*placed, *orphans], {}, failed, record)] == ["B0"]
    lifted = [Action("B0", "b", "reset-power-limit", None)]
    assert new_record([*placed, *orphans], {}, lifted, record) == []


def test_round_metrics_follow_the_caps_in_force_and_a_deleted_budget_leaves_no_series() -> None:
    name = "pb-metrics-unit"
    spec = PowerBudgetSpec(budget_w=1000.0)

    def decision(mode: Mode, draw_w: float) -> PowerDecision:
        return PowerDecision({}, mode, draw_w, draw_w - 50.0, spec.budget_w, (), "test")

    def value(metric: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(metric, {"budget": name, **labels})

    both = [
        DeviceCap(uuid="A0", node="node-a", power_limit_w=450.0),
        DeviceCap(uuid="A1", node="node-a", power_limit_w=500.0, sm_clock_max_mhz=990),
    ]
    export_metrics(name, spec, decision(Mode.CAPPING, 980.0), both, True, now_s=lambda: 1234.5)
    assert value("tessera_power_budget_draw_watts") == 980.0
    assert value("tessera_power_budget_headroom_watts") == 20.0
    assert value("tessera_power_budget_predicted_draw_watts") == 930.0
    assert value("tessera_power_budget_capped_devices") == 2.0
    assert value("tessera_power_budget_last_action_timestamp_seconds") == 1234.5
    assert [m for m in Mode if value("tessera_power_budget_mode", mode=m.value)] == [Mode.CAPPING]
    limit = "tessera_power_budget_device_power_limit_watts"
    lock = "tessera_power_budget_device_sm_clock_max_hertz"
    assert value(limit, node="node-a", device="A0") == 450.0
    assert value(lock, node="node-a", device="A1") == 990e6
    assert value(lock, node="node-a", device="A0") is None

    # A1's lock lifted, A0 released: their series go; a round without RPCs keeps the time.
    export_metrics(name, spec, decision(Mode.HOLDING, 900.0), both[1:2], False, lambda: 9.0)
    assert value(limit, node="node-a", device="A0") is None
    assert value(limit, node="node-a", device="A1") == 500.0
    assert value("tessera_power_budget_last_action_timestamp_seconds") == 1234.5
    assert value("tessera_power_budget_mode", mode="Capping") == 0.0
    assert value("tessera_power_budget_mode", mode="Holding") == 1.0

    forget_metrics(name)
    left = [
        sample
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.labels.get("budget") == name
    ]
    assert left == []
