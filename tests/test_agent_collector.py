"""The operator's collector against real agents on 127.0.0.1 (simulated devices): it follows two
agents, marks one stale while it is down and fresh again once it is back, and exports its state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agent_support import Certs, free_port, make_certs, start_sim_agent, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tessera.agents.server import AgentServer
from tessera.agents.sim_backend import SimBackend
from tessera.operator.collector import (
    AgentEndpoint,
    AgentStatus,
    Collector,
    FleetSnapshot,
    collector_from_environment,
    dns_discovery,
    static_discovery,
)
from tessera.operator.operator_metrics import register_collector_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def two_agents() -> Iterator[dict[str, AgentServer]]:
    agents = {name: start_sim_agent(name) for name in ("node-a", "node-b")}
    yield agents
    for agent in agents.values():
        agent.stop(grace_s=0)


def endpoints(agents: dict[str, AgentServer]) -> list[AgentEndpoint]:
    return [AgentEndpoint(f"agent-{n}", f"127.0.0.1:{a.port}", n) for n, a in agents.items()]


def fast_collector(discover: object, **options: object) -> Collector:
    defaults: dict = {"stale_after_s": 3.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.3}
    return Collector(discover, **{**defaults, **options})  # type: ignore[arg-type]


def statuses(snapshot: FleetSnapshot) -> dict[str, AgentStatus]:
    return {name: view.status for name, view in snapshot.agents.items()}


def snapshot_when(
    collector: Collector, expected: dict[str, AgentStatus], what: str
) -> FleetSnapshot:
    """Poll the collector until its agents have exactly these statuses; that snapshot."""

    def probe() -> FleetSnapshot | None:
        snapshot = collector.snapshot()
        return snapshot if statuses(snapshot) == expected else None

    return wait_for(probe, what)


def test_collector_sees_two_agents_and_survives_one_restarting(
    two_agents: dict[str, AgentServer],
) -> None:
    collector = fast_collector(static_discovery(endpoints(two_agents)))
    collector.start()
    try:
        both_fresh = {"agent-node-a": AgentStatus.FRESH, "agent-node-b": AgentStatus.FRESH}
        snapshot = snapshot_when(collector, both_fresh, "both agents fresh")
        for name, view in snapshot.agents.items():
            assert view.node_name == name.removeprefix("agent-")
            assert {d.uuid for d in view.devices} == {
                f"SIM-{view.node_name}-0",
                f"SIM-{view.node_name}-1",
            }
            assert all(d.power_w is not None and d.power_w > 0 for d in view.devices)
        assert len(snapshot.fresh_devices()) == 4

        # Kill node-a's agent: it must turn stale while node-b stays fresh.
        port_a = two_agents["node-a"].port
        assert port_a is not None
        two_agents["node-a"].stop(grace_s=0)
        stale = snapshot_when(
            collector,
            {"agent-node-a": AgentStatus.STALE, "agent-node-b": AgentStatus.FRESH},
            "node-a stale, node-b fresh",
        )
        assert stale.agents["agent-node-a"].last_error
        assert [a.node_name for a, _ in stale.fresh_devices()] == ["node-b", "node-b"]
        # While down, reconnection attempts keep failing (with backoff) and it stays stale.
        wait_for(
            lambda: collector.snapshot().agents["agent-node-a"].reconnects >= 3,
            "reconnect attempts to the dead agent",
        )
        assert collector.snapshot().agents["agent-node-a"].status == AgentStatus.STALE

        # Restart it on the same port, with a third device so that its data is told apart from
        # the old agent's: fresh again, and the snapshot holds the new agent's devices.
        two_agents["node-a"] = start_sim_agent(
            "node-a", port=port_a, backend=SimBackend(device_count=3, node_name="node-a")
        )
        back = snapshot_when(collector, both_fresh, "node-a fresh again").agents["agent-node-a"]
        assert len(back.devices) == 3
        assert back.last_error is None
    finally:
        collector.stop()


def test_an_agent_that_goes_quiet_turns_stale() -> None:
    """The stream stays open but nothing arrives (an agent sampling every 60 s sends one round
    at start): after stale_after_s by the collector's clock it is stale."""
    clock = FakeClock()
    agent = start_sim_agent("quiet", interval_s=60.0)
    collector = fast_collector(
        static_discovery([AgentEndpoint("quiet", f"127.0.0.1:{agent.port}")]), clock=clock
    )
    collector.start()
    try:
        wait_for(lambda: statuses(collector.snapshot()) == {"quiet": AgentStatus.FRESH}, "fresh")
        clock.now += 2.0
        assert collector.snapshot().agents["quiet"].status == AgentStatus.FRESH
        clock.now += 2.0
        view = collector.snapshot().agents["quiet"]
        assert view.status == AgentStatus.STALE and view.age_s == pytest.approx(4.0)
    finally:
        collector.stop()
        agent.stop(grace_s=0)


