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
import threading
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
    wait_ready,
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
    return wait_ready(process, port, log, "tessera router", deadline_s=30, every_s=0.1)


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


def call(
    base_url: str, path: str, body: dict[str, Any], started: threading.Event | None = None
) -> dict[str, Any]:
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
            if tokens and started is not None:
                started.set()
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
    received = outcomes(deployment.decodes, "tessera:kv_transfer_received_total")
    sent = outcomes([deployment.prefill], "tessera:kv_transfer_sent_total")
    # Every request but those ended at their first token pulled KV; one in CORRUPT_EVERY
    # packages was damaged by the test hook, and each of those was caught, not imported.
    assert sent.get("corrupted_by_test_hook", 0) >= 50 // (CORRUPT_EVERY * 2)
    assert received.get("corrupted", 0) == sent["corrupted_by_test_hook"]
    assert received.get("ok", 0) == sent["ok"] >= 20
    assert received.get("unavailable", 0) == 0
    assert sum(received.values()) == 50


def outcomes(servers: list[ServerProcess], name: str) -> dict[str, float]:
    """Samples of `name` summed over `servers`, by their outcome label."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for process in servers:
        text = httpx.get(f"{process.base_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


def router_instances(deployment: Deployment) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{deployment.router.base_url}/tessera/v1/instances", timeout=5)
    return {i["url"]: i for i in answer.json()["instances"]}


def test_killing_a_decode_server_mid_stream_ends_each_stream_within_a_deadline(
    deployment: Deployment,
) -> None:
    """Last in this module: it kills one of the deployment's decode servers."""
    urls = [d.base_url for d in deployment.decodes]
    before = {url: router_instances(deployment)[url]["dispatched"] for url in urls}
    max_tokens, count = 600, 4
    started = [threading.Event() for _ in range(count)]
    results: list[dict[str, Any]] = [{} for _ in range(count)]

    def stream(index: int) -> None:
        body = {
            "model": SERVED_NAME,
            "prompt": f"Tell me a story about robot number {index}",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        results[index] = call(deployment.router.base_url, "/v1/completions", body, started[index])

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(count)]
    for index, thread in enumerate(threads):
        thread.start()
        assert started[index].wait(20), f"stream {index} sent no first token"
    # The victim is the decode server that holds the most of these streams (at least one).
    now = router_instances(deployment)
    streams_on = {url: now[url]["dispatched"] - before[url] for url in urls}
    victim = max(urls, key=lambda url: streams_on[url])
    (survivor,) = (url for url in urls if url != victim)
    on_victim = streams_on[victim]
    assert on_victim >= 1
    os.kill(deployment.decodes[urls.index(victim)].process.pid, signal.SIGKILL)
    killed = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, STREAM_DEADLINE_S - (time.monotonic() - killed)))
    assert not any(t.is_alive() for t in threads), "a client still waits past the deadline"
    errors = [r for r in results if r["error"]]
    for result in results:
        assert result["done"], result  # every stream ends with [DONE]
        if not result["error"]:
            # (token ids of deltas whose text is empty are not streamed, colocated or not)
            assert result["finish"] == "length" and len(result["tokens"]) > max_tokens // 2
        else:
            assert "failed mid-stream" in result["error"]
    assert len(errors) == on_victim, (on_victim, results)
    # The router stops sending there: out within seconds, later requests all served elsewhere.
    deadline = time.monotonic() + 5
    while router_instances(deployment)[victim]["healthy"] and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the router's view, with the deadline above
    assert not router_instances(deployment)[victim]["healthy"]
    served_before = router_instances(deployment)[survivor]["dispatched"]
    for path, body in mixed_requests(6):
        assert call(deployment.router.base_url, path, body).get("error") is None
    assert router_instances(deployment)[survivor]["dispatched"] == served_before + 6
