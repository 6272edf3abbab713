"""`tessera drain`: a serving pod's preStop hook (operator/render.py renders it).

Kubernetes runs it in the pod before sending SIGTERM. It finds the pod's migration peers (the
addresses a headless Service's name resolves to, less the pod's own, `$POD_IP`), then calls the
local server's `POST /internal/drain` (agents/serving/migration.py) with the deadline and those
peers, and waits for its answer: the server turns unready at once, migrates every running
streamed request to a peer and answers when nothing is left or at the deadline. The kubelet
waits for the hook up to the pod's terminationGracePeriodSeconds, which the operator sets above
the deadline.

Exit status: 0 when the server drained completely, 1 when it answered incomplete or could not
be reached (the kubelet records a FailedPreStopHook event and goes on terminating the pod), 2 for
bad flags. Only the standard library is used: the hook runs in every serving image.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Any

import click

DRAIN_PATH = "/internal/drain"
"""agents/serving/migration.py's route (kept literal here: importing it would pull FastAPI and
the engine into a hook that only speaks HTTP)."""
MAX_DEADLINE_S = 3600.0
ANSWER_MARGIN_S = 10.0
"""How much longer than the deadline the hook waits for the server's answer."""


def resolve_peers(service: str, own_ips: set[str]) -> list[str]:
    """Base URLs of the pods a headless Service's `host:port` resolves to, without our own."""
    host, _, port = service.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {service!r}", param_hint="--peers")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []  # no ready peer: the drain only waits for the requests to finish
    addresses = sorted({str(info[4][0]) for info in infos} - own_ips)
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


def drain(port: int, deadline_s: float, peers: list[str]) -> dict[str, Any]:
    """The local server's drain answer."""
    body = json.dumps({"deadline_s": deadline_s, "peers": peers}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{DRAIN_PATH}",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=deadline_s + ANSWER_MARGIN_S) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


@click.command("drain")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="The local server's HTTP port.",
)
@click.option(
    "--deadline-s",
    type=click.FloatRange(0, MAX_DEADLINE_S, min_open=True),
    required=True,
    help="Longest the server spends migrating its requests away, seconds, in (0, 3600].",
)
@click.option(
    "--peers",
    "peers_service",
    default=None,
    help="HOST:PORT of a headless Service whose addresses are the migration peers.",
)
def drain_command(port: int, deadline_s: float, peers_service: str | None) -> None:
    """Drain this pod's server before it stops: migrate its running requests to its peers."""
    # The pod's IP from the downward API; without it, what the pod's hostname resolves to.
    own = {ip for ip in (os.environ.get("POD_IP") or _own_address(),) if ip}
    peers = resolve_peers(peers_service, own) if peers_service else []
    try:
        answer = drain(port, deadline_s, peers)
    except (urllib.error.URLError, OSError, ValueError) as error:
        click.echo(f"drain: the server on port {port} did not answer: {error}", err=True)
        sys.exit(1)
    click.echo(json.dumps({"peers": peers, **answer}))
    sys.exit(0 if answer.get("complete") else 1)


def _own_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