def test_discovery_adds_and_drops_agents_and_unreachable_ones_stay_unknown(
    two_agents: dict[str, AgentServer],
) -> None:
    listed = endpoints(two_agents)[:1]
    dead = AgentEndpoint("agent-dead", f"127.0.0.1:{free_port()}")
    collector = fast_collector(lambda: [*listed, dead], rediscover_interval_s=0.05)
    collector.start()
    try:
        wait_for(
            lambda: (
                statuses(collector.snapshot())
                == {"agent-node-a": AgentStatus.FRESH, "agent-dead": AgentStatus.UNKNOWN}
            ),
            "node-a fresh, the dead agent unknown",
        )
        listed[:] = endpoints(two_agents)[1:]
        wait_for(
            lambda: (
                statuses(collector.snapshot())
                == {"agent-node-b": AgentStatus.FRESH, "agent-dead": AgentStatus.UNKNOWN}
            ),
            "node-a dropped, node-b added",
        )
        assert collector.snapshot().agents["agent-dead"].reconnects >= 1
    finally:
        collector.stop()


def test_collector_over_mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> None:
    certs: Certs = make_certs(tmp_path_factory.mktemp("certs"))
    agent = start_sim_agent("secure", tls=certs.server_tls())
    good = fast_collector(
        static_discovery([AgentEndpoint("secure", f"127.0.0.1:{agent.port}")]),
        channel_factory=certs.client_tls().channel,
    )
    refused = fast_collector(
        static_discovery([AgentEndpoint("secure", f"127.0.0.1:{agent.port}")]),
        channel_factory=certs.client_tls_without_cert().channel,
    )
    good.start()
    refused.start()
    try:
        wait_for(lambda: statuses(good.snapshot()) == {"secure": AgentStatus.FRESH}, "fresh")
        wait_for(lambda: refused.snapshot().agents["secure"].reconnects >= 2, "refused twice")
        assert refused.snapshot().agents["secure"].status == AgentStatus.UNKNOWN
    finally:
        good.stop()
        refused.stop()
        agent.stop(grace_s=0)


def test_collector_metrics(two_agents: dict[str, AgentServer]) -> None:
    collector = fast_collector(static_discovery(endpoints(two_agents)))
    registry = CollectorRegistry()
    register_collector_metrics(collector, registry)
    collector.start()
    try:
        wait_for(
            lambda: len(collector.snapshot().with_status(AgentStatus.FRESH)) == 2, "both fresh"
        )
        snapshot = collector.snapshot()
        families = {
            f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
    finally:
        collector.stop()
    by_status = {s.labels["status"]: s.value for s in families["tessera_collector_agents"].samples}
    assert by_status == {"Unknown": 0, "Fresh": 2, "Stale": 0}
    up = {s.labels["node"]: s.value for s in families["tessera_collector_agent_up"].samples}
    assert up == {"node-a": 1.0, "node-b": 1.0}
    # The simulated devices draw constant power, so the fleet sum is exact.
    [fleet] = families["tessera_fleet_power_watts"].samples
    assert fleet.value == pytest.approx(sum(d.power_w or 0 for _, d in snapshot.fresh_devices()))


def test_dns_discovery_and_environment() -> None:
    addresses = {e.address for e in dns_discovery("localhost", 50051)()}
    assert addresses & {"127.0.0.1:50051", "[::1]:50051"}
    collector = collector_from_environment(
        {"TESSERA_AGENT_SERVICE": "localhost", "TESSERA_AGENT_GRPC_PORT": "7"}
    )
    assert all(e.address.endswith(":7") for e in collector.discover())
    with pytest.raises(ValueError, match="TESSERA_TLS_DIR"):
        collector_from_environment(
            {"TESSERA_AGENT_SERVICE": "localhost", "TESSERA_AGENT_CONTROL": "true"}
        )
