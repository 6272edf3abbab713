"""The PowerBudget controller against the real API server, with simulated-device agents over mTLS.

The agents are real gRPC servers on 127.0.0.1 (tests/agent_support.py) with the simulated
backend, whose devices draw and slow down under a power limit or clock lock as the measured H100
did; the test raises and lowers their load with `SimBackend.set_workload`. The agents report
serving instances (role, model) from a stand-in source, as an engine would; the instances name
ModelDeployments of the test's namespace, whose `priority` the controller reads from the server.
The operator runs in a thread (kopf and the collector, as `tessera operator` runs them), or, for
the kill test, as a `tessera operator` process configured through the chart's environment.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_support import SERVER_NAME, Certs, make_certs, start_sim_agent
from kubernetes.client.exceptions import ApiException
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    DEADLINE_S,
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    real_server_only,
    wait_for,
)
from operator_process import OperatorProcess
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_support import PROMETHEUS, running_prometheus
from tessera.agents.instance_stats import InstanceStats
from tessera.agents.server import AgentServer
from tessera.agents.sim_backend import SimBackend
from tessera.api.common import GROUP, VERSION
from tessera.operator.collector import AgentEndpoint, Collector, static_discovery

pytestmark = real_server_only(
    "kopf lifts a deleted PowerBudget's finalizer with a JSON patch that tests the "
    "resourceVersion, which the emulator answers with 500 JsonPatchTestFailed once status "
    "writes moved it, so no budget is ever finalized"
)

FULL_LOAD_W = 2 * (536.3 + 695.1)  # two nodes, a decode and a prefill device each, busy
DASHBOARD = Path(__file__).resolve().parent.parent / "helm/tessera/dashboards/tessera.json"
POWER_BUDGET_ROW = "Power budgets"
LIGHT = 0.3


@dataclass
class Serving:
    """What the engines on one node report: device i serves `instances[i]` (model, role)."""

    node: str
    instances: Sequence[tuple[str, str]]

    def instance_stats(self) -> list[InstanceStats]:
        return [
            InstanceStats(f"{self.node}-{i}", model, role, (f"SIM-{self.node}-{i}",))
            for i, (model, role) in enumerate(self.instances)
        ]


@dataclass
class Node:
    name: str
    backend: SimBackend
    agent: AgentServer
    serving: Serving

    def load(self, busy: float) -> None:
        for info, (_, role) in zip(self.backend.devices(), self.serving.instances, strict=True):
            self.backend.set_workload(info.uuid, role, busy)

    def state(self, index: int) -> tuple[float, int | None]:
        """(power limit, locked top clock) of device `index`, as the device has them."""
        reading = self.backend.read(f"SIM-{self.name}-{index}")
        return reading.power_limit_w or 0.0, reading.locked_sm_clock_max_mhz

    def capped(self, index: int) -> bool:
        limit, lock = self.state(index)
        return limit < 700.0 or lock is not None


def start_node(
    name: str, certs: Certs, instances: Sequence[tuple[str, str]], port: int = 0
) -> Node:
    backend = SimBackend(device_count=len(instances), node_name=name)
    serving = Serving(name, instances)
    agent = start_sim_agent(
        name, tls=certs.server_tls(), backend=backend, sources=[serving], port=port
    )
    node = Node(name, backend, agent, serving)
    node.load(LIGHT)
    return node


def mtls_collector(certs: Certs, nodes: Sequence[Node]) -> Collector:
    """A collector following `nodes`' agents over mTLS, quick to mark a silent one stale."""
    return Collector(
        static_discovery(
            [AgentEndpoint(f"agent-{n.name}", f"127.0.0.1:{n.agent.port}", n.name) for n in nodes]
        ),
        channel_factory=certs.client_tls().channel,
        stale_after_s=1.0,
        backoff_max_s=0.5,
    )


def operator_following(
    cluster: Cluster, namespace: str, certs: Certs, nodes: Sequence[Node]
) -> OperatorThread:
    """The operator in a thread with a private registry, following `nodes`."""
    return OperatorThread(
        cluster,
        namespace,
        agents=mtls_collector(certs, nodes),
        metrics_registry=CollectorRegistry(),
    ).start()


def budget_document(name: str, budget_w: float, interval_s: float = 0.2) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PowerBudget",
        "metadata": {"name": name},
        "spec": {"budgetW": budget_w, "controlIntervalSeconds": interval_s},
    }


