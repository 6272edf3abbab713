"""`tessera serve --tensor-parallel-size 2` as a real process (CPU, gloo): it serves the
single-device engine's greedy tokens, and it supervises its rank processes (a dead rank ends
the server with status 1; a stopped server leaves no rank behind)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import GREEDY_PROMPTS, ServerProcess, greedy, local_greedy, start_server, stop_server
from engine_helpers import process_running, wait_until


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def rank_pids(server: ServerProcess) -> list[int]:
    """The rank processes: children of the server's multiprocessing forkserver."""
    for child in children(server.process.pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            return sorted(children(child))
    return []


def test_tp2_serves_the_single_device_greedy_tokens_and_leaves_no_rank(
    tiny_model: Path, tmp_path: Path
) -> None:
    prompts = GREEDY_PROMPTS
    expected = local_greedy(tiny_model, prompts, 12)
    server = start_server(tiny_model, tmp_path / "serve.log", "--tensor-parallel-size=2")
    try:
        ranks = rank_pids(server)
        assert len(ranks) == 2 and all(process_running(pid) for pid in ranks)
        assert [greedy(server, prompt, 12) for prompt in prompts] == expected
    finally:
        stop_server(server)
    assert wait_until(lambda: not any(process_running(pid) for pid in ranks)), (
        "ranks outlived serve"
    )


def test_a_dead_rank_stops_the_server(tiny_model: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model, tmp_path / "serve.log", "--tensor-parallel-size=2")
    try:
        ranks = rank_pids(server)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        assert wait_until(lambda: server.process.poll() is not None), "serve outlived a rank"
        assert server.process.returncode == 1
        assert wait_until(lambda: not process_running(ranks[0]))
        assert "tensor-parallel rank" in server.log.read_text()
    finally:
        stop_server(server)
