"""`tessera agent` as a process, configured the way the Helm chart configures it (environment)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_support import make_certs, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.agents.client import AgentClient, insecure_channel


class AgentProcess:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tessera", "agent"],
            env={**os.environ, **env},
            cwd=cwd,  # never the repository root: its operator/ would shadow the stdlib
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def ports(self) -> dict[str, int]:
        def probe() -> dict[str, int] | None:
            if self.process.poll() is not None:
                raise AssertionError("agent exited: " + "".join(self.lines))
            for line in self.lines:
                if match := re.search(
                    r"grpc port (\d+), telemetry port \S+, metrics port (\d+)", line
                ):
                    return {"grpc": int(match.group(1)), "metrics": int(match.group(2))}
            return None

        return wait_for(probe, "the agent's startup line", timeout_s=30)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return code


@pytest.fixture
def chart_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        "NODE_NAME": "node-x",
        "TESSERA_AGENT_BACKEND": "sim",
        "TESSERA_AGENT_BIND": "127.0.0.1",
        "TESSERA_AGENT_GRPC_PORT": "0",
        "TESSERA_AGENT_METRICS_PORT": "0",
        "TESSERA_LOG_LEVEL": "info",
    }


def test_read_only_agent_serves_health_telemetry_and_metrics(
    chart_env: dict, tmp_path: Path
) -> None:
    agent = AgentProcess({**chart_env, "TESSERA_AGENT_CONTROL": "false"}, tmp_path)
    try:
        ports = agent.ports()
        with insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            info = AgentClient(channel).info()
            assert info.node_name == "node-x" and not info.control_enabled
            assert len(info.devices) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/healthz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r'^tessera_device_power_watts\{[^}]*node="node-x"', text, re.MULTILINE)
    finally:
        assert agent.terminate() == 0


def test_control_agent_restores_defaults_on_sigterm(chart_env: dict, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    tls_dir = tmp_path / "tls"  # the layout of a cert-manager Secret mounted by the chart
    tls_dir.mkdir()
    shutil.copy(certs.server_cert, tls_dir / "tls.crt")
    shutil.copy(certs.server_key, tls_dir / "tls.key")
    shutil.copy(certs.ca, tls_dir / "ca.crt")
    env = {**chart_env, "TESSERA_AGENT_CONTROL": "true", "TESSERA_TLS_DIR": str(tls_dir)}
    agent = AgentProcess(env, tmp_path)
    try:
        ports = agent.ports()
        with certs.client_tls().channel(f"127.0.0.1:{ports['grpc']}") as channel:
            assert AgentClient(channel).set_power_limit("SIM-node-x-0", 350).power_limit_w == 350
        plaintext = insecure_channel(f"127.0.0.1:{ports['grpc']}")
        with plaintext, pytest.raises(grpc.RpcError):
            AgentClient(plaintext, timeout_s=5).info()  # plaintext on the mTLS port
    finally:
        assert agent.terminate() == 0
    log = "".join(agent.lines)
    assert "SIM-node-x-0: default power limit restored, 700.0 W in force" in log


def test_control_without_tls_is_a_usage_error(chart_env: dict, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tessera", "agent"],
        env={**os.environ, **chart_env, "TESSERA_AGENT_CONTROL": "true"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--control needs mutual TLS" in done.stderr
