"""The node agent's gRPC server on 127.0.0.1 with the simulated backend: telemetry streams,
control with its range checks, mutual TLS, health checking and restoring defaults."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from agent_support import Certs, make_certs, start_sim_agent, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.agents.client import AgentClient, insecure_channel
from tessera.agents.instance_stats import InstanceStats, InstanceStatsSource
from tessera.agents.server import CONTROL_SERVICE, TELEMETRY_SERVICE, AgentServer
from tessera.agents.sim_backend import SimBackend
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def backend() -> SimBackend:
    return SimBackend(device_count=2, node_name="node-a")


@pytest.fixture
def agent(certs: Certs, backend: SimBackend) -> Iterator[AgentServer]:
    server = start_sim_agent("node-a", tls=certs.server_tls(), telemetry=True, backend=backend)
    yield server
    server.stop(grace_s=0)


@pytest.fixture
def control(agent: AgentServer, certs: Certs) -> Iterator[AgentClient]:
    client = AgentClient(certs.client_tls().channel(f"127.0.0.1:{agent.port}"))
    yield client
    client.close()


def read_only(agent: AgentServer) -> grpc.Channel:
    return insecure_channel(f"127.0.0.1:{agent.telemetry_port}")


def first_messages(channel: grpc.Channel, count: int, **request: object) -> list:
    stub = agent_pb2_grpc.TelemetryStub(channel)
    call = stub.Watch(agent_pb2.WatchRequest(**request), timeout=20)
    messages = []
    for message in call:
        messages.append(message)
        if len(messages) == count:
            call.cancel()
            break
    return messages


class ScriptedEngine(InstanceStatsSource):
    """A test double of the engine: hands out numbered latency samples, each once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handed_out: list[float] = []
        self.calls = 0

    def instance_stats(self) -> Sequence[InstanceStats]:
        with self.lock:
            self.calls += 1
            ttft = (self.calls * 0.001, self.calls * 0.001 + 0.0005)
            self.handed_out.extend(ttft)
        return [
            InstanceStats(
                instance_id="decode-0",
                model="llama-3-8b",
                role="decode",
                device_uuids=("SIM-node-a-0",),
                queue_length=self.calls % 5,
                running_batch=8,
                kv_blocks_used=100,
                kv_blocks_free=900,
                tokens_per_s=1234.5,
                ttft_samples_s=ttft,
                tpot_samples_s=(0.02,),
                requests_completed_total=self.calls * 2,
                tokens_generated_total=self.calls * 100,
            )
        ]


def test_watch_streams_every_device_with_increasing_sequence(agent: AgentServer) -> None:
    with read_only(agent) as channel:
        messages = first_messages(channel, 3)
    assert [m.node_name for m in messages] == ["node-a"] * 3
    sequences = [m.sequence for m in messages]
    assert sequences == sorted(sequences) and len(set(sequences)) == 3
    for message in messages:
        assert {d.uuid for d in message.devices} == {"SIM-node-a-0", "SIM-node-a-1"}
        for device in message.devices:
            reading = agent.backend.info(device.uuid)
            assert device.power_limit_min_w == reading.power_limit_min_w
            assert device.HasField("power_w") and device.HasField("energy_j")
            assert not device.HasField("temperature_c")  # the simulator does not model it


def test_watch_filters_devices_and_refuses_unknown_ones(agent: AgentServer) -> None:
    with read_only(agent) as channel:
        [message] = first_messages(channel, 1, device_uuids=["SIM-node-a-1"])
        assert [d.uuid for d in message.devices] == ["SIM-node-a-1"]
        with pytest.raises(grpc.RpcError) as refused:
            first_messages(channel, 1, device_uuids=["GPU-elsewhere"])
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_latency_samples_reach_a_slow_stream_exactly_once(certs: Certs) -> None:
    """With min_interval_ms far above the sampling period the stream skips rounds; the samples
    of the skipped rounds must still arrive, and none twice."""
    engine = ScriptedEngine()
    agent = start_sim_agent("node-a", telemetry=True, interval_s=0.02, sources=[engine])
    try:
        with read_only(agent) as channel:
            messages = first_messages(channel, 4, min_interval_ms=150)
        delivered = [s for m in messages for i in m.instances for s in i.ttft_samples_s]
        with engine.lock:
            handed_out = list(engine.handed_out)
        # Round n handed out samples 2(n-1) and 2(n-1)+1: the stream must carry one unbroken
        # run of them, ending with the round of its last message, each sample once.
        start = handed_out.index(delivered[0])
        assert delivered == handed_out[start : start + len(delivered)]
        assert delivered[-1] == handed_out[2 * messages[-1].sequence - 1]
        assert messages[-1].sequence - messages[0].sequence > len(messages)  # rounds skipped
        instance = messages[-1].instances[0]
        assert (instance.instance_id, instance.role, instance.running_batch) == (
            "decode-0",
            "decode",
            8,
        )
    finally:
        agent.stop(grace_s=0)