def get_budget(cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return cluster.custom.get_cluster_custom_object(GROUP, VERSION, "powerbudgets", name)  # type: ignore[no-any-return]
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def delete_budget(cluster: Cluster, name: str, finalize: bool) -> None:
    """Delete the budget; with `finalize`, wait for the operator's delete handler, else drop
    the finalizer (no operator runs)."""
    with contextlib.suppress(ApiException):
        cluster.custom.delete_cluster_custom_object(GROUP, VERSION, "powerbudgets", name)
    if finalize:
        wait_for(lambda: get_budget(cluster, name) is None, f"PowerBudget {name} to be finalized")
    elif get_budget(cluster, name) is not None:
        with contextlib.suppress(ApiException):
            cluster.custom.patch_cluster_custom_object(
                GROUP, VERSION, "powerbudgets", name, {"metadata": {"finalizers": []}}
            )


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (get_budget(cluster, name) or {}).get("status") or {}


def condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any]:
    return next((c for c in status(cluster, name).get("conditions") or [] if c["type"] == kind), {})


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def two_nodes(cluster: Cluster, namespace: Namespace, certs: Certs) -> Iterator[tuple[Node, Node]]:
    """node-a serves a low-priority deployment (decode and prefill), node-b a high one."""
    suffix = secrets.token_hex(3)
    for name, priority in (("batch", "low"), ("chat", "high")):
        cluster.create_md(namespace.name, namespace.chat_deployment(name, priority=priority))
    low, high = f"{namespace.name}/batch", f"{namespace.name}/chat"
    a = start_node(f"a-{suffix}", certs, [(low, "decode"), (low, "prefill")])
    b = start_node(f"b-{suffix}", certs, [(high, "decode"), (high, "prefill")])
    try:
        yield a, b
    finally:
        a.agent.stop(grace_s=0)
        b.agent.stop(grace_s=0)


def test_a_breach_caps_low_priority_decode_first_and_caps_lift_below_the_threshold(
    cluster: Cluster, namespace: Namespace, certs: Certs, two_nodes: tuple[Node, Node]
) -> None:
    a, b = two_nodes
    name = f"pb-{namespace.name}"
    budget_w = FULL_LOAD_W / 0.97  # full load is 0.97 of it: just over capAbove (0.95)
    operator = operator_following(cluster, namespace.name, certs, [a, b])
    cluster.custom.create_cluster_custom_object(
        GROUP, VERSION, "powerbudgets", budget_document(name, budget_w)
    )
    try:
        light = wait_for(
            lambda: (s := status(cluster, name)).get("mode") == "Normal" and s,
            "the controller's first rounds at light load",
        )
        assert light["budgetW"] == pytest.approx(budget_w)
        assert light["drawW"] < 0.5 * budget_w and light["cappedDevices"] == 0
        assert condition(cluster, name, "Ready")["status"] == "True"

        a.load(1.0)
        b.load(1.0)
        wait_for(lambda: a.capped(0), "the low-priority decode device to be capped")
        capped = wait_for(
            lambda: (
                (s := status(cluster, name)).get("cappedDevices") == 1
                and s.get("mode") == "Holding"
                and s
            ),
            "status to show the one capped device, and the group back in the band",
        )
        assert [c["uuid"] for c in capped["capped"]] == [f"SIM-{a.name}-0"]
        assert not a.capped(1) and not b.capped(0) and not b.capped(1)
        assert capped["drawW"] <= budget_w * 0.95, "one cap brings the group under capAbove"
        assert capped["headroomW"] == pytest.approx(budget_w - capped["drawW"], abs=0.2)
        assert condition(cluster, name, "Capped")["status"] == "True"
        assert condition(cluster, name, "Capped")["observedGeneration"] == 1
        assert "SIM-" in capped["lastAction"] and capped["lastActionTime"]
        assert (
            REGISTRY.get_sample_value("tessera_power_budget_capped_devices", {"budget": name})
            == 1.0
        )

        def reasons() -> list[str]:
            selector = f"involvedObject.name={name}"
            events = cluster.core.list_event_for_all_namespaces(field_selector=selector).items
            return [e.reason for e in events]

        wait_for(lambda: "PowerCapped" in reasons(), "a PowerCapped event (kopf posts them later)")

        a.load(LIGHT)
        b.load(LIGHT)
        wait_for(lambda: not a.capped(0), "the cap to be lifted below uncapBelow")
        released = wait_for(
            lambda: (s := status(cluster, name)).get("cappedDevices") == 0 and s,
            "status to show no capped device",
        )
        assert released["capped"] == [] and released["mode"] == "Normal"
        assert not any(n.capped(i) for n in (a, b) for i in (0, 1))
        assert condition(cluster, name, "Capped")["status"] == "False"
    finally:
        delete_budget(cluster, name, finalize=True)
        operator.stop()


