"""Live migration between two `tessera serve` processes behind `tessera router`, each its own
process on a loopback port, against a colocated server (the session's `server` fixture) on the
same tiny checkpoint.

- a streamed request migrated mid-decode gives the client exactly the colocated tokens and text
  through one unbroken router stream (completions and chat);
- a migration aborted at each stage (a corrupted pre-copy or final package, a lost commit
  answer, the target killed during pre-copy or stop-and-copy, the source killed with blocks on
  the target) loses no request and leaves no KV block held (/metrics kv usage back to 0);
- a drain under load (scale-down) completes every in-flight request through the router, and
  the drained instance stops being ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from conftest import SERVED_NAME, ServerProcess, start_server, stop_server
from test_disaggregated import start_router

SERVE_FLAGS = ("--migration-test-faults", "--migration-attach-timeout-s=2", "--max-num-seqs=16")
MAX_TOKENS = 240
DEADLINE_S = 120.0


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess
    router: ServerProcess

    def servers(self) -> list[ServerProcess]:
        return [self.a, self.b]


def start_pair(model: Path, logs: Path) -> Pair:
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(
            lambda name: start_server(model, logs / f"{name}.log", *SERVE_FLAGS), ["a", "b"]
        )
    router = start_router(logs / "router.log", [], [a.base_url, b.base_url])
    return Pair(a, b, router)


def stop_pair(pair: Pair) -> None:
    for process in (pair.router, pair.a, pair.b):
        if process.process.poll() is None:
            stop_server(process)


@pytest.fixture(scope="module")
def pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    running = start_pair(tiny_model, tmp_path_factory.mktemp("migration"))
    yield running
    stop_pair(running)


@dataclass
class Stream:
    """One streamed request read in a thread: tokens, text, and when it has `min_tokens`."""

    base_url: str
    path: str
    body: dict[str, Any]
    min_tokens: int = 8
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    done: bool = False
    stream_id: str = ""
    roles: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            url = f"{self.base_url}{self.path}"
            with httpx.stream("POST", url, json=self.body, timeout=DEADLINE_S) as answer:
                if answer.status_code != 200:
                    self.error = f"{answer.status_code}: {answer.read()!r}"
                    return
                for line in answer.iter_lines():
                    self._line(line)
        except httpx.HTTPError as error:
            self.error = repr(error)
        finally:
            self.started.set()

    def _line(self, line: str) -> None:
        if line.startswith("event:"):
            self.error = f"a control event reached the client: {line}"
        if not line.startswith("data: "):
            return
        if line == "data: [DONE]":
            self.done = True
            return
        event = json.loads(line[6:])
        if "error" in event:
            self.error = event["error"]["message"]
            return
        self.stream_id = event["id"]
        choice = event["choices"][0]
        if choice.get("delta", {}).get("role"):
            self.roles += 1
        self.tokens += choice.get("token_ids") or []
        self.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        self.finish = choice.get("finish_reason") or self.finish
        if len(self.tokens) >= self.min_tokens:
            self.started.set()

    def join(self) -> Stream:
        assert self.thread is not None
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), "the stream did not end before the deadline"
        return self

    @property
    def request_id(self) -> str:
        return self.stream_id.split("-", 1)[1]  # cmpl-<id> or chatcmpl-<id>

    def result(self) -> tuple[list[int], str, str | None]:
        return self.tokens, self.text, self.finish


def request(index: int, chat: bool = False, max_tokens: int = MAX_TOKENS) -> tuple[str, dict]:
    text = f"Once upon a time a small robot number {index} learned to count tokens"
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stop": ["zzzz"],  # a stop string: the text is held back and must not be cut wrong
    }
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def colocated(server: ServerProcess, path: str, body: dict[str, Any]) -> Stream:
    return Stream(server.base_url, path, body).start().join()


def holder(pair: Pair, request_id: str) -> tuple[ServerProcess, ServerProcess]:
    """(the server that streams the request, the other)."""
    for source, target in ((pair.a, pair.b), (pair.b, pair.a)):
        if running_here(source, request_id):
            return source, target
    raise AssertionError(f"no server streams {request_id}")


def running_here(server: ServerProcess, request_id: str) -> bool:
    info = httpx.get(f"{server.base_url}/internal/migration", timeout=5).json()
    return request_id in info["streams"]


def migrate(source: ServerProcess, target: ServerProcess, request_id: str, **extra: Any) -> Any:
    return httpx.post(
        f"{source.base_url}/internal/migrate",
        json={"request_id": request_id, "target": target.base_url, **extra},
        timeout=DEADLINE_S,
    )


def kv_usage(server: ServerProcess) -> float:
    return server.metrics()["vllm:kv_cache_usage_perc"]


def until(condition: Any, what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)  # polling the servers' state, with the deadline above
    raise AssertionError(f"{what}: not within {deadline_s} s")


def migrations(server: ServerProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tessera:migrations_total":
                key = f"{sample.labels['direction']}_{sample.labels['outcome']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_a_request_migrated_mid_decode_streams_the_colocated_answer(
    pair: Pair, server: ServerProcess, chat: bool
) -> None:
    path, body = request(1 if chat else 2, chat)
    want = colocated(server, path, body)
    assert want.error is None and want.finish == "length"
    stream = Stream(pair.router.base_url, path, body, min_tokens=20).start()
    assert stream.started.wait(DEADLINE_S) and stream.error is None, stream.error
    source, target = holder(pair, stream.request_id)
    before = migrations(source).get("out_committed", 0)
    answer = migrate(source, target, stream.request_id)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["committed"] and report["precopy_stages"] >= 1, report
    assert 20 <= report["num_output_tokens"] < MAX_TOKENS
    stream.join()
    assert stream.error is None and stream.done, stream.error
    assert stream.result() == want.result()
    assert stream.roles == want.roles  # the chat role chunk came once, from the source
    assert migrations(source)["out_committed"] == before + 1
    until(lambda: kv_usage(source) == 0 and kv_usage(target) == 0, "KV freed on both")


FAULTS = [
    ("corrupt-precopy", "precopy"),
    ("corrupt-final", "commit"),
    ("drop-commit-answer", "commit"),
]


@pytest.mark.parametrize(("fault", "stage"), FAULTS, ids=[f for f, _ in FAULTS])
def test_an_aborted_migration_loses_no_request_and_leaks_no_block(
    pair: Pair, server: ServerProcess, fault: str, stage: str
) -> None:
    path, body = request(3)
    want = colocated(server, path, body)
    stream = Stream(pair.router.base_url, path, body, min_tokens=10).start()
    assert stream.started.wait(DEADLINE_S) and stream.error is None, stream.error
    source, target = holder(pair, stream.request_id)
    answer = migrate(source, target, stream.request_id, test_fault=fault)
    assert answer.status_code == 409, answer.text
    report = answer.json()
    assert not report["committed"] and report["stage"] == stage, report
    stream.join()
    assert stream.error is None and stream.done, stream.error
    assert stream.result() == want.result()
    # The target gave back what it held (after the attach timeout for the lost answer).
    until(lambda: kv_usage(source) == 0 and kv_usage(target) == 0, "KV freed on both")


def test_a_bad_migrate_call_is_a_400_naming_the_field(pair: Pair) -> None:
    for body, field_name in (
        ({"request_id": "x", "target": "ftp://nowhere"}, "target"),
        ({"target": pair.b.base_url}, "request_id"),
        ({"request_id": "x", "target": pair.b.base_url, "test_fault": "melt"}, "test_fault"),
    ):
        answer = httpx.post(f"{pair.a.base_url}/internal/migrate", json=body, timeout=5)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field_name
    answer = httpx.post(f"{pair.a.base_url}/internal/drain", json={"deadline_s": 0}, timeout=5)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "deadline_s"
    assert httpx.get(f"{pair.a.base_url}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize("fault", ["hold-precopy", "hold-final"])
def test_killing_the_target_mid_migration_leaves_the_request_on_the_source(
    pair: Pair, tiny_model: Path, tmp_path: Path, server: ServerProcess, fault: str
) -> None:
    victim = start_server(tiny_model, tmp_path / "victim.log", *SERVE_FLAGS)
    try:
        path, body = request(4, max_tokens=400)
        want = colocated(server, path, body)
        stream = Stream(pair.a.base_url, path, body, min_tokens=10).start()
        assert stream.started.wait(DEADLINE_S) and stream.error is None, stream.error
        result: dict[str, Any] = {}
        mover = threading.Thread(
            target=lambda: result.update(
                answer=migrate(pair.a, victim, stream.request_id, test_fault=fault)
            )
        )
        mover.start()
        until(lambda: kv_usage(victim) > 0, "pre-copied blocks on the target")
        os.kill(victim.process.pid, signal.SIGKILL)
        mover.join(DEADLINE_S)
        assert result["answer"].status_code == 409, result["answer"].text
        assert not result["answer"].json()["committed"]
        stream.join()
        assert stream.error is None and stream.done, stream.error
        assert stream.result() == want.result()
        until(lambda: kv_usage(pair.a) == 0, "KV freed on the source")
    finally:
        if victim.process.poll() is None:
            stop_server(victim)


def test_killing_the_source_mid_migration_frees_the_targets_blocks(
    pair: Pair, tiny_model: Path, tmp_path: Path
) -> None:
    victim = start_server(tiny_model, tmp_path / "victim.log", *SERVE_FLAGS)
    try:
        path, body = request(5, max_tokens=400)
        stream = Stream(victim.base_url, path, body, min_tokens=10).start()
        assert stream.started.wait(DEADLINE_S) and stream.error is None, stream.error

        def move() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its server is killed mid-answer
                migrate(victim, pair.b, stream.request_id, test_fault="hold-final")

        mover = threading.Thread(target=move, daemon=True)
        mover.start()
        until(lambda: kv_usage(pair.b) > 0, "pre-copied blocks on the target")
        os.kill(victim.process.pid, signal.SIGKILL)
        until(lambda: kv_usage(pair.b) == 0, "the target's held blocks freed")
        stream.join()
        assert stream.error is not None  # its server died: the client is told, no hang
        assert httpx.get(f"{pair.b.base_url}/ready", timeout=5).status_code == 200
        mover.join(DEADLINE_S)
    finally:
        if victim.process.poll() is None:
            stop_server(victim)


def test_a_drain_under_load_completes_every_request_through_the_router(
    tiny_model: Path, tmp_path: Path, server: ServerProcess
) -> None:
    local = start_pair(tiny_model, tmp_path)
    try:
        requests = [request(10 + i, chat=i % 3 == 2, max_tokens=300 + 20 * i) for i in range(6)]
        plain_path, plain = request(30, max_tokens=40)
        plain = {**plain, "stream": False}
        with ThreadPoolExecutor(4) as pool:
            wants = list(pool.map(lambda r: colocated(server, *r), requests))
        streams = [Stream(local.router.base_url, p, b, min_tokens=4).start() for p, b in requests]
        for stream in streams:
            assert stream.started.wait(DEADLINE_S) and stream.error is None, stream.error
        on_a = [s for s in streams if running_here(local.a, s.request_id)]
        assert on_a, "the router sent nothing to the instance to drain"
        with ThreadPoolExecutor(1) as pool:
            unstreamed = pool.submit(
                httpx.post, f"{local.a.base_url}{plain_path}", json=plain, timeout=DEADLINE_S
            )
            drain = httpx.post(
                f"{local.a.base_url}/internal/drain",
                json={"deadline_s": 30, "peers": [local.b.base_url]},
                timeout=DEADLINE_S,
            )
            assert unstreamed.result().status_code in (200, 503)
        assert drain.status_code == 200, drain.text
        report = drain.json()
        assert report["complete"] and report["left"] == [], report
        assert report["migrated"] >= 1, report
        assert httpx.get(f"{local.a.base_url}/ready", timeout=5).status_code == 503
        for stream, want in zip(streams, wants, strict=True):
            stream.join()
            assert stream.error is None and stream.done, stream.error
            assert stream.result() == want.result()
        # New requests go to the other instance (the router retries the drained one's 503).
        path, body = request(40, max_tokens=12)
        after = Stream(local.router.base_url, path, body, min_tokens=1).start().join()
        assert after.error is None and after.finish == "length"
        until(lambda: kv_usage(local.a) == 0 and kv_usage(local.b) == 0, "KV freed on both")
    finally:
        stop_pair(local)
