"""`tessera agent` as a process, configured the way the Helm chart configures it (environment)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_support import OPERATOR_SAN, make_certs, wait_for
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
    env = {
        **chart_env,
        "TESSERA_AGENT_CONTROL": "true",
        "TESSERA_TLS_DIR": str(tls_dir),
        "TESSERA_AGENT_CONTROL_ALLOWED_SANS": OPERATOR_SAN,
    }
    agent = AgentProcess(env, tmp_path)
    try:
        ports = agent.ports()
        with certs.client_tls().channel(f"127.0.0.1:{ports['grpc']}") as channel:
            assert AgentClient(channel).set_power_limit("SIM-node-x-0", 350).power_limit_w == 350
        with certs.intruder_client_tls().channel(f"127.0.0.1:{ports['grpc']}") as channel:
            intruder = AgentClient(channel, timeout_s=10)
            with pytest.raises(grpc.RpcError) as refused:
                intruder.set_power_limit("SIM-node-x-0", 200)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert intruder.info().devices[0].uuid == "SIM-node-x-0"  # telemetry stays open
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


def run_agent(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera", "agent", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def tls_dir_with(tmp_path: Path, *names: str) -> str:
    folder = tmp_path / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("not checked before the agent starts\n")
    return str(folder)


# (arguments, what the one error line must say). Each of these started an agent, ignored the
# value or died with a traceback before the options were checked.
BAD_FLAGS: list[tuple[list[str], str]] = [
    (["--grpc-port", "70000"], "'--grpc-port': 70000 is not in the range 0<=x<=65535"),
    (["--grpc-port", "-1"], "'--grpc-port': -1 is not in the range 0<=x<=65535"),
    (["--metrics-port", "65536"], "'--metrics-port': 65536 is not in the range 0<=x<=65535"),
    (["--interval", "0"], "'--interval': 0.0 is not in the range 0.01<=x<=60.0"),
    (["--interval", "-1"], "'--interval': -1.0 is not in the range 0.01<=x<=60.0"),
    (["--interval", "nan"], "'--interval': nan is not a finite number in the range 0.01<=x<=60.0"),
    (["--interval", "inf"], "'--interval': inf is not"),
    (["--sim-devices", "0"], "'--sim-devices': 0 is not in the range 1<=x<=64"),
    (["--log-level", "bogus"], "'--log-level': 'bogus' is not one of 'debug', 'info'"),
    (["--bind", "999.1.1.1"], "'--bind': '999.1.1.1' is not an IPv4 or IPv6 address"),
    (["--node-name", " "], "'--node-name': ' ' is not a node name (1 to 253 characters"),
    (["--telemetry-port", "9000"], "--telemetry-port takes effect only with --control"),
    (["--control-allowed-sans", OPERATOR_SAN], "--control-allowed-sans takes effect only with"),
    (["--grpc-port", "9400"], "--metrics-port 9400 is also --grpc-port's"),
    (["--control", "--tls-dir", "{tls:complete}"], "--control needs --control-allowed-sans"),
    (
        ["--control", "--tls-dir", "{tls:key-only}", "--control-allowed-sans", OPERATOR_SAN],
        "lacks tls.crt, ca.crt (it must hold tls.crt, tls.key, ca.crt)",
    ),
    (
        ["--control", "--tls-dir", "{tls:complete}", "--control-allowed-sans", "spiffe://a b"],
        "'--control-allowed-sans': 'spiffe://a b' is not a URI SAN",
    ),
    (
        ["--control", "--tls-dir", "{tls:complete}", "--control-allowed-sans", "*.svc"],
        "'--control-allowed-sans': '*.svc' is neither a URI SAN",
    ),
    (
        ["--control", "--tls-dir", "{tls:complete}", "--control-allowed-sans", " , "],
        "'--control-allowed-sans': give at least one URI or DNS SAN",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_usage_error_line_naming_it(
    chart_env: dict, tmp_path: Path, args: list[str], message: str
) -> None:
    tls = {
        "{tls:complete}": tls_dir_with(tmp_path, "tls.crt", "tls.key", "ca.crt"),
        "{tls:key-only}": tls_dir_with(tmp_path / "partial", "tls.key"),
    }
    env = {**chart_env, "TESSERA_AGENT_METRICS_PORT": "9400", "TESSERA_AGENT_GRPC_PORT": "0"}
    done = run_agent([tls.get(arg, arg) for arg in args], env, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert message in errors[0]


def test_a_port_in_use_is_an_error_naming_the_flag(chart_env: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_agent(["--metrics-port", str(port)], chart_env, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot serve /metrics on 127.0.0.1:{port} (--bind, --metrics-port)" in done.stderr