def test_stale_telemetry_holds_caps_and_a_returning_agent_is_brought_back_to_the_decision(
    cluster: Cluster, namespace: Namespace, certs: Certs, two_nodes: tuple[Node, Node]
) -> None:
    a, b = two_nodes
    name = f"pb-{namespace.name}"
    budget_w = FULL_LOAD_W / 0.97
    operator = operator_following(cluster, namespace.name, certs, [a, b])
    cluster.custom.create_cluster_custom_object(
        GROUP, VERSION, "powerbudgets", budget_document(name, budget_w)
    )
    try:
        a.load(1.0)
        b.load(1.0)
        wait_for(lambda: a.capped(0), "the low-priority decode device to be capped")
        # node-b's agent goes away: its devices are booked at their limit, the low tier is
        # slowed further to make room, and nothing already capped is released.
        port = b.agent.port
        b.agent.stop(grace_s=0)
        stale = wait_for(
            lambda: (
                condition(cluster, name, "TelemetryStale").get("status") == "True"
                and status(cluster, name)
            ),
            "the controller to see node-b stale",
        )
        assert f"SIM-{b.name}-0" in condition(cluster, name, "TelemetryStale")["message"]
        assert stale["drawW"] >= 2 * 700 + 350  # b's devices at TDP, at least a's floor
        wait_for(lambda: a.capped(1), "the low-priority prefill device to be slowed as well")
        assert a.capped(0)
        assert condition(cluster, name, "Ready")["reason"] == "ActuationFailed"
        # node-a's load falls: its caps lift only as far as b's unknown draw leaves room.
        a.load(LIGHT)
        wait_for(lambda: not a.capped(1), "a's prefill cap to lift")
        # node-b returns (its agent restarted: default limits, full load): the controller
        # measures it again and decides from fresh readings.
        b.agent = start_sim_agent(
            b.name, tls=certs.server_tls(), backend=b.backend, sources=[b.serving], port=port
        )
        wait_for(
            lambda: condition(cluster, name, "TelemetryStale").get("status") == "False",
            "node-b's telemetry to be fresh again",
        )
        settled = wait_for(
            lambda: (
                (s := status(cluster, name)).get("mode") in ("Normal", "Holding", "Releasing")
                and condition(cluster, name, "Ready").get("status") == "True"
                and s
            ),
            "the controller to settle on fresh readings",
        )
        assert settled["drawW"] <= budget_w * 0.95

        def consistent() -> bool:
            recorded = {c["uuid"] for c in status(cluster, name)["capped"]}
            return recorded == {f"SIM-{n.name}-{i}" for n in (a, b) for i in (0, 1) if n.capped(i)}

        wait_for(consistent, "the recorded caps to be exactly the caps in force")
    finally:
        delete_budget(cluster, name, finalize=True)
        operator.stop()


def test_the_operator_killed_mid_cap_and_restarted_leaves_caps_consistent(
    cluster: Cluster, namespace: Namespace, certs: Certs, tmp_path: Path
) -> None:
    """A `tessera operator` process (mTLS to one agent, as the chart configures it) is killed
    with caps in force; while it is down the agent restarts (its caps lost) and later the load
    falls. Each restarted operator starts from the status and the agent: it re-asserts the cap
    the decision still wants, then lifts every cap once the load is light."""
    cluster.create_md(namespace.name, namespace.chat_deployment("batch", priority="low"))
    cluster.create_md(namespace.name, namespace.chat_deployment("chat", priority="high"))
    low, high = f"{namespace.name}/batch", f"{namespace.name}/chat"
    instances = [(low, "decode"), (low, "prefill"), (high, "decode"), (high, "prefill")]
    node = start_node(f"k-{secrets.token_hex(3)}", certs, instances)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for source, target in (
        (certs.client_cert, "tls.crt"),
        (certs.client_key, "tls.key"),
        (certs.ca, "ca.crt"),
    ):
        (tls_dir / target).write_bytes(source.read_bytes())
    env = {
        "TESSERA_WATCH_NAMESPACES": namespace.name,
        "TESSERA_AGENT_SERVICE": "127.0.0.1",
        "TESSERA_AGENT_GRPC_PORT": str(node.agent.port),
        "TESSERA_AGENT_CONTROL": "true",
        "TESSERA_TLS_DIR": str(tls_dir),
        "TESSERA_AGENT_TLS_SERVER_NAME": SERVER_NAME,
        "TESSERA_LEADER_ELECTION": "false",
    }
    name = f"pb-{namespace.name}"
    budget_w = FULL_LOAD_W / 0.97
    cluster.custom.create_cluster_custom_object(
        GROUP, VERSION, "powerbudgets", budget_document(name, budget_w)
    )
    processes: list[OperatorProcess] = []

    def start(label: str) -> OperatorProcess:
        process = OperatorProcess(cluster, tmp_path, label, env)
        processes.append(process)
        wait_for(lambda: process.alive() and process.health(), f"{label}'s /healthz")
        return process

    try:
        first = start("operator-1")
        node.load(1.0)
        wait_for(lambda: node.capped(0), "the low-priority decode device to be capped")
        wait_for(lambda: status(cluster, name).get("cappedDevices") == 1, "status to record it")
        in_force = node.state(0)
        first.kill()  # SIGKILL, mid-cap: nothing is released
        assert node.capped(0)

        port = node.agent.port
        node.agent.stop(grace_s=0)  # an agent restores its devices' defaults when it stops
        assert not node.capped(0)
        node.agent = start_sim_agent(
            node.name,
            tls=certs.server_tls(),
            backend=node.backend,
            sources=[node.serving],
            port=port,
        )
        second = start("operator-2")
        wait_for(lambda: node.state(0) == in_force, "the restarted operator to re-assert the cap")
        assert [node.capped(i) for i in range(4)] == [True, False, False, False]
        second.kill()

        node.load(LIGHT)
        start("operator-3")
        wait_for(lambda: not node.capped(0), "the third operator to lift the recorded cap")
        wait_for(
            lambda: (
                status(cluster, name).get("cappedDevices") == 0
                and status(cluster, name).get("mode") == "Normal"
            ),
            "status to show no capped device",
        )
        assert not any(node.capped(i) for i in range(4))
        delete_budget(cluster, name, finalize=True)
    finally:
        for process in processes:
            process.kill()
        delete_budget(cluster, name, finalize=False)
        node.agent.stop(grace_s=0)
    for process in processes:
        assert "Traceback" not in process.output(), process.output()


