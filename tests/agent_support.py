"""Helpers for the node-agent tests: certificates, free ports, polling, agents on loopback."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from ports import free_port  # noqa: F401  (tests import it from here too)
from tessera.agents.client import ClientTls
from tessera.agents.instance_stats import InstanceStatsSource
from tessera.agents.local_certs import make_ca as _ca
from tessera.agents.local_certs import make_leaf as _leaf
from tessera.agents.server import MAX_WATCH_STREAMS_PER_CLIENT, AgentServer, ServerTls
from tessera.agents.sim_backend import SimBackend

T = TypeVar("T")
SERVER_NAME = "tessera-agent"
# The identities the test certificates carry: the operator's (the chart's default allow-list
# entry for a release in tessera-system) and a same-CA workload that must not call Control.
OPERATOR_SAN = "spiffe://cluster.local/ns/tessera-system/sa/tessera-operator"
OPERATOR_DNS_SAN = "tessera-operator.tessera-system.svc"
INTRUDER_SAN = "spiffe://cluster.local/ns/tessera-system/sa/default"
INTRUDER_DNS_SAN = "intruder.tessera-system.svc"


def wait_for(
    probe: Callable[[], T | None], what: str, timeout_s: float = 15.0, every_s: float = 0.02
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


@dataclass(frozen=True)
class Certs:
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by another CA
    rogue_client_key: Path
    intruder_client_cert: Path  # signed by the CA, for another identity
    intruder_client_key: Path
    cn_only_client_cert: Path  # signed by the CA, the operator's DNS name as CN, no SAN
    cn_only_client_key: Path

    def server_tls(self, allowed_client_sans: Sequence[str] = (OPERATOR_SAN,)) -> ServerTls:
        return ServerTls.from_files(
            self.server_cert, self.server_key, self.ca, allowed_client_sans=allowed_client_sans
        )

    def client_tls(self) -> ClientTls:
        return ClientTls.from_files(self.ca, self.client_cert, self.client_key, SERVER_NAME)

    def client_tls_without_cert(self) -> ClientTls:
        return ClientTls.from_files(self.ca, None, None, SERVER_NAME)

    def rogue_client_tls(self) -> ClientTls:
        return ClientTls.from_files(
            self.ca, self.rogue_client_cert, self.rogue_client_key, SERVER_NAME
        )

    def intruder_client_tls(self) -> ClientTls:
        return ClientTls.from_files(
            self.ca, self.intruder_client_cert, self.intruder_client_key, SERVER_NAME
        )

    def cn_only_client_tls(self) -> ClientTls:
        return ClientTls.from_files(
            self.ca, self.cn_only_client_cert, self.cn_only_client_key, SERVER_NAME
        )


def make_certs(folder: Path) -> Certs:
    """A CA, an agent certificate for SERVER_NAME and 127.0.0.1, the operator's client
    certificate (OPERATOR_SAN and OPERATOR_DNS_SAN), two same-CA clients that are not the
    operator (INTRUDER_SAN and INTRUDER_DNS_SAN; the operator's DNS name as CN without SANs) and a
    client certificate from an unrelated CA (with the openssl binary)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    _ca("ca", folder)
    _ca("rogue-ca", folder)
    _leaf(
        "agent",
        "ca",
        f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        folder,
    )
    _leaf(
        "operator",
        "ca",
        f"subjectAltName=URI:{OPERATOR_SAN},DNS:{OPERATOR_DNS_SAN}\nextendedKeyUsage=clientAuth\n",
        folder,
    )
    _leaf(
        "intruder",
        "ca",
        f"subjectAltName=URI:{INTRUDER_SAN},DNS:{INTRUDER_DNS_SAN}\nextendedKeyUsage=clientAuth\n",
        folder,
    )
    _leaf("cn-only", "ca", "extendedKeyUsage=clientAuth\n", folder, common_name=OPERATOR_DNS_SAN)
    _leaf("rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n", folder)
    return Certs(
        folder=folder,
        ca=folder / "ca.pem",
        server_cert=folder / "agent.pem",
        server_key=folder / "agent.key",
        client_cert=folder / "operator.pem",
        client_key=folder / "operator.key",
        rogue_client_cert=folder / "rogue.pem",
        rogue_client_key=folder / "rogue.key",
        intruder_client_cert=folder / "intruder.pem",
        intruder_client_key=folder / "intruder.key",
        cn_only_client_cert=folder / "cn-only.pem",
        cn_only_client_key=folder / "cn-only.key",
    )


def start_sim_agent(
    node_name: str,
    *,
    tls: ServerTls | None = None,
    port: int = 0,
    telemetry: bool = False,
    interval_s: float = 0.05,
    sources: Sequence[InstanceStatsSource] = (),
    backend: SimBackend | None = None,
    max_watch_streams_per_client: int = MAX_WATCH_STREAMS_PER_CLIENT,
) -> AgentServer:
    """A started agent on 127.0.0.1 with the simulated backend (two devices by default)."""
    agent = AgentServer(
        backend or SimBackend(device_count=2, node_name=node_name),
        node_name=node_name,
        listen=f"127.0.0.1:{port}",
        tls=tls,
        telemetry_listen="127.0.0.1:0" if telemetry else None,
        sources=sources,
        interval_s=interval_s,
        max_watch_streams_per_client=max_watch_streams_per_client,
    )
    agent.start()
    return agent
