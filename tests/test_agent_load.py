"""The agent under many open telemetry streams, and what its /healthz says about its gRPC server.

An idle Watch stream (an operator that opened one and reads slowly, or a leaked one) must cost no
worker: health checking and GetInfo keep answering within a short deadline however many are
open, and /healthz, which the kubelet's probes read, fails when the gRPC server does not serve.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from agent_support import Certs, make_certs, start_sim_agent, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.agents.client import AgentClient, insecure_channel
from tessera.agents.metrics import AgentMetrics
from tessera.agents.server import AgentServer
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc
from test_agent_prometheus import get as healthz

IDLE_STREAMS = 64  # four times the old worker pool
ANSWER_DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _channel(agent: AgentServer, certs: Certs, endpoint: str) -> grpc.Channel:
    if endpoint == "mtls":
        return certs.client_tls().channel(f"127.0.0.1:{agent.port}")
    return insecure_channel(f"127.0.0.1:{agent.port}")


@pytest.mark.parametrize("endpoint", ["plaintext", "mtls"])
def test_health_and_get_info_answer_under_many_idle_watch_streams(
    certs: Certs, endpoint: str
) -> None:
    agent = start_sim_agent(
        "node-a",
        tls=certs.server_tls() if endpoint == "mtls" else None,
        max_watch_streams_per_client=2 * IDLE_STREAMS,  # all of them come from 127.0.0.1
    )
    metrics = AgentMetrics("node-a", agent.backend.devices())
    metrics_port = metrics.serve("127.0.0.1", 0, healthy=agent.healthy)
    streams: list[grpc.Future] = []
    readers = futures.ThreadPoolExecutor(max_workers=IDLE_STREAMS)
    try:
        with _channel(agent, certs, endpoint) as channel:
            telemetry = agent_pb2_grpc.TelemetryStub(channel)
            # Each stream takes its first snapshot, then idles: one message per ten minutes.
            request = agent_pb2.WatchRequest(min_interval_ms=600_000)
            streams = [telemetry.Watch(request, timeout=120) for _ in range(IDLE_STREAMS)]
            first = [readers.submit(next, call) for call in streams]
            _, not_served = futures.wait(first, timeout=15)
            assert not not_served, f"{len(not_served)} of {IDLE_STREAMS} streams got no snapshot"
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_DEADLINE_S)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            info = AgentClient(channel, timeout_s=ANSWER_DEADLINE_S).info()
            assert info.node_name == "node-a" and len(info.devices) == 2
            one_more = telemetry.Watch(request, timeout=ANSWER_DEADLINE_S)
            assert next(one_more).node_name == "node-a"
            one_more.cancel()
            url = f"http://127.0.0.1:{metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=ANSWER_DEADLINE_S) as response:
                assert response.status == 200
    finally:
        for call in streams:
            call.cancel()
        readers.shutdown(wait=True)
        agent.stop(grace_s=0)
        metrics.close()


def test_one_client_may_hold_only_so_many_watch_streams() -> None:
    agent = start_sim_agent("node-a", max_watch_streams_per_client=3)
    try:
        with insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            telemetry = agent_pb2_grpc.TelemetryStub(channel)
            request = agent_pb2.WatchRequest(min_interval_ms=600_000)
            held = [telemetry.Watch(request, timeout=60) for _ in range(3)]
            for call in held:
                next(call)
            with pytest.raises(grpc.RpcError) as refused:
                next(telemetry.Watch(request, timeout=ANSWER_DEADLINE_S))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already holds 3 Watch streams" in refused.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_DEADLINE_S)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            held.pop().cancel()  # a closed stream frees its place

            def admitted() -> bool:
                call = telemetry.Watch(request, timeout=ANSWER_DEADLINE_S)
                try:
                    return next(call).node_name == "node-a"
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
                finally:
                    call.cancel()

            wait_for(admitted, "a stream in the freed place")
            for call in held:
                call.cancel()
    finally:
        agent.stop(grace_s=0)


@pytest.fixture
def probed() -> Iterator[tuple[AgentServer, str]]:
    agent = start_sim_agent("node-h")
    metrics = AgentMetrics("node-h", agent.backend.devices())
    port = metrics.serve("127.0.0.1", 0, healthy=agent.healthy)
    yield agent, f"http://127.0.0.1:{port}/healthz"
    agent.stop(grace_s=0)
    metrics.close()


def test_healthz_fails_when_the_grpc_server_has_stopped(probed: tuple[AgentServer, str]) -> None:
    agent, url = probed
    assert healthz(url)[0] == 200
    [server] = agent.grpc_servers
    agent.call_on_grpc_loop(server.stop(None)).result(timeout=10)
    with insecure_channel(f"127.0.0.1:{agent.port}") as channel, pytest.raises(grpc.RpcError):
        AgentClient(channel, timeout_s=ANSWER_DEADLINE_S).info()
    status, why = wait_for(
        lambda: (answer := healthz(url))[0] != 200 and answer, "/healthz to fail"
    )
    assert status == 503 and f"gRPC server on port {agent.port} has stopped" in why


def test_healthz_fails_while_the_grpc_loop_does_not_answer(
    probed: tuple[AgentServer, str],
) -> None:
    agent, url = probed
    release = threading.Event()

    async def wedge() -> None:
        release.wait(timeout=30)  # blocks the loop, as a handler stuck in a blocking call would

    try:
        agent.call_on_grpc_loop(wedge())
        status, why = wait_for(
            lambda: (answer := healthz(url))[0] != 200 and answer, "/healthz to fail"
        )
        assert status == 503 and "gRPC event loop did not answer" in why
    finally:
        release.set()
    wait_for(lambda: healthz(url)[0] == 200, "/healthz to recover")
