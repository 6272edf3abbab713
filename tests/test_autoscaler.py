"""The closed loop (operator/autoscaler.py): telemetry counters -> observed load, and against the
real API server: a rising observed rate scales the pool up at once, a falling one scales it down
only after the hysteresis delay, through the apply path (the Deployment's replicas change on the
server); the rendered serving pods carry the drain preStop hook.

Telemetry is handed to the controller as the collector's snapshot type, built by the test (as an
agent would report the instances' counters); the clock is the test's, so that the hysteresis
delay passes without waiting for it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from agent_support import start_sim_agent
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    wait_for,
)
from prometheus_client import CollectorRegistry
from tessera.agents.instance_stats import InstanceStats
from tessera.api.common import GROUP, VERSION, utc_now
from tessera.api.model_deployment import ModelDeploymentSpec, Plan, PoolRole
from tessera.operator import render
from tessera.operator.autoscaler import AutoscaleController, LoadWindow
from tessera.operator.collector import (
    AgentEndpoint,
    AgentStatus,
    AgentView,
    Collector,
    FleetSnapshot,
    InstanceTelemetry,
    static_discovery,
)
from tessera.operator.reconcile import Kube, reconcile


def instance(
    name: str, completed: int, tokens: int = 0, queued: int = 0, model: str = "chat"
) -> InstanceTelemetry:
    return InstanceTelemetry(
        instance_id=name,
        model=model,
        role="colocated",
        device_uuids=(),
        queue_length=queued,
        running_batch=0,
        kv_blocks_used=0,
        kv_blocks_free=0,
        tokens_per_s=0.0,
        ttft_samples_s=(),
        tpot_samples_s=(),
        requests_completed_total=completed,
        tokens_generated_total=tokens,
    )


def snapshot(
    *instances: InstanceTelemetry, status: AgentStatus = AgentStatus.FRESH
) -> FleetSnapshot:
    view = AgentView(
        endpoint=AgentEndpoint("agent-0", "127.0.0.1:1"),
        status=status,
        node_name="node-0",
        agent_version="test",
        schema_version=1,
        sequence=1,
        age_s=0.0,
        devices=(),
        instances=tuple(instances),
        device_errors={},
        reconnects=0,
        last_error=None,
    )
    return FleetSnapshot(agents={"agent-0": view})


# ---- the window -----------------------------------------------------------------------------


def test_the_rate_counts_finished_requests_and_the_growth_of_the_queue() -> None:
    window = LoadWindow(window_s=60.0)
    window.add(0.0, [instance("a", 100, 10_000), instance("b", 50, 5_000, queued=2)])
    assert window.observed() == (None, 0)  # one sample each: no rate yet
    window.add(10.0, [instance("a", 150, 15_000), instance("b", 70, 7_000, queued=12)])
    observed, measured = window.observed()
    assert measured == 2
    assert observed is not None
    # a: 50 finished in 10 s; b: 20 finished and 10 more waiting -> 3 req/s offered.
    assert observed.request_rate_per_second == pytest.approx(5.0 + 3.0)
    assert observed.mean_output_tokens == pytest.approx(7_000 / 70)
    assert observed.mean_prompt_tokens is None


def test_a_restarted_instance_counts_from_zero_and_old_samples_leave_the_window() -> None:
    window = LoadWindow(window_s=30.0)
    window.add(0.0, [instance("a", 1000, 99_000)])
    window.add(10.0, [instance("a", 40, 4_000)])  # restarted: counters began again
    observed, _ = window.observed()
    assert observed is not None and observed.request_rate_per_second == pytest.approx(4.0)
    window.add(100.0, [instance("a", 60, 6_000)])
    assert window.observed() == (None, 0)  # the earlier samples are older than the window


# ---- rendering ------------------------------------------------------------------------------


def test_serving_pods_drain_through_a_pre_stop_hook_bounded_by_the_grace_period() -> None:
    from api_samples import example_classes, plan_for, spec_of
    from test_operator_units import OWNER, validate_kubernetes

    spec = spec_of(
        servingMode="colocated", autoscaling={"enabled": True, "drainDeadlineSeconds": 40}
    )
    plan = plan_for(spec)
    children = render.render_children(OWNER, spec, plan, example_classes())
    for child in children:
        validate_kubernetes(child)
    [pod] = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "Deployment"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["tessera", "drain"]
    assert "--deadline-s=40" in command
    assert f"--peers=chat-colocated.{OWNER.namespace}.svc:{spec.engine.port}" in command
    assert pod["terminationGracePeriodSeconds"] > 40
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in (
        container["env"]
    )
    [peers] = [c for c in children if c["metadata"]["name"] == "chat-colocated"]
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["selector"]["tessera.dev/role"] == "colocated"

    disaggregated = spec_of(servingMode="disaggregated")
    split = plan_for(disaggregated)
    by_role = {
        c["metadata"]["labels"].get("tessera.dev/role"): c["spec"]["template"]["spec"]
        for c in render.render_children(OWNER, disaggregated, split, example_classes())
        if c["kind"] == "Deployment"
    }
    decode = by_role[PoolRole.DECODE.value]["containers"][0]["lifecycle"]["preStop"]
    assert f"--peers=chat-decode.{OWNER.namespace}.svc:8000" in decode["exec"]["command"]
    assert "lifecycle" not in by_role[PoolRole.PREFILL.value]["containers"][0]


# ---- against the API server -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Traffic:
    """Two instances whose completion counters advance at a chosen total rate."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rate = 0.0
        self.completed = 0.0
        self.at = clock.now

    def __call__(self) -> FleetSnapshot:
        elapsed = (self.clock.now - self.at).total_seconds()
        self.completed += self.rate * elapsed
        self.at = self.clock.now
        half = int(self.completed / 2)
        return snapshot(instance("chat-0", half, half * 200), instance("chat-1", half, half * 200))


