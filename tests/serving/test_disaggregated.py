"""Disaggregated serving end to end: `tessera serve --role prefill`, two `--role decode`
servers and `tessera router`, each its own process on a loopback port, against a colocated
`tessera serve` (the session's `server` fixture) on the same tiny checkpoint.

The prefill server runs with the test hook `--fault-corrupt-kv-every 4`, so one KV package in
four reaches a decode server with a flipped bit; those requests must still answer exactly the
colocated tokens (the decode server detects the corruption and computes the prompt itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from conftest import (
    CORPUS,
    SERVED_NAME,
    ServerProcess,
    free_port,
    start_server,
    stop_server,
    tessera_command,
)

CORRUPT_EVERY = 4
STREAM_DEADLINE_S = 20.0


@dataclass
class Deployment:
    prefill: ServerProcess
    decodes: list[ServerProcess]
    router: ServerProcess


def start_router(log: Path, prefill: list[str], decode: list[str]) -> ServerProcess:
    port = free_port()
    args = [*tessera_command(), "router", "--host=127.0.0.1", f"--port={port}"]
    args += [f"--prefill={url}" for url in prefill] + [f"--decode={url}" for url in decode]
    args += ["--probe-interval-s=0.25", "--probe-timeout-s=1", "--stream-timeout-s=10"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tessera router exited {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return ServerProcess(process, base_url, log)
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling /ready, with the deadline above
    process.kill()
    raise AssertionError(f"tessera router not ready: {log.read_text()}")


@pytest.fixture(scope="module")
def deployment(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("pd")
    with ThreadPoolExecutor(3) as pool:
        prefill_future = pool.submit(
            start_server,
            tiny_model,
            logs / "prefill.log",
            "--role=prefill",
            "--pool=prefill-cpu",
            f"--kv-port={free_port()}",
            f"--fault-corrupt-kv-every={CORRUPT_EVERY}",
        )
        decode_futures = [
            pool.submit(
                start_server,
                tiny_model,
                logs / f"decode{i}.log",
                "--role=decode",
                "--pool=decode-cpu",
            )
            for i in range(2)
        ]
        prefill = prefill_future.result()
        decodes = [future.result() for future in decode_futures]
    router = start_router(logs / "router.log", [prefill.base_url], [d.base_url for d in decodes])
    yield Deployment(prefill, decodes, router)
    for process in (router, prefill, *decodes):
        if process.process.poll() is None:
            stop_server(process)


def mixed_requests(count: int) -> list[tuple[str, dict[str, Any]]]:
    """Completions and chats, streamed and not, text and token-id prompts of many lengths."""
    lines = [line for line in CORPUS.splitlines() if line]
    requests: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        text = " ".join(lines[: 1 + i % len(lines)])[: 20 + 37 * i]
        common = {
            "model": SERVED_NAME,
            "max_tokens": 1 + (i * 7) % 24,
            "temperature": 0,
            "stream": i % 2 == 1,
            "return_token_ids": True,
            "ignore_eos": i % 3 == 0,
        }
        if i % 5 == 4:
            requests.append(
                (
                    "/v1/chat/completions",
                    {**common, "messages": [{"role": "user", "content": text}]},
                )
            )
        elif i % 5 == 3:
            tokens = [(7 * i + 3 * k) % 250 + 6 for k in range(5 + 11 * i % 90)]
            requests.append(("/v1/completions", {**common, "prompt": tokens}))
        else:
            requests.append(("/v1/completions", {**common, "prompt": text}))
    return requests


def call(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Token ids, text and finish reason of one answer (streamed or not), or its error."""
    if not body["stream"]:
        answer = httpx.post(f"{base_url}{path}", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        text = choice.get("text", choice.get("message", {}).get("content"))
        return {"tokens": choice["token_ids"], "text": text, "finish": choice["finish_reason"]}
    tokens: list[int] = []
    text, finish, error, done = "", None, None, False
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=60) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            choice = event["choices"][0]
            tokens += choice.get("token_ids") or []
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
    return {"tokens": tokens, "text": text, "finish": finish, "error": error, "done": done}


def test_fifty_mixed_requests_give_the_colocated_tokens(
    deployment: Deployment, server: ServerProcess
) -> None:
    requests = mixed_requests(50)
    with ThreadPoolExecutor(8) as pool:
        routed = list(pool.map(lambda r: call(deployment.router.base_url, *r), requests))
        colocated = list(pool.map(lambda r: call(server.base_url, *r), requests))
    for index, (got, want) in enumerate(zip(routed, colocated, strict=True)):
        assert got.get("error") is None, (index, got)
        assert (got["tokens"], got["text"], got["finish"]) == (
            want["tokens"],
            want["text"],
            want["finish"],
        ), (index, requests[index])
    received: dict[str, float] = {}
    for decode in deployment.decodes:
        for key, value in decode.metrics().items():
            if key.startswith("tessera:kv_transfer_received_total"):
                received[key] = received.get(key, 0.0) + value
    sent = deployment.prefill.metrics()
    corrupted_sent = (
        sent["tessera:kv_transfer_sent_total"] - sent.get("tessera:kv_transfer_bytes_total", 0) * 0
    )
    assert corrupted_sent >= 1
    print("received", received)
    assert any(v > 0 for v in received.values())
