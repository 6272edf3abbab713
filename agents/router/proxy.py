"""The router's HTTP side (aiohttp): OpenAI routes in, prefill-then-decode out.

For each `POST /v1/completions` or `/v1/chat/completions` the router picks a decode instance
and (when it has prefill instances) a prefill instance, and forwards the request to the decode
instance with the prefill instance named in `X-Tessera-Prefill`; the decode instance pulls the
prompt's KV from there (disaggregated.py) and streams the tokens, which the router passes on
unchanged, so clients see a colocated server's response shapes.

Failures, and what the client gets:
- the prefill instance fails (the decode answers 502 `prefill_unavailable`): the prefill
  instance is marked out and the request retried with another, up to `max_attempts`;
- the decode instance cannot be reached before the response began: marked out, retried on
  another decode instance (nothing was sent to the client yet);
- the decode instance answers 503 (draining for a scale-down, or still loading): marked out and
  retried on another;
- the request migrates mid-stream (agents/serving/migration.py): the instance's part ends with
  a `tessera.migrated` event, which the router does not forward; it continues the stream from
  the target's /internal/attach, so the client sees one unbroken stream;
- the decode instance dies or stalls past `stream_timeout_s` after the response began: the
  stream ends with an error event then `data: [DONE]` (a non-streamed request gets 502), and the
  instance is marked out. Never a hang: every upstream read has a deadline.
- no healthy instance of a role: 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from tessera.agents.router import ATTACH_PATH, MIGRATED_EVENT, PREFILL_HEADER
from tessera.agents.router.instances import (
    Instance,
    InstancePool,
    NoHealthyInstanceError,
    Resolver,
    probe_forever,
    probe_round,
    resolve_addresses,
)

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions")
CHARS_PER_TOKEN = 4
"""The router has no tokenizer: a text prompt's tokens are estimated from its length."""


@dataclass(frozen=True)
class RouterConfig:
    prefill_urls: list[str]
    decode_urls: list[str]
    policy: str
    host: str
    port: int
    block_size: int = 16
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    connect_timeout_s: float = 2.0
    stream_timeout_s: float = 30.0
    """Longest wait for the next byte of a response once it began (and for its first byte,
    prefill and queueing included, before it began)."""
    max_attempts: int = 3
    prefill_services: tuple[str, ...] = ()
    """Base URLs whose host is a headless Service of prefill pods, re-resolved every probe."""
    decode_services: tuple[str, ...] = ()


class UpstreamError(Exception):
    """An instance failed before the response began: retry elsewhere."""

    def __init__(self, instance: Instance, message: str) -> None:
        super().__init__(message)
        self.instance = instance


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return max(1, len(prompt) // CHARS_PER_TOKEN)
    messages = body.get("messages")
    if isinstance(messages, list):
        text = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return max(1, len(text) // CHARS_PER_TOKEN)
    return 1


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param}}