def replicas_on_server(cluster: Cluster, namespace: str) -> int:
    [deployment] = [
        d
        for d in cluster.deployments(namespace, "tessera.dev/deployment=chat")
        if d["metadata"]["labels"].get("tessera.dev/role") == "colocated"
    ]
    replicas: int = deployment["spec"]["replicas"]
    return replicas


def reconciled_once(cluster: Cluster, namespace: str, document: dict[str, Any]) -> tuple[Kube, int]:
    """Create `document` (ModelDeployment "chat"), reconcile it once and record its status, as
    the operator would before the loop's first round; the Kube and the replicas it rendered."""
    cluster.create_md(namespace, document)
    kube = Kube(cluster.api_client)
    body = cluster.get_md(namespace, "chat")
    assert body is not None
    first = reconcile(kube, body, utc_now())
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "modeldeployments", "chat", {"status": first.status},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    return kube, replicas_on_server(cluster, namespace)


def test_observed_rate_scales_the_pool_up_at_once_and_down_after_the_delay(
    cluster: Cluster, namespace: Namespace
) -> None:
    namespace.create_classes("h100")
    document = namespace.chat_deployment(
        servingMode="colocated",
        autoscaling={
            "enabled": True,
            "intervalSeconds": 30,
            "windowSeconds": 60,
            "scaleDownDelaySeconds": 300,
        },
    )
    document["spec"]["traffic"]["requestRatePerSecond"] = 5.0
    kube, initial = reconciled_once(cluster, namespace.name, document)

    clock = Clock()
    traffic = Traffic(clock)
    lock = threading.Lock()
    controller = AutoscaleController(namespace.name, "chat", kube, traffic, lambda: lock, clock)

    def round_at(rate: float, seconds: float = 30.0) -> dict[str, Any]:
        traffic.rate = rate
        clock.advance(seconds)
        assert controller.round() == 30
        md = cluster.get_md(namespace.name, "chat")
        assert md is not None
        status: dict[str, Any] = md["status"]
        return status

    status = round_at(5.0)
    assert status["autoscaling"]["reason"].startswith("no telemetry")
    status = round_at(5.0)
    assert status["autoscaling"]["observedRequestRatePerSecond"] == pytest.approx(5.0, rel=0.05)
    assert replicas_on_server(cluster, namespace.name) == initial

    status = round_at(60.0)  # a spike: up in this round
    grown = replicas_on_server(cluster, namespace.name)
    assert grown > initial, status["autoscaling"]
    assert status["autoscaling"]["reason"].startswith("scale up")
    assert Plan.model_validate(status["plan"]).pools[0].replicas == grown
    assert status["autoscaling"]["replicas"] == {status["plan"]["pools"][0]["name"]: grown}
    scaled_at = status["autoscaling"]["lastScaleTime"]

    for _ in range(4):  # the load falls, but the delay has not passed: nothing shrinks
        status = round_at(3.0)
        assert replicas_on_server(cluster, namespace.name) == grown
    assert "deferred" in status["autoscaling"]["reason"]
    assert status["autoscaling"]["lastScaleTime"] == scaled_at

    since_scale = 4 * 30
    while since_scale + 30 < 300:
        status = round_at(3.0)
        since_scale += 30
        assert replicas_on_server(cluster, namespace.name) == grown, status["autoscaling"]
    status = round_at(3.0)  # 300 s since the scale-up: the delay has passed
    shrunk = replicas_on_server(cluster, namespace.name)
    assert shrunk < grown, status["autoscaling"]
    assert status["autoscaling"]["reason"].startswith("scale down")

    # The Deployment on the server keeps the drain hook of the rendered pods.
    [deployment] = [
        d
        for d in cluster.deployments(namespace.name, "tessera.dev/deployment=chat")
        if d["metadata"]["labels"].get("tessera.dev/role") == "colocated"
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][:2] == [
        "tessera",
        "drain",
    ]
    assert (
        pod["terminationGracePeriodSeconds"]
        > ModelDeploymentSpec.model_validate(document["spec"]).autoscaling.drain_deadline_seconds
    )
    # A reconcile now (e.g. after a spec edit) keeps the loop's replica count.
    again = reconcile(kube, cluster.get_md(namespace.name, "chat") or {}, utc_now())
    assert again.status["plan"]["pools"][0]["replicas"] == shrunk
    assert replicas_on_server(cluster, namespace.name) == shrunk