def test_get_info_and_health(agent: AgentServer, certs: Certs) -> None:
    with certs.client_tls().channel(f"127.0.0.1:{agent.port}") as channel:
        info = AgentClient(channel).info()
        assert info.control_enabled and info.node_name == "node-a"
        assert [d.uuid for d in info.devices] == ["SIM-node-a-0", "SIM-node-a-1"]
        assert info.devices[0].power_limit_settable and info.devices[0].power_limit_max_w == 700
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", TELEMETRY_SERVICE, CONTROL_SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
    with read_only(agent) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=TELEMETRY_SERVICE), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_control_returns_the_value_in_force_and_telemetry_follows(
    agent: AgentServer, control: AgentClient
) -> None:
    response = control.set_power_limit("SIM-node-a-1", 450.0)
    assert response.power_limit_w == 450.0
    assert (response.power_limit_min_w, response.power_limit_max_w) == (200.0, 700.0)

    def limit_in_telemetry() -> float | None:
        with read_only(agent) as channel:
            [message] = first_messages(channel, 1, device_uuids=["SIM-node-a-1"])
        value = message.devices[0].power_limit_w
        return value if value == 450.0 else None

    wait_for(limit_in_telemetry, "the new limit in the telemetry stream")
    clocks = control.lock_clocks("SIM-node-a-1", 990, 990)
    assert clocks.locked and clocks.sm_clock_max_mhz == 990 and clocks.sm_clock_mhz == 990
    unlocked = control.reset_clocks("SIM-node-a-1")
    assert not unlocked.locked and not unlocked.HasField("sm_clock_max_mhz")
    assert control.reset_power_limit("SIM-node-a-1").power_limit_w == 700.0


@pytest.mark.parametrize("limit_w", [100.0, 199.9, 700.1, 5000.0, -50.0, math.nan])
def test_power_limit_out_of_range_is_invalid_argument(
    agent: AgentServer, control: AgentClient, backend: SimBackend, limit_w: float
) -> None:
    before = backend.read("SIM-node-a-0").power_limit_w
    with pytest.raises(grpc.RpcError) as refused:
        control.set_power_limit("SIM-node-a-0", limit_w)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[200, 700] W" in refused.value.details()
    assert backend.read("SIM-node-a-0").power_limit_w == before


def test_other_control_refusals_have_their_own_codes(control: AgentClient) -> None:
    cases = [
        (lambda: control.lock_clocks("SIM-node-a-0", 100, 200), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: control.lock_clocks("SIM-node-a-0", 1500, 990), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: control.set_power_limit("GPU-elsewhere", 400), grpc.StatusCode.NOT_FOUND),
        (lambda: control.set_power_limit("", 400), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code


def test_control_is_not_served_on_the_plaintext_port(agent: AgentServer) -> None:
    with read_only(agent) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            AgentClient(channel).set_power_limit("SIM-node-a-0", 400)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = AgentClient(channel).info()
    assert info.control_enabled  # the agent has Control, on its mTLS port only


def test_without_tls_there_is_no_control_at_all() -> None:
    agent = start_sim_agent("node-b")
    try:
        with insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            client = AgentClient(channel)
            assert not client.info().control_enabled
            with pytest.raises(grpc.RpcError) as refused:
                client.set_power_limit("SIM-node-b-0", 400)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        agent.stop(grace_s=0)


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA", "plaintext"])
def test_mtls_refuses_clients_without_a_trusted_certificate(
    agent: AgentServer, certs: Certs, client: str
) -> None:
    address = f"127.0.0.1:{agent.port}"
    channel = {
        "no certificate": lambda: certs.client_tls_without_cert().channel(address),
        "certificate from another CA": lambda: certs.rogue_client_tls().channel(address),
        "plaintext": lambda: insecure_channel(address),
    }[client]()
    with channel, pytest.raises(grpc.RpcError) as refused:
        AgentClient(channel, timeout_s=5).set_power_limit("SIM-node-a-0", 400)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert agent.backend.read("SIM-node-a-0").power_limit_w == 700.0


def test_shutdown_restores_what_the_agent_changed_and_nothing_else(
    certs: Certs, backend: SimBackend
) -> None:
    agent = start_sim_agent("node-a", tls=certs.server_tls(), backend=backend)
    backend.set_power_limit("SIM-node-a-1", 500)  # set by someone else: not the agent's to undo
    with certs.client_tls().channel(f"127.0.0.1:{agent.port}") as channel:
        client = AgentClient(channel)
        client.set_power_limit("SIM-node-a-0", 250)
        client.lock_clocks("SIM-node-a-0", 990, 990)
    assert backend.read("SIM-node-a-0").power_limit_w == 250
    failures = agent.stop(grace_s=0)
    assert failures == []
    restored = backend.read("SIM-node-a-0")
    assert restored.power_limit_w == 700 and restored.locked_sm_clock_max_mhz is None
    assert backend.read("SIM-node-a-1").power_limit_w == 500
    ok, why = agent.healthy()
    assert not ok and why == "stopping"


def test_reset_on_start_clears_caps_left_by_a_crashed_agent(certs: Certs, tmp_path: Path) -> None:
    backend = SimBackend(device_count=2, node_name="node-c")
    backend.set_power_limit("SIM-node-c-0", 300)
    backend.lock_sm_clocks("SIM-node-c-1", 990, 990)
    agent = AgentServer(
        backend,
        node_name="node-c",
        listen="127.0.0.1:0",
        tls=certs.server_tls(),
        reset_on_start=True,
    )
    agent.start()
    try:
        assert backend.read("SIM-node-c-0").power_limit_w == 700
        assert backend.read("SIM-node-c-1").locked_sm_clock_max_mhz is None
        assert agent.healthy()[0]
    finally:
        agent.stop(grace_s=0)
