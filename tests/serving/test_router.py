"""`tessera router`'s decisions against scripted instances on loopback (aiohttp servers in this
process that answer /ready, /metrics and the OpenAI routes as the test says): the router is the
real one. Load-aware dispatch, prefill retry elsewhere, an instance marked out when it stops
answering, and a stream whose decode instance dies or stalls ending with an error event within
a deadline. The real engine processes are in test_disaggregated.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ports import free_port
from tessera.agents.router import PREFILL_HEADER
from tessera.agents.router.instances import Resolver, instance_url, resolve_addresses
from tessera.agents.router.proxy import Router, RouterConfig


@dataclass
class Scripted:
    """One fake engine instance: its load, and how it answers a generation."""

    kv_usage: float = 0.0
    waiting: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    answer: Callable[[web.Request], Any] | None = None
    server: TestServer | None = None
    url: str = ""
    ready_delay_s: float = 0.0
    """How long /ready takes (an event loop busy with many streams)."""

    def app(self) -> web.Application:
        async def ready(request: web.Request) -> web.Response:
            await asyncio.sleep(self.ready_delay_s)  # the instance is slow, not a test wait
            return web.json_response({"status": "ready"})

        async def metrics(request: web.Request) -> web.Response:
            text = (
                f"vllm:num_requests_waiting {self.waiting}\nvllm:num_requests_running 0\n"
                f"vllm:kv_cache_usage_perc {self.kv_usage}\ntessera:kv_cache_blocks 100\n"
            )
            return web.Response(text=text)

        async def generate(request: web.Request) -> Any:
            self.seen.append(dict(request.headers))
            if self.answer is not None:
                return await self.answer(request)
            return web.json_response({"choices": [{"text": "ok", "finish_reason": "stop"}]})

        app = web.Application()
        app.router.add_get("/ready", ready)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/completions", generate)
        return app


async def start(*instances: Scripted, host: str = "127.0.0.1", port: int | None = None) -> None:
    for instance in instances:
        instance.server = TestServer(instance.app(), host=host, port=port)
        await instance.server.start_server()
        instance.url = str(instance.server.make_url("")).rstrip("/")


async def router_for(
    prefill: list[Scripted],
    decode: list[Scripted],
    resolver: Resolver = resolve_addresses,
    **options: Any,
) -> TestServer:
    config = RouterConfig(
        prefill_urls=[i.url for i in prefill],
        decode_urls=[i.url for i in decode],
        policy=options.pop("policy", "least-tokens"),
        host="127.0.0.1",
        port=0,
        probe_interval_s=0.2,
        probe_timeout_s=0.3,
        **options,
    )
    server = TestServer(Router(config, resolver).app(), host="127.0.0.1")
    await server.start_server()
    return server


async def post(server: TestServer, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/v1/completions"), json=body) as answer,
    ):
        return answer.status, await answer.read()


async def instances(server: TestServer) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/tessera/v1/instances")) as answer,
    ):
        return list((await answer.json())["instances"])


@pytest.mark.asyncio
async def test_requests_go_where_the_dispatch_policy_sees_the_least_load() -> None:
    busy, idle, prefill = Scripted(kv_usage=0.9), Scripted(kv_usage=0.05), Scripted()
    await start(busy, idle, prefill)
    router = await router_for([prefill], [busy, idle])
    for _ in range(6):
        status, _ = await post(router, {"prompt": "hello", "max_tokens": 2})
        assert status == 200
    assert (len(busy.seen), len(idle.seen)) == (0, 6)
    assert all(h.get(PREFILL_HEADER) == prefill.url for h in idle.seen)
    busy.kv_usage, idle.kv_usage = 0.05, 0.9  # the next probe sees the loads swap
    deadline = time.monotonic() + 5
    while not busy.seen and time.monotonic() < deadline:
        await post(router, {"prompt": "hello"})
    assert busy.seen, "the router never followed the live load"
    await router.close()


@pytest.mark.asyncio
async def test_a_failed_prefill_is_retried_on_another_prefill_instance() -> None:
    bad, good, decode = Scripted(kv_usage=0.0), Scripted(kv_usage=0.5), Scripted()

    async def pull(request: web.Request) -> web.Response:
        if request.headers[PREFILL_HEADER] == bad.url:
            error = {"message": "prefill instance down", "type": "prefill_unavailable"}
            return web.json_response({"error": error}, status=502)
        return web.json_response({"choices": [{"text": "ok", "finish_reason": "stop"}]})

    decode.answer = pull
    await start(bad, good, decode)
    router = await router_for([bad, good], [decode])
    status, body = await post(router, {"prompt": "hello"})
    assert status == 200, body
    assert [h[PREFILL_HEADER] for h in decode.seen] == [bad.url, good.url]
    state = {i["url"]: i for i in await instances(router)}
    assert state[bad.url]["healthy"] is False and state[good.url]["healthy"] is True
    await router.close()


@pytest.mark.asyncio
async def test_an_instance_that_stops_answering_is_out_within_seconds() -> None:
    first, second = Scripted(), Scripted()
    await start(first, second)
    router = await router_for([], [first, second])
    assert all(i["healthy"] for i in await instances(router))
    assert first.server is not None
    await first.server.close()
    stopped = time.monotonic()
    while time.monotonic() - stopped < 3:
        state = {i["url"]: i["healthy"] for i in await instances(router)}
        if not state[first.url]:
            break
        await asyncio.sleep(0.05)  # polling the router's view, with the deadline above
    assert state == {first.url: False, second.url: True}
    out_after = time.monotonic() - stopped
    second.seen.clear()
    for _ in range(4):
        assert (await post(router, {"prompt": "x"}))[0] == 200
    assert len(second.seen) == 4
    print(f"marked out after {out_after:.2f} s")
    await router.close()


@pytest.mark.asyncio
async def test_a_busy_instance_that_streams_stays_in_though_its_probes_time_out() -> None:
    busy = Scripted()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(40):  # 2 s of tokens: several probe rounds of 0.2 s
            await response.write(chunk(str(i)))
            await asyncio.sleep(0.05)  # the instance's pace between tokens
        await response.write(b"data: [DONE]\n\n")
        return response

    busy.answer = slow_stream
    await start(busy)
    router = await router_for([], [busy])
    assert (await instances(router))[0]["healthy"]
    busy.ready_delay_s = 1.0  # every probe times out (0.3 s) from now on
    events = await stream_events(router, deadline_s=6)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [str(i) for i in range(40)]
    state = (await instances(router))[0]
    assert state["healthy"], state  # it answered the whole time: probes alone don't mark it out
    idle = time.monotonic()
    while time.monotonic() - idle < 3 and (await instances(router))[0]["healthy"]:
        await asyncio.sleep(0.05)  # polling the router's view, with the deadline above
    assert not (await instances(router))[0]["healthy"], "silent and slow: out"
    await router.close()


async def stream_events(server: TestServer, deadline_s: float) -> list[str]:
    started = time.monotonic()
    events: list[str] = []
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "hello", "stream": True}
        async with session.post(server.make_url("/v1/completions"), json=body) as answer:
            assert answer.status == 200
            async for line in answer.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].decode().strip())
    assert time.monotonic() - started < deadline_s
    return events


def chunk(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'text': text}]})}\n\n".encode()


@pytest.mark.asyncio
async def test_a_decode_instance_dying_mid_stream_ends_the_stream_with_an_error() -> None:
    decode, spare = Scripted(), Scripted(kv_usage=0.9)

    async def die(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("one"))
        assert request.transport is not None
        request.transport.abort()  # the process is gone: connection reset, no [DONE]
        return response

    decode.answer = die
    await start(decode, spare)
    router = await router_for([], [decode, spare])
    events = await stream_events(router, deadline_s=5)
    assert json.loads(events[0])["choices"][0]["text"] == "one"
    assert "failed mid-stream" in json.loads(events[1])["error"]["message"]
    assert events[-1] == "[DONE]"
    state = {i["url"]: i["healthy"] for i in await instances(router)}
    assert state[decode.url] is False
    await router.close()


@pytest.mark.asyncio
async def test_a_stalled_stream_ends_with_an_error_at_the_stream_timeout() -> None:
    decode = Scripted()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("one"))
        await asyncio.sleep(30)  # hung, not dead: only a deadline ends this
        return response

    decode.answer = stall
    await start(decode)
    router = await router_for([], [decode], stream_timeout_s=1.0)
    events = await stream_events(router, deadline_s=4)
    assert "error" in json.loads(events[1]) and events[-1] == "[DONE]"
    await router.close()


@pytest.mark.asyncio
async def test_no_healthy_instance_is_a_503_with_retry_after() -> None:
    decode = Scripted()
    await start(decode)
    router = await router_for([], [decode])
    assert decode.server is not None
    await decode.server.close()
    deadline = time.monotonic() + 3
    status = 200
    while status != 503 and time.monotonic() < deadline:
        status, body = await post(router, {"prompt": "x"})
    assert status == 503 and b"no healthy decode instance" in body
    await router.close()


@pytest.mark.asyncio
async def test_a_body_that_is_not_json_is_a_400_naming_it() -> None:
    decode = Scripted()
    await start(decode)
    router = await router_for([], [decode])
    async with (
        aiohttp.ClientSession() as session,
        session.post(router.make_url("/v1/completions"), data=b"{nope") as answer,
    ):
        assert answer.status == 400
        assert (await answer.json())["error"]["param"] == "body"
    await router.close()


async def until(probe: Callable[[], Any], what: str, deadline_s: float = 5.0) -> Any:
    """Poll `probe` (an async callable) until it returns something true, within a deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {deadline_s} s: {what}")


