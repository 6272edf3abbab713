"""Free loopback ports, for programs the tests start that cannot report the port they bound."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
