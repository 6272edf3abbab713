"""Talking to node agents: channels (plaintext or mutual TLS) and a typed Control client.

Used by the operator's collector and power policy, the tests and `tessera agent` itself. The
keepalive settings make a stream to an agent on a vanished node fail within seconds instead of
hanging until TCP gives up; the agent's server allows pings that often (SERVER_OPTIONS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from tessera.agents.proto_mapping import SCHEMA_VERSION
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes for a mutual-TLS client: the CA that signed the agents' certificates, and this
    client's certificate and key (None for a client without one, which agents refuse).

    `server_name` is the name the agents' certificate is issued for; agents are dialled by pod
    IP, so the name to check is given here rather than taken from the address.
    """

    ca: bytes
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls, ca: Path, cert: Path | None, key: Path | None, server_name: str | None = None
    ) -> ClientTls:
        return cls(
            ca.read_bytes(),
            cert.read_bytes() if cert else None,
            key.read_bytes() if key else None,
            server_name,
        )

    def channel(self, address: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(address, credentials, options=options)


def insecure_channel(address: str) -> grpc.Channel:
    """A plaintext channel: the agent's read-only telemetry endpoint only."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class AgentClient:
    """Typed calls on one agent. Errors arrive as grpc.RpcError with the agent's status code
    (INVALID_ARGUMENT for an out-of-range value, and so on; see agent.proto)."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 10.0) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self._telemetry = agent_pb2_grpc.TelemetryStub(channel)
        self._control = agent_pb2_grpc.ControlStub(channel)

    def info(self) -> agent_pb2.AgentInfo:
        request = agent_pb2.GetInfoRequest(schema_version=SCHEMA_VERSION)
        return self._telemetry.GetInfo(request, timeout=self.timeout_s)

    def set_power_limit(
        self, device_uuid: str, power_limit_w: float
    ) -> agent_pb2.PowerLimitResponse:
        request = agent_pb2.SetPowerLimitRequest(
            schema_version=SCHEMA_VERSION, device_uuid=device_uuid, power_limit_w=power_limit_w
        )
        return self._control.SetPowerLimit(request, timeout=self.timeout_s)

    def reset_power_limit(self, device_uuid: str) -> agent_pb2.PowerLimitResponse:
        request = agent_pb2.ResetPowerLimitRequest(
            schema_version=SCHEMA_VERSION, device_uuid=device_uuid
        )
        return self._control.ResetPowerLimit(request, timeout=self.timeout_s)

    def lock_clocks(self, device_uuid: str, min_mhz: int, max_mhz: int) -> agent_pb2.ClocksResponse:
        request = agent_pb2.LockClocksRequest(
            schema_version=SCHEMA_VERSION,
            device_uuid=device_uuid,
            sm_clock_min_mhz=min_mhz,
            sm_clock_max_mhz=max_mhz,
        )
        return self._control.LockClocks(request, timeout=self.timeout_s)

    def reset_clocks(self, device_uuid: str) -> agent_pb2.ClocksResponse:
        request = agent_pb2.ResetClocksRequest(
            schema_version=SCHEMA_VERSION, device_uuid=device_uuid
        )
        return self._control.ResetClocks(request, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()
