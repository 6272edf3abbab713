"""The operator follows node-agent telemetry when its environment names the agents (as the Helm
chart's does), exports it with its own metrics, and stops following when it stops.

The agent is a real gRPC server on 127.0.0.1 with simulated devices (tests/agent_support.py); the
operator runs against the emulator, or the cluster of $TESSERA_TEST_KUBECONFIG, as in
test_operator_cluster.py. "127.0.0.1" stands for the agents' headless Service: it resolves to
exactly one address, the agent's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import make_certs, start_sim_agent
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    DEADLINE_S,
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    wait_for,
)
from operator_process import OperatorProcess, reconciled, sample
from prometheus_client import CollectorRegistry
from tessera.agents.server import AgentServer
from tessera.operator.collector import (
    COLLECTOR_ENVIRONMENT,
    Collector,
    collector_from_environment,
)

NODE = "node-x"
AGENT = {"agent": "127.0.0.1", "node": NODE}  # labels of the agent's collector metrics


@pytest.fixture
def agent() -> Iterator[AgentServer]:
    server = start_sim_agent(NODE)
    yield server
    server.stop(grace_s=0)


def agents_environment(agent: AgentServer) -> dict[str, str]:
    return {
        "TESSERA_AGENT_SERVICE": "127.0.0.1",
        "TESSERA_AGENT_GRPC_PORT": str(agent.port),
        "TESSERA_AGENT_CONTROL": "false",
    }


def collector_threads() -> set[threading.Thread]:
    return {
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("tessera-watch-") or thread.name == "tessera-discovery"
    }


def test_the_operator_runs_the_collector_and_exports_it_while_it_runs(
    cluster: Cluster, namespace: Namespace, agent: AgentServer
) -> None:
    before = collector_threads()
    collector = collector_from_environment(agents_environment(agent))
    registry = CollectorRegistry()
    running = OperatorThread(
        cluster, namespace.name, agents=collector, metrics_registry=registry
    ).start()
    try:
        wait_for(
            lambda: registry.get_sample_value("tessera_collector_agent_up", AGENT) == 1.0,
            "the operator's collector to export the agent as up",
        )
        [view] = collector.snapshot().agents.values()
        assert {d.uuid for d in view.devices} == {f"SIM-{NODE}-0", f"SIM-{NODE}-1"}
        power_w = registry.get_sample_value("tessera_fleet_power_watts")
        assert power_w is not None and power_w > 0
        assert power_w == pytest.approx(sum(d.power_w or 0 for d in view.devices))
        assert collector_threads() - before, "the collector follows the agent on its own thread"
    finally:
        running.stop()
    assert registry.get_sample_value("tessera_collector_agents", {"status": "Fresh"}) is None
    assert collector_threads() <= before, "the collector's threads outlived the operator"


def test_tessera_operator_in_the_charts_environment_follows_the_agents(
    cluster: Cluster, namespace: Namespace, agent: AgentServer, tmp_path: Path
) -> None:
    env = {
        **agents_environment(agent),
        "TESSERA_WATCH_NAMESPACES": namespace.name,
        "TESSERA_LEADER_ELECTION": "false",
        "TESSERA_LOG_LEVEL": "info",
    }
    operator = OperatorProcess(cluster, tmp_path, "operator", env)
    try:
        wait_for(lambda: operator.alive() and operator.health(), "the operator's /healthz")
        metrics = wait_for(
            lambda: (
                (text := operator.metrics())
                and sample(text, "tessera_collector_agent_up", **AGENT) == 1.0
                and text
            ),
            "the operator's /metrics to show the agent up",
        )
        assert sample(metrics, "tessera_collector_agents", status="Fresh") == 1.0
        power_w = sample(metrics, "tessera_fleet_power_watts")
        assert power_w is not None and power_w > 0
        namespace.create_classes("l40s")
        cluster.create_md(namespace.name, namespace.chat_deployment())
        reconciled(cluster, namespace, 1)  # kopf runs beside the collector
        assert operator.terminate() == 0
    finally:
        operator.kill()
    output = operator.output()
    assert "Traceback" not in output, output


def test_without_agents_the_operator_runs_as_before_and_exports_no_collector_metrics(
    cluster: Cluster, namespace: Namespace, tmp_path: Path
) -> None:
    operator = OperatorProcess(
        cluster, tmp_path, "operator", {"TESSERA_WATCH_NAMESPACES": namespace.name}
    )
    try:
        wait_for(lambda: operator.alive() and operator.health(), "the operator's /healthz")
        namespace.create_classes("l40s")
        cluster.create_md(namespace.name, namespace.chat_deployment())
        reconciled(cluster, namespace, 1)
        metrics = wait_for(operator.metrics, "the operator's /metrics")
        assert "tessera_operator_reconciles_total" in metrics
        assert "tessera_collector_" not in metrics and "tessera_fleet_" not in metrics
        assert operator.terminate() == 0
    finally:
        operator.kill()
    output = operator.output()
    assert "TESSERA_AGENT_SERVICE is not set" in output, output
    assert "Traceback" not in output, output


def test_collector_environment_names_every_variable_the_collector_reads(tmp_path: Path) -> None:
    """COLLECTOR_ENVIRONMENT is what the chart's contract is checked on: it must be complete."""
    certs = make_certs(tmp_path / "certs")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for source, name in (
        (certs.client_cert, "tls.crt"),
        (certs.client_key, "tls.key"),
        (certs.ca, "ca.crt"),
    ):
        (tls_dir / name).write_bytes(source.read_bytes())

    class Recording(dict[str, str]):
        def __init__(self, **values: str) -> None:
            super().__init__(values)
            self.read: set[str] = set()

        def __getitem__(self, key: str) -> str:
            self.read.add(key)
            return super().__getitem__(key)

        def get(self, key: str, default: Any = None) -> Any:
            self.read.add(key)
            return super().get(key, default)

    environ = Recording(
        TESSERA_AGENT_SERVICE="tessera-agent.tessera-system.svc",
        TESSERA_AGENT_GRPC_PORT="50051",
        TESSERA_AGENT_CONTROL="true",
        TESSERA_TLS_DIR=str(tls_dir),
        TESSERA_AGENT_TLS_SERVER_NAME="tessera-agent",
    )
    assert isinstance(collector_from_environment(environ), Collector)
    assert environ.read == set(COLLECTOR_ENVIRONMENT) == set(environ)