def power_budget_panels() -> list[dict[str, Any]]:
    """The dashboard's panels in the PowerBudget row (from its row to the next row)."""
    panels, inside = [], False
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == POWER_BUDGET_ROW
        elif inside:
            panels.append(panel)
    return panels


def prometheus_query(port: int, expr: str) -> list[dict[str, Any]] | None:
    """The result vector of an instant query; None while Prometheus is not answering yet."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_a_real_prometheus_answers_every_power_budget_dashboard_panel(
    cluster: Cluster,
    namespace: Namespace,
    certs: Certs,
    two_nodes: tuple[Node, Node],
    tmp_path: Path,
) -> None:
    """The operator's /metrics (its process registry, as `tessera operator --metrics-port`
    serves it) scraped by a real Prometheus while a budget holds a cap (full load is 0.97 of
    it, over capAbove): each query of the dashboard's PowerBudget row, with the dashboard's
    variables filled in, returns a series for the budget. A per-device panel (power limits,
    clock locks) is checked when the status shows a device holding that kind of cap (the
    policy picks limits or locks by their cost)."""
    a, b = two_nodes
    name = f"pb-{namespace.name}"
    panels = power_budget_panels()
    assert len(panels) >= 8, "the PowerBudget row lost panels"
    operator = operator_following(cluster, namespace.name, certs, [a, b])
    metrics_server, metrics_thread = start_http_server(0, addr="127.0.0.1", registry=REGISTRY)
    cluster.custom.create_cluster_custom_object(
        GROUP, VERSION, "powerbudgets", budget_document(name, FULL_LOAD_W / 0.97)
    )
    try:
        a.load(1.0)
        b.load(1.0)
        wait_for(lambda: status(cluster, name).get("cappedDevices"), "a device to be capped")
        scrape = [
            {
                "job_name": "tessera-operator",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_server.server_port}"]}],
            }
        ]
        device_panels = {
            "tessera_power_budget_device_power_limit_watts": "powerLimitW",
            "tessera_power_budget_device_sm_clock_max_hertz": "smClockMaxMhz",
        }
        checked: set[str] = set()
        with running_prometheus(scrape, tmp_path) as prometheus:
            for panel in panels:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$budget", name)
                    expr = expr.replace("$__rate_interval", "10s")
                    held = device_panels.get(next((m for m in device_panels if m in expr), ""))
                    if held is not None:
                        capped = status(cluster, name).get("capped") or []
                        if not any(c.get(held) for c in capped):
                            continue  # no device holds this kind of cap
                        checked.add(held)

                    def answered(expr: str = expr) -> list[dict[str, Any]] | None:
                        prometheus.check_alive()
                        return prometheus_query(prometheus.port, expr) or None

                    result = wait_for(
                        answered, f"a series for panel {panel['title']!r}: {expr}", timeout_s=60
                    )
                    labelled = [r for r in result if "budget" in r["metric"]]
                    assert all(r["metric"]["budget"] == name for r in labelled), result
        assert checked, "no per-device cap panel was checked"
    finally:
        metrics_server.shutdown()
        metrics_thread.join(timeout=5)
        delete_budget(cluster, name, finalize=True)
        operator.stop()