@pytest.mark.asyncio
async def test_a_headless_service_is_re_resolved_so_new_pods_are_found_and_gone_ones_dropped() -> (
    None
):
    """The Service's records are scripted (what cluster DNS answers for a headless Service as
    pods become ready and go); the instances are real servers on 127.0.0.2 and 127.0.0.3, both
    loopback addresses, on the same port, as two pods behind one Service are."""
    port = free_port()
    busy, fresh = Scripted(kv_usage=0.9), Scripted(kv_usage=0.0)
    await start(busy, host="127.0.0.2", port=port)
    await start(fresh, host="127.0.0.3", port=port)
    records: dict[str, list[str] | OSError] = {"decode.ns.svc": ["127.0.0.2"]}
    lookups: list[str] = []

    async def dns(host: str, at: int) -> list[str]:
        assert at == port
        lookups.append(host)
        answer = records[host]
        if isinstance(answer, OSError):
            raise answer
        return list(answer)

    service = f"http://decode.ns.svc:{port}"
    router = await router_for([], [], resolver=dns, decode_services=(service,))
    assert (await post(router, {"prompt": "hello"}))[0] == 200
    assert len(busy.seen) == 1
    assert [i["url"] for i in await instances(router)] == [busy.url]

    records["decode.ns.svc"] = ["127.0.0.2", "127.0.0.3"]  # a scale-up: a new ready pod

    async def reached_fresh() -> bool:
        await post(router, {"prompt": "hello"})
        return bool(fresh.seen)

    await until(reached_fresh, "a request on the pod the Service gained")
    records["decode.ns.svc"] = OSError("DNS timed out")  # a hiccup keeps what was known

    count = len(lookups)

    async def looked_up_twice_more() -> bool:
        return len(lookups) > count + 1

    await until(looked_up_twice_more, "two more lookups")
    assert {i["url"] for i in await instances(router)} == {busy.url, fresh.url}

    records["decode.ns.svc"] = ["127.0.0.3"]  # the first pod left the Service

    async def dropped() -> bool:
        return [i["url"] for i in await instances(router)] == [fresh.url]

    await until(dropped, "the pod gone from the Service dropped")
    busy.seen.clear()
    for _ in range(3):
        assert (await post(router, {"prompt": "x"}))[0] == 200
    assert busy.seen == []

    records["decode.ns.svc"] = []  # no ready pod: the Service has no records

    async def unavailable() -> bool:
        return (await post(router, {"prompt": "x"}))[0] == 503

    await until(unavailable, "503 once the Service has no pod")
    await router.close()


@pytest.mark.asyncio
async def test_services_resolve_through_the_system_resolver() -> None:
    decode = Scripted()
    await start(decode)
    port = int(decode.url.rsplit(":", 1)[1])
    assert "127.0.0.1" in await resolve_addresses("localhost", port)
    router = await router_for([], [], decode_services=(f"http://localhost:{port}",))
    assert (await post(router, {"prompt": "hello"}))[0] == 200
    assert decode.seen
    assert instance_url("http://svc:8000/", "10.0.0.7") == "http://10.0.0.7:8000"
    assert instance_url("http://svc:8000", "fd00::7") == "http://[fd00::7]:8000"
    await router.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--decode: give at least one"),
        (["--decode-service=svc:8000"], "--decode-service svc:8000: expected an http(s)"),
        (["--decode=localhost:8000"], "--decode localhost:8000: expected an http(s)://host:port"),
        (["--decode=http://a:1", "--prefill=ftp://b"], "--prefill ftp://b"),
    ],
)
def test_bad_router_flags_are_one_line_errors(args: list[str], message: str) -> None:
    from click.testing import CliRunner
    from tessera.agents.router.cli import router_command

    result = CliRunner().invoke(router_command, args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output
