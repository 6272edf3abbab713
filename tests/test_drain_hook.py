"""`tessera drain`, the serving pods' preStop hook: it resolves its peers (less its own address)
and calls the local server's drain route; its exit status tells the kubelet how it went.

The server here is a loopback HTTP server that records the request and answers as
`POST /internal/drain` does (agents/serving/migration.py); the end-to-end drain of a real
`tessera serve` is tested with the migration itself (tests/serving/).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner
from tessera.agents.serving.drain_hook import DRAIN_PATH, drain_command, resolve_peers

from tessera.cli import main


class DrainServer:
    """Answers POST /internal/drain with `answer`; keeps what it was sent."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.received: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.received.append((self.path, json.loads(self.rfile.read(length))))
                body = json.dumps(outer.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> DrainServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(5)


@pytest.fixture
def complete_server() -> Iterator[DrainServer]:
    with DrainServer({"complete": True, "migrated": 3, "finished_here": 1, "left": []}) as s:
        yield s


def test_the_hook_drains_the_local_server_towards_its_peers(complete_server: DrainServer) -> None:
    port = complete_server.port
    result = CliRunner().invoke(
        main,
        ["drain", f"--port={port}", "--deadline-s=20", f"--peers=127.0.0.1:{port}"],
        env={"POD_IP": "10.255.0.9"},
    )
    assert result.exit_code == 0, result.output
    [(path, body)] = complete_server.received
    assert path == DRAIN_PATH
    assert body == {"deadline_s": 20.0, "peers": [f"http://127.0.0.1:{port}"]}
    assert json.loads(result.output)["migrated"] == 3


def test_the_pod_itself_is_never_its_own_peer(complete_server: DrainServer) -> None:
    port = complete_server.port
    assert resolve_peers(f"127.0.0.1:{port}", {"127.0.0.1"}) == []
    result = CliRunner().invoke(
        drain_command,
        [f"--port={port}", "--deadline-s=5", f"--peers=127.0.0.1:{port}"],
        env={"POD_IP": "127.0.0.1"},
    )
    assert result.exit_code == 0, result.output
    assert complete_server.received[0][1]["peers"] == []


def test_an_incomplete_or_unreachable_drain_fails_the_hook() -> None:
    with DrainServer({"complete": False, "left": ["7"]}) as server:
        result = CliRunner().invoke(drain_command, [f"--port={server.port}", "--deadline-s=1"])
        assert result.exit_code == 1
        assert server.received[0][1] == {"deadline_s": 1.0, "peers": []}
    port = server.port  # closed now
    result = CliRunner().invoke(drain_command, [f"--port={port}", "--deadline-s=1"])
    assert result.exit_code == 1
    assert "did not answer" in result.output


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--deadline-s=0"], "--deadline-s"),
        (["--deadline-s=4000"], "--deadline-s"),
        (["--deadline-s=5", "--port=0"], "--port"),
        (["--deadline-s=5", "--peers=no-port"], "--peers"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], named: str) -> None:
    result = CliRunner().invoke(drain_command, flags)
    assert result.exit_code == 2
    assert named in result.output
