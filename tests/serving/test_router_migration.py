"""`tessera router` following a migrated stream, against scripted instances on loopback: the
source's part ends with the `tessera.migrated` event, the router attaches to the target and the
client sees one stream, every chunk once and in order, no control event. An instance that
answers 503 (draining) has its requests retried elsewhere. The real servers are in
test_migration.py."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tessera.agents.router import ATTACH_PATH, MIGRATED_EVENT
from test_router import router_for


def chunk(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'text': text}]})}\n\n".encode()


def migrated(target: str, request_id: str) -> bytes:
    data = {"target": target, "request_id": request_id, "resume": {"num_output_tokens": 2}}
    return f"event: {MIGRATED_EVENT}\ndata: {json.dumps(data)}\n\n".encode()


class Instance:
    """A scripted instance: /ready, /metrics, a stream on /v1/completions, and an attach."""

    def __init__(self, ready: int = 200) -> None:
        self.ready_status = ready
        self.generate_status = 200
        self.stream: list[bytes] = []
        self.attach_stream: list[bytes] = []
        self.attach_status = 200
        self.generations = 0
        self.attaches: list[dict[str, Any]] = []
        self.server: TestServer | None = None
        self.url = ""

    async def start(self) -> Instance:
        app = web.Application()
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post(ATTACH_PATH, self.attach)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        return self

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=self.ready_status)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 0\ntessera:kv_cache_blocks 100\n")

    async def _sse(self, request: web.Request, lines: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        await response.write_eof()
        return response

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.generations += 1
        if self.generate_status != 200:
            return web.json_response({"error": {"message": "draining"}}, status=503)
        return await self._sse(request, self.stream)

    async def attach(self, request: web.Request) -> web.StreamResponse:
        self.attaches.append(await request.json())
        if self.attach_status != 200:
            return web.json_response({"error": {"message": "gone"}}, status=self.attach_status)
        return await self._sse(request, self.attach_stream)


async def client_stream(router: TestServer) -> list[str]:
    lines: list[str] = []
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "hello", "stream": True}
        async with session.post(router.make_url("/v1/completions"), json=body) as answer:
            assert answer.status == 200
            async for line in answer.content:
                if line.strip():
                    lines.append(line.decode().strip())
    return lines


async def router_metric(router: TestServer, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(router.make_url("/metrics")) as answer,
    ):
        text = await answer.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.asyncio
async def test_the_router_follows_a_stream_across_two_migrations() -> None:
    first, second, third = Instance(), Instance(), Instance()
    for instance in (first, second, third):
        await instance.start()
    first.stream = [chunk("a"), chunk("b"), migrated(second.url, "r1")]
    second.attach_stream = [chunk("c"), migrated(third.url, "r1")]
    third.attach_stream = [chunk("d"), chunk("e"), b"data: [DONE]\n\n"]
    router = await router_for([], [first])
    lines = await client_stream(router)
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert texts == ["a", "b", "c", "d", "e"] and lines[-1] == "data: [DONE]"
    assert not any(MIGRATED_EVENT in line for line in lines)
    assert second.attaches == [{"request_id": "r1", "resume": {"num_output_tokens": 2}}]
    assert len(third.attaches) == 1
    assert await router_metric(router, "tessera_router_migrations_followed_total") == 2
    await router.close()


@pytest.mark.asyncio
async def test_a_failed_attach_ends_the_stream_with_an_error_not_a_hang() -> None:
    source, target = Instance(), Instance()
    await source.start()
    await target.start()
    source.stream = [chunk("a"), migrated(target.url, "r2")]
    target.attach_status = 404
    router = await router_for([], [source])
    lines = await client_stream(router)
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "a"
    assert "failed mid-stream" in lines[1] and lines[-1] == "data: [DONE]"
    await router.close()


@pytest.mark.asyncio
async def test_a_draining_instances_503_is_retried_on_another() -> None:
    draining, serving = Instance(), Instance()
    await draining.start()
    await serving.start()
    serving.stream = [chunk("ok"), b"data: [DONE]\n\n"]
    draining.generate_status = 503  # its /ready still says 200: the probe has not seen it yet
    router = await router_for([], [draining, serving], policy="round-robin")
    for _ in range(4):
        lines = await client_stream(router)
        assert lines[-1] == "data: [DONE]" and "ok" in lines[0]
    assert draining.generations >= 1 and serving.generations == 4
    await router.close()