def test_no_telemetry_never_scales(cluster: Cluster, namespace: Namespace) -> None:
    namespace.create_classes("h100")
    document = namespace.chat_deployment(servingMode="colocated", autoscaling={"enabled": True})
    kube, initial = reconciled_once(cluster, namespace.name, document)
    clock = Clock()
    stale = lambda: snapshot(instance("chat-0", 10), status=AgentStatus.STALE)  # noqa: E731
    lock = threading.Lock()
    controller = AutoscaleController(namespace.name, "chat", kube, stale, lambda: lock, clock)
    for _ in range(3):
        clock.advance(1000)
        controller.round()
    md = cluster.get_md(namespace.name, "chat")
    assert md is not None
    assert md["status"]["autoscaling"]["reason"].startswith("no telemetry")
    assert md["status"]["autoscaling"]["instances"] == 0
    assert replicas_on_server(cluster, namespace.name) == initial


# ---- the daemon in the operator -------------------------------------------------------------


RATE = "observedRequestRatePerSecond"


class CountingEngine:
    """An `InstanceStatsSource` whose two instances finish requests at `rate` per second of real
    time (cumulative counters, as an engine reports them)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.rate = 0.0
        self.completed = 0.0
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def set_rate(self, rate: float) -> None:
        with self.lock:
            self._advance()
            self.rate = rate

    def _advance(self) -> None:
        now = time.monotonic()
        self.completed += self.rate * (now - self.at)
        self.at = now

    def instance_stats(self) -> list[InstanceStats]:
        with self.lock:
            self._advance()
            half = int(self.completed / 2)
        return [
            InstanceStats(f"engine-{i}", self.model, "colocated", (), 0, 0, 0, 0, 0.0, (), (),
                          half, half * 200)
            for i in range(2)
        ]  # fmt: skip


def test_the_operator_runs_the_loop_for_an_autoscaled_deployment(
    cluster: Cluster, namespace: Namespace
) -> None:
    """The registered kopf daemon, fed by a real agent's telemetry stream: a rising rate grows
    the pool's Deployment on the server."""
    namespace.create_classes("h100")
    document = namespace.chat_deployment(
        servingMode="colocated",
        autoscaling={"enabled": True, "intervalSeconds": 1, "windowSeconds": 4},
    )
    document["spec"]["traffic"]["requestRatePerSecond"] = 5.0
    engine = CountingEngine("chat")
    engine.set_rate(5.0)
    agent = start_sim_agent("node-a", sources=[engine])
    collector = Collector(
        static_discovery([AgentEndpoint("agent-a", f"127.0.0.1:{agent.port}", "node-a")]),
        stale_after_s=2.0,
        backoff_max_s=0.5,
    )
    operator = OperatorThread(
        cluster, namespace.name, agents=collector, metrics_registry=CollectorRegistry()
    )
    try:
        operator.start()
        cluster.create_md(namespace.name, document)

        def status() -> dict[str, Any] | None:
            md = cluster.get_md(namespace.name, "chat")
            return (md or {}).get("status")

        def observed() -> dict[str, Any] | None:
            current = status() or {}
            return current if (current.get("autoscaling") or {}).get(RATE) else None

        first = wait_for(observed, "the loop to observe the engine's rate")
        assert 0 < first["autoscaling"][RATE] < 20  # ~5 req/s, from a window of 1-s samples
        initial = replicas_on_server(cluster, namespace.name)
        engine.set_rate(80.0)
        grown = wait_for(
            lambda: (n := replicas_on_server(cluster, namespace.name)) > initial and n,
            "the rising rate to grow the pool",
        )
        wait_for(  # the status follows the apply
            lambda: Plan.model_validate((status() or {})["plan"]).pools[0].replicas >= grown,
            "status.plan to record the grown pool",
        )
        assert any(e.get("reason") == "Scaled" for e in cluster.events(namespace.name, "chat")), (
            "a Scaled event is posted"
        )
    finally:
        operator.stop()
        agent.stop()
