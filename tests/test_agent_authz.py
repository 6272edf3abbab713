"""Control is authorised by the client certificate's identity, not by its CA alone.

The CA that signs the operator's certificate may sign other workloads' too (cert-manager, a
mesh); a same-CA client whose certificate lacks an allowed SAN is refused every Control RPC with
PERMISSION_DENIED, and the device stays untouched, while Telemetry and health stay open to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from agent_support import INTRUDER_SAN, OPERATOR_DNS_SAN, OPERATOR_SAN, Certs, make_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.agents.client import AgentClient, ClientTls
from tessera.agents.identity import AllowedSans, parse_san
from tessera.agents.server import AgentServer, ServerTls
from tessera.agents.sim_backend import SimBackend
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

DEVICE = "SIM-node-a-0"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@dataclass
class Secured:
    agent: AgentServer
    backend: SimBackend
    counted: list[tuple[str, grpc.StatusCode]]

    def client(self, tls: ClientTls) -> AgentClient:
        return AgentClient(tls.channel(f"127.0.0.1:{self.agent.port}"), timeout_s=10)


def secured_agent(certs: Certs, allowed: tuple[str, ...]) -> Iterator[Secured]:
    backend = SimBackend(device_count=2, node_name="node-a")
    counted: list[tuple[str, grpc.StatusCode]] = []
    agent = AgentServer(
        backend,
        node_name="node-a",
        listen="127.0.0.1:0",
        tls=certs.server_tls(allowed),
        interval_s=0.05,
        on_control=lambda rpc, code: counted.append((rpc, code)),
    )
    agent.start()
    yield Secured(agent, backend, counted)
    agent.stop(grace_s=0)


@pytest.fixture
def by_uri(certs: Certs) -> Iterator[Secured]:
    """Allows the operator's ServiceAccount identity, the chart's default."""
    yield from secured_agent(certs, (OPERATOR_SAN,))


@pytest.fixture
def by_dns(certs: Certs) -> Iterator[Secured]:
    yield from secured_agent(certs, (OPERATOR_DNS_SAN.upper(),))  # DNS names ignore case


def control_calls(client: AgentClient) -> dict[str, Callable[[], object]]:
    return {
        "SetPowerLimit": lambda: client.set_power_limit(DEVICE, 300),
        "ResetPowerLimit": lambda: client.reset_power_limit(DEVICE),
        "LockClocks": lambda: client.lock_clocks(DEVICE, 990, 990),
        "ResetClocks": lambda: client.reset_clocks(DEVICE),
    }


@pytest.mark.parametrize("allowed_by", ["by_uri", "by_dns"])
def test_the_allowed_identity_may_call_control(
    certs: Certs, allowed_by: str, request: pytest.FixtureRequest
) -> None:
    secured: Secured = request.getfixturevalue(allowed_by)
    client = secured.client(certs.client_tls())
    try:
        assert client.set_power_limit(DEVICE, 300).power_limit_w == 300
        assert client.lock_clocks(DEVICE, 990, 990).locked
    finally:
        client.close()
    assert secured.backend.read(DEVICE).power_limit_w == 300
    assert secured.counted == [
        ("SetPowerLimit", grpc.StatusCode.OK),
        ("LockClocks", grpc.StatusCode.OK),
    ]


@pytest.mark.parametrize("allowed_by", ["by_uri", "by_dns"])
@pytest.mark.parametrize(
    "who", ["another identity of the same CA", "the operator's DNS name as CN, no SAN"]
)
def test_a_same_ca_client_with_another_identity_is_refused_control_but_reads_telemetry(
    certs: Certs, allowed_by: str, who: str, request: pytest.FixtureRequest
) -> None:
    secured: Secured = request.getfixturevalue(allowed_by)
    tls = {
        "another identity of the same CA": certs.intruder_client_tls,
        "the operator's DNS name as CN, no SAN": certs.cn_only_client_tls,
    }[who]()
    client = secured.client(tls)
    try:
        for rpc, call in control_calls(client).items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, rpc
            assert "--control-allowed-sans" in refused.value.details()
        reading = secured.backend.read(DEVICE)
        assert reading.power_limit_w == 700 and reading.locked_sm_clock_max_mhz is None
        assert [d.uuid for d in client.info().devices] == [DEVICE, "SIM-node-a-1"]
        watch = agent_pb2_grpc.TelemetryStub(client.channel).Watch(
            agent_pb2.WatchRequest(), timeout=10
        )
        assert next(watch).node_name == "node-a"
        watch.cancel()
        health = health_pb2_grpc.HealthStub(client.channel)
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        client.close()
    assert secured.counted == [
        (rpc, grpc.StatusCode.PERMISSION_DENIED) for rpc in control_calls(client)
    ]


def test_refusals_are_logged_with_the_clients_identity(
    certs: Certs, by_uri: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    client = by_uri.client(certs.intruder_client_tls())
    try:
        with pytest.raises(grpc.RpcError):
            client.set_power_limit(DEVICE, 300)
    finally:
        client.close()
    [record] = [r for r in caplog.records if "PERMISSION_DENIED" in r.getMessage()]
    assert INTRUDER_SAN in record.getMessage() and OPERATOR_SAN in record.getMessage()


@pytest.mark.parametrize(
    ("entry", "kind", "value"),
    [
        (OPERATOR_SAN, "peer_uri", OPERATOR_SAN),
        ("Tessera-Operator.Tessera-System.svc", "peer_dns", "tessera-operator.tessera-system.svc"),
        (" spiffe://td/ns/a/sa/b ", "peer_uri", "spiffe://td/ns/a/sa/b"),
    ],
)
def test_allow_list_entries_parse_by_kind(entry: str, kind: str, value: str) -> None:
    assert parse_san(entry) == (kind, value)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "at least one allowed client SAN"),
        (["spiffe://a b"], "is not a URI SAN"),
        (["spiffe://td/*"], "is not a URI SAN"),
        (["*.tessera-system.svc"], "is neither a URI SAN"),
        (["-bad-.svc"], "is neither a URI SAN"),
        ([""], "is neither a URI SAN"),
        (["a" * 254], "at most 253 characters"),
    ],
)
def test_bad_allow_list_entries_are_refused_naming_them(
    entries: list[str], message: str, certs: Certs
) -> None:
    with pytest.raises(ValueError, match=message):
        AllowedSans.parse(entries)
    with pytest.raises(ValueError, match=message):
        ServerTls.from_files(
            certs.server_cert, certs.server_key, certs.ca, allowed_client_sans=entries
        )
