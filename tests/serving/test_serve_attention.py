"""`tessera serve --role attention` and `--attention-service` as real processes (CPU): a server
whose KV and attention live in an attention pod serves the local engine's greedy tokens over
HTTP, and the attention pod answers its probes."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx
from conftest import GREEDY_PROMPTS, greedy, local_greedy, start_server, stop_server
from ports import free_port


def test_a_server_with_offloaded_attention_serves_the_local_greedy_tokens(
    tiny_model: Path, tmp_path: Path
) -> None:
    prompts = GREEDY_PROMPTS
    expected = local_greedy(tiny_model, prompts, 12)
    session_port = free_port()
    worker = start_server(
        tiny_model, tmp_path / "attention.log", "--role=attention", f"--kv-port={session_port}"
    )
    try:
        assert httpx.get(f"{worker.base_url}/health", timeout=5).status_code == 200
        server = start_server(
            tiny_model,
            tmp_path / "decode.log",
            f"--attention-service=127.0.0.1:{session_port}",
        )
        try:
            got = [greedy(server, prompt, 12) for prompt in prompts]
        finally:
            stop_server(server)
        assert got == expected
        assert "attention session from" in worker.log.read_text()
    finally:
        stop_server(worker)