class Router:
    def __init__(self, config: RouterConfig, resolver: Resolver = resolve_addresses) -> None:
        """`resolver` looks up the services' addresses (a test gives a scripted one)."""
        from tessera.policies.dispatch import DispatchPolicy

        policy = DispatchPolicy(config.policy)
        self.config = config
        self.prefill = InstancePool(
            "prefill",
            config.prefill_urls,
            policy,
            config.block_size,
            services=list(config.prefill_services),
            resolver=resolver,
        )
        self.decode = InstancePool(
            "decode",
            config.decode_urls,
            policy,
            config.block_size,
            services=list(config.decode_services),
            resolver=resolver,
        )
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tessera_router_requests_total",
            "Requests by outcome",
            ("outcome",),
            registry=self.registry,
        )
        self.retries = Counter(
            "tessera_router_retries_total",
            "Attempts retried elsewhere, by failed role",
            ("role",),
            registry=self.registry,
        )
        self.migrations_followed = Counter(
            "tessera_router_migrations_followed_total",
            "Streams continued on another instance after their request migrated",
            registry=self.registry,
        )
        self.session: aiohttp.ClientSession | None = None
        self._prober: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession()
        pools = [self.prefill, self.decode]
        await probe_round(pools, self.session, self.config.probe_timeout_s)
        self._prober = asyncio.create_task(
            probe_forever(
                pools, self.session, self.config.probe_interval_s, self.config.probe_timeout_s
            )
        )

    async def stop(self, app: web.Application) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/tessera/v1/instances", self.instances)
        app.router.add_get("/v1/models", self.models)
        for route in ROUTES:
            app.router.add_post(route, self.generate)
        return app

    # ---- plain routes --------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        decode_ok = any(i.healthy for i in self.decode.instances)
        prefill_ok = not self.prefill.configured or any(i.healthy for i in self.prefill.instances)
        if decode_ok and prefill_ok:
            return web.json_response({"status": "ready"})
        return web.json_response(
            error_body("no healthy decode or prefill instance", "unavailable"), status=503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def instances(self, request: web.Request) -> web.Response:
        every = self.prefill.instances + self.decode.instances
        return web.json_response({"instances": [i.as_dict() for i in every]})

    async def models(self, request: web.Request) -> web.Response:
        try:
            decode = self.decode.choose(1)
        except NoHealthyInstanceError as error:
            return self._unavailable(str(error))
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.stream_timeout_s)
        async with self.session.get(f"{decode.url}/v1/models", timeout=timeout) as answer:
            return web.Response(
                body=await answer.read(), status=answer.status, content_type="application/json"
            )

    def _unavailable(self, message: str) -> web.Response:
        self.requests.labels(outcome="unavailable").inc()
        return web.json_response(
            error_body(message, "unavailable"), status=503, headers={"Retry-After": "1"}
        )

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response(
                error_body("body: the body is not valid JSON", "invalid_request_error", "body"),
                status=400,
            )
        if not isinstance(body, dict):
            return web.json_response(
                error_body("body: must be a JSON object", "invalid_request_error", "body"),
                status=400,
            )
        prompt_tokens = estimate_prompt_tokens(body)
        failed: dict[str, set[str]] = {"prefill": set(), "decode": set()}
        last_error = "no attempt made"
        for _ in range(self.config.max_attempts):
            try:
                decode = self.decode.choose(prompt_tokens, failed["decode"])
                prefill = (
                    self.prefill.choose(prompt_tokens, failed["prefill"])
                    if self.prefill.configured
                    else None
                )
            except NoHealthyInstanceError as error:
                return self._unavailable(f"{error}; last failure: {last_error}")
            try:
                return await self._forward(request, raw, prompt_tokens, decode, prefill)
            except UpstreamError as error:
                error.instance.mark(False, str(error))
                failed[error.instance.role].add(error.instance.url)
                self.retries.labels(role=error.instance.role).inc()
                last_error = str(error)
                log.warning("retrying elsewhere: %s", error)
        self.requests.labels(outcome="failed").inc()
        return web.json_response(
            error_body(f"every attempt failed; last: {last_error}", "upstream_error"), status=502
        )

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        prompt_tokens: int,
        decode: Instance,
        prefill: Instance | None,
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = {"Content-Type": "application/json"}
        if prefill is not None:
            headers[PREFILL_HEADER] = prefill.url
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout_s,
            sock_read=self.config.stream_timeout_s,
        )
        for instance in (decode, prefill):
            if instance is not None:
                instance.inflight_prompt_tokens += prompt_tokens
        try:
            try:
                upstream = await self.session.post(
                    f"{decode.url}{request.path}", data=raw, headers=headers, timeout=timeout
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                raise UpstreamError(decode, f"decode {decode.url}: {error!r}") from error
        finally:
            for instance in (decode, prefill):
                if instance is not None:
                    instance.inflight_prompt_tokens -= prompt_tokens
        async with upstream:
            if upstream.status == 503:  # draining or loading: its probe will mark it out too
                detail = await upstream.read()
                raise UpstreamError(decode, f"decode {decode.url} unavailable: {detail[:200]!r}")
            if upstream.status == 502 and prefill is not None:
                detail = await upstream.read()
                if b"prefill_unavailable" in detail:
                    raise UpstreamError(prefill, f"prefill {prefill.url}: {detail.decode()}")
            if "text/event-stream" in upstream.headers.get("Content-Type", ""):
                return await self._relay_stream(request, upstream, decode)
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                decode.mark(False, f"response failed: {error!r}")
                self.requests.labels(outcome="decode_failed").inc()
                return web.json_response(
                    error_body(f"decode {decode.url} failed: {error!r}", "upstream_error"),
                    status=502,
                )
            self.requests.labels(outcome=str(upstream.status)).inc()
            extra = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
            return web.Response(
                body=payload,
                status=upstream.status,
                content_type="application/json",
                headers=extra,
            )

    async def _relay_stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, decode: Instance
    ) -> web.StreamResponse:
        """Relay a stream to the client; when its request migrates (the instance's part ends
        with the `tessera.migrated` event), continue from the target's /internal/attach, as
        many times as it moves (agents/serving/migration.py has the protocol)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        done = False
        part, url = upstream, decode.url
        try:
            while True:
                try:
                    moved = await self._relay_part(part, response, self._decode_at(url))
                finally:
                    if part is not upstream:  # the caller closes the first part
                        part.release()
                if moved is None:
                    done = True
                    break
                url = str(moved.get("target", "")).rstrip("/")
                part = await self._attach(url, moved)
                self.migrations_followed.inc()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            log.warning("instance %s failed mid-stream: %r", url, error)
            for instance in self.decode.instances:
                if instance.url == url:
                    instance.mark(False, f"failed mid-stream: {error!r}")
        if not done:
            self.requests.labels(outcome="decode_failed").inc()
            message = f"decode instance {url} failed mid-stream; the answer is incomplete"
            event = json.dumps(error_body(message, "upstream_error"))
            with contextlib.suppress(ConnectionError):
                await response.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
        else:
            self.requests.labels(outcome="200").inc()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    def _decode_at(self, url: str) -> Instance | None:
        return next((i for i in self.decode.instances if i.url == url), None)

    async def _relay_part(
        self, part: aiohttp.ClientResponse, response: web.StreamResponse, source: Instance | None
    ) -> dict[str, Any] | None:
        """Forward one instance's events; returns the migrated event's data if the part ended
        with one, None at [DONE]. Raises ValueError if the part ends with neither. Each line
        counts as the source's progress (instances.py: a busy instance's slow probe)."""
        migrated = False
        async for line in _lines(part):
            if source is not None:
                source.progressed()
            if line.startswith(b"event: " + MIGRATED_EVENT.encode()):
                migrated = True
                continue
            if migrated:
                if line.startswith(b"data: "):
                    moved = json.loads(line[6:])
                    if not isinstance(moved, dict):
                        raise ValueError(f"{MIGRATED_EVENT} event data is not an object")
                    return moved
                continue
            await response.write(line)
            if line.startswith(b"data: [DONE]"):
                return None
        raise ValueError("the stream ended without [DONE]")

    async def _attach(self, url: str, moved: dict[str, Any]) -> aiohttp.ClientResponse:
        """Open the rest of a migrated request's stream on its target."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout_s,
            sock_read=self.config.stream_timeout_s,
        )
        body = {"request_id": moved.get("request_id"), "resume": moved.get("resume")}
        part = await self.session.post(f"{url}{ATTACH_PATH}", json=body, timeout=timeout)
        if part.status != 200:
            detail = await part.read()
            part.release()
            raise ValueError(f"attach to {url} answered {part.status}: {detail[:300]!r}")
        return part


async def _lines(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response's lines as they arrive; raises if the body ends without its last line."""
    while True:
        line = await upstream.content.readline()
        if not line:
            return
        yield line


def run(config: RouterConfig) -> None:
    router = Router(config)
    web.run_app(router.app(), host=config.host, port=config.port, print=None, access_log=None)
