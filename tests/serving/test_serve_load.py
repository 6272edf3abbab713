"""`tessera serve` under more clients than it holds, and clients that leave mid-stream.

The server runs with MAX_NUM_SEQS running and MAX_WAITING waiting requests: beyond them a
request must get 429 with Retry-After at once, never hang. A client that disconnects must
have its request aborted and its KV blocks freed, which /metrics shows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx2 as httpx
import pytest
from conftest import MAX_NUM_SEQS, MAX_WAITING, ServerProcess, start_server, stop_server

CLIENTS = 100
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], deadline_s: float = 20.0, what: str = "") -> T:
    """Poll `condition` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling with the deadline above
    raise AssertionError(f"{what} not reached in {deadline_s} s")


def test_a_hundred_concurrent_clients_get_200_or_429_and_none_hangs(
    server: ServerProcess,
) -> None:
    body = {"prompt": "Hello there, how are you", "max_tokens": 24, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{server.base_url}/v1/completions", json=body)

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client) for _ in range(CLIENTS))), timeout=90
            )

    started = time.monotonic()
    responses = asyncio.run(all_at_once())
    elapsed = time.monotonic() - started
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= MAX_NUM_SEQS, statuses
    assert statuses[429] > 0, f"{CLIENTS} clients never filled a queue of {MAX_WAITING}"
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
        else:
            assert response.json()["usage"]["completion_tokens"] == 24
    print(f"{CLIENTS} clients: {dict(statuses)} in {elapsed:.2f} s")
    metrics = wait_for(lambda: idle(server), what="an idle engine after the burst")
    assert metrics["tessera:requests_rejected_total{reason=queue_full}"] >= statuses[429]


def idle(server: ServerProcess) -> dict[str, float] | None:
    metrics = server.metrics()
    busy = (
        metrics["vllm:num_requests_running"],
        metrics["vllm:num_requests_waiting"],
        metrics["vllm:kv_cache_usage_perc"],
    )
    return metrics if busy == (0, 0, 0) else None


def test_a_client_that_disconnects_mid_stream_frees_its_kv(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="an idle engine before the test")
    before = server.metrics()
    max_tokens = 1800
    body = {
        "prompt": [1, 30, 31, 32],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # held: a dropped iterator closes the connection
        data = 0
        for line in lines:
            data += line.startswith("data:")
            if data == 3:
                break
        during = server.metrics()
        assert during["vllm:num_requests_running"] == 1
        assert during["vllm:kv_cache_usage_perc"] > 0
    # leaving the block closed the connection mid-stream
    after = wait_for(lambda: idle(server), what="KV freed after the disconnect")
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 3 <= generated < max_tokens
    aborted = "tessera:requests_rejected_total{reason=aborted}"
    assert after[aborted] == before[aborted] + 1
    finished = "vllm:request_success_total{finished_reason=length}"
    assert after[finished] == before[finished]


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_kv(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="an idle engine before the test")
    before = server.metrics()
    body = {"prompt": [1, 50, 51], "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.5)
    after = wait_for(lambda: idle(server), what="KV freed after the client left")
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 1800
    aborted = "tessera:requests_rejected_total{reason=aborted}"
    assert after[aborted] == before[aborted] + 1


@pytest.fixture(scope="module")
def impatient_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A second server whose requests may run for half a second, queue included."""
    log = tmp_path_factory.mktemp("serve-timeout") / "serve.log"
    running = start_server(tiny_model, log, "--request-timeout-s=0.5")
    yield running
    stop_server(running)


def test_a_request_past_the_timeout_gets_504_and_frees_its_kv(
    impatient_server: ServerProcess,
) -> None:
    long = {"prompt": [1, 40, 41], "max_tokens": 1800, "ignore_eos": True}
    response = httpx.post(f"{impatient_server.base_url}/v1/completions", json=long, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"
    with httpx.stream(
        "POST",
        f"{impatient_server.base_url}/v1/completions",
        json={**long, "stream": True},
        timeout=30,
    ) as stream:
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout"
    metrics = wait_for(lambda: idle(impatient_server), what="KV freed after the timeouts")
    assert metrics["tessera:requests_rejected_total{reason=timeout}"] == 2
    short = httpx.post(
        f"{impatient_server.base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}
    )
    assert short.status_code == 200
