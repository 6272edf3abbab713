"""Live migration and drain for `tessera serve`: the HTTP side, and the protocol the router and
the operator speak to it.

The engine half (pre-copy, stop-and-copy, commit, abort on a KV channel) is
agents/engine/migration.py. This module gives every server of the colocated or decode role a
migration listener (KV channels in), the internal routes below, and the link between a
migrated request and its client's stream. Everything internal is under `/internal/`; none of it
is part of the OpenAI API, and a Service in front of clients should not expose it.

Routes:

- `GET /internal/migration` -> `{"transport": "tcp", "port": N, "draining": bool,
  "streams": [ids]}`: where sources open migration channels to this server
  (`--migration-port`, 0: any free port), and the streamed requests it could move.
- `POST /internal/migrate` `{"request_id": id, "target": "http://host:port"}` (source): move
  the streamed request `id` (the engine id: a stream's `id` is `cmpl-<id>` or
  `chatcmpl-<id>`) to the target. 200 with the report when committed, 409 with it when
  aborted (the request goes on here), 404 for no such streamed request, 400 for bad input.
  Only streamed requests migrate; a non-streamed one finishes where it runs.
- `POST /internal/attach` `{"request_id": id, "resume": {...}}` (target): the rest of a
  migrated request's stream, as server-sent events in the stream's own shape (same `id` and
  `created`, no repeated chat role chunk), to `data: [DONE]`. 404 if no migrated request
  waits under that id: it is aborted `--migration-attach-timeout-s` after its commit if nobody
  attaches.
- `POST /internal/drain` `{"deadline_s": s, "peers": [base URLs]}`: see below.

How the client's stream follows its request (the router's side is agents/router/proxy.py):

    client -> router -> source /v1/...   data: chunks ...
    source commits the migration, then ends its part of the stream with
        event: tessera.migrated
        data: {"target": URL, "request_id": id, "resume": {"num_output_tokens": n,
               "emitted_chars": c, "completion_tokens": k}}
    (no [DONE]). The router does not forward it: it POSTs {"request_id", "resume"} to the
    target's /internal/attach and forwards that stream to the client, to its [DONE].

No duplicates, no gaps: the source's part holds exactly the text of the `n` tokens it
produced, cut at `c` characters (what its stop-string hold-back had released); the target has
those `n` tokens (they came with the KV) and starts its text at character `c`, its tokens at
`n + 1`. The target refuses an attach whose `num_output_tokens` is not what it holds.

Drain (scale-down; a pod's preStop hook calls it, its readiness probe reads /ready):

    POST /internal/drain {"deadline_s": 20, "peers": ["http://10.0.0.7:8000", ...]}
    -> 200 {"complete": bool, "migrated": n, "finished_here": n, "left": [ids],
            "aborted_migrations": n, "elapsed_s": s}

From the call on, /ready answers 503 and new /v1 requests get 503 (the router retries them
elsewhere). Every streamed request that decodes is migrated to a peer (spread round-robin;
a failed attempt tries the next peer); requests that cannot migrate (not streamed, or still
prefilling and no longer by then) finish here. It answers when nothing is left or at the
deadline, whichever comes first (`complete` says which); with no peers it only waits for the
requests to finish. `deadline_s` is in (0, 3600]; peers are http(s) base URLs of other
instances of the same model. Draining cannot be undone: the pod is going away.

Test hook: with `--migration-test-faults` a migrate body may carry `"test_fault"`, one of
`agents.engine.migration.FAULTS`; the operator never renders the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlparse

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter, Histogram
from tessera.agents.engine.engine import Engine
from tessera.agents.engine.kv_transfer import KVPackage
from tessera.agents.engine.kv_transport import KVTransportError, TcpTransport
from tessera.agents.engine.migration import (
    FAULTS,
    MigrationConfig,
    MigrationRefusedError,
    MigrationReport,
    MigrationTarget,
    migrate_out,
)
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.serving_loop import Sink
from tessera.agents.router import ATTACH_PATH
from tessera.agents.serving.app import ApiError, Served, sse_events
from tessera.agents.serving.generation import Generation, StreamMeta
from tessera.agents.serving.metrics import LABELS
from tessera.agents.serving.peer_address import CONNECT_TIMEOUT_S, PeerDirectory, kv_address

log = logging.getLogger(__name__)

INFO_PATH = "/internal/migration"
MIGRATE_PATH = "/internal/migrate"
DRAIN_PATH = "/internal/drain"
ATTACH_TIMEOUT_S = 15.0
"""A migrated request nobody attaches to in this time is aborted on the target (its source
did not hear the commit, or its client left meanwhile); `--migration-attach-timeout-s`."""
MAX_DRAIN_S = 3600.0
DRAIN_POLL_S = 0.05
"""How often a drain looks for requests that have become migratable (or finished)."""
DRAIN_ATTEMPTS = 3
"""Migration attempts per request in one drain before it is left to finish here."""


class MigrationMetrics:
    def __init__(self, served: Served) -> None:
        registry, self.labels = served.metrics.registry, served.metrics.labels
        self.migrations = Counter(
            "tessera:migrations_total",
            "Live migrations, by direction (out, in) and outcome (committed, aborted)",
            (*LABELS, "direction", "outcome"),
            registry=registry,
        )
        self.stall = Histogram(
            "tessera:migration_stall_seconds",
            "Source side: from the request's pause to the target's commit",
            LABELS,
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.precopy_bytes = Counter(
            "tessera:migration_precopy_bytes_total",
            "KV bytes sent in pre-copy stages",
            LABELS,
            registry=registry,
        )

    def count(self, direction: str, outcome: str) -> None:
        self.migrations.labels(**self.labels, direction=direction, outcome=outcome).inc()


@dataclass
class _Adopted:
    """A migrated request on the target until a client attaches (or the timeout)."""

    generation: Generation
    num_output_tokens: int
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Adoption:
    """MigrationTarget's hook for one commit: the request's Generation, made before the
    import so that no token is produced before its sink exists."""

    service: MigrationService
    generation: Generation
    meta: StreamMeta
    num_output_tokens: int

    @property
    def sink(self) -> Sink:
        return self.generation.sink

    @property
    def timeout_s(self) -> float | None:
        return self.generation.timeout_s

    def adopted(self, request_id: str) -> None:
        generation = self.generation
        generation.request_id = request_id
        generation.stream = self.meta
        generation.admitted.set_result(request_id)
        entry = _Adopted(generation, self.num_output_tokens)
        entry.expiry = asyncio.get_running_loop().call_later(
            self.service.attach_timeout_s, self.service.expire, request_id
        )
        self.service.adopted[request_id] = entry
        self.service.metrics.count("in", "committed")

    def discard(self) -> None:
        self.generation.finished = True  # never in the engine: nothing to abort


@dataclass
class MigrationService:
    """Migration in and out of one server, and its drain."""

    served: Served
    metrics: MigrationMetrics
    transport: TcpTransport
    port: int = 0
    test_faults: bool = False
    attach_timeout_s: float = ATTACH_TIMEOUT_S
    config: MigrationConfig = field(default_factory=MigrationConfig)
    adopted: dict[str, _Adopted] = field(default_factory=dict)
    migrating: set[str] = field(default_factory=set)
    _targets: PeerDirectory[int] = field(
        default_factory=lambda: PeerDirectory(INFO_PATH, _target_port)
    )
    """Each target's migration port, from its INFO_PATH."""

    # ---- target ------------------------------------------------------------------------

    def target(self) -> MigrationTarget:
        loop = self.served.loop
        if loop is None:
            raise RuntimeError("the engine is not loaded")
        return MigrationTarget(loop, self.adopt, self.admit)

    def admit(self, begin: dict[str, Any]) -> None:
        if self.served.draining:
            raise MigrationRefusedError("this instance is draining")
        serving = begin.get("serving")
        if not isinstance(serving, dict) or not isinstance(serving.get("stream"), dict):
            raise MigrationRefusedError("a migration into tessera serve needs its stream state")

    async def adopt(self, begin: dict[str, Any], package: KVPackage) -> _Adoption:
        served, serving = self.served, begin["serving"]
        if served.loop is None or served.tokenizer is None:
            raise MigrationRefusedError("the engine is not loaded")
        try:
            meta = StreamMeta(**serving["stream"])
            stop = [str(s) for s in serving.get("stop") or []]
            timeout = serving.get("timeout_s")
            timeout_s = None if timeout is None else max(0.001, float(timeout))
        except (TypeError, ValueError) as error:
            raise MigrationRefusedError(f"bad stream state: {error}") from error
        generation = Generation(
            served.loop,
            served.tokenizer,
            served.metrics,
            list(package.prompt_token_ids),
            SamplingParams.from_dict(package.sampling),
            stop,
            timeout_s,
            adopt=True,
        )
        generation.output.resume(list(package.output_token_ids), 0)
        return _Adoption(self, generation, meta, len(package.output_token_ids))

    def expire(self, request_id: str) -> None:
        entry = self.adopted.pop(request_id, None)
        if entry is not None:
            log.warning("migrated request %s was not attached to in time; aborting", request_id)
            entry.generation.close()

    async def attach(self, body: dict[str, Any], request: Request) -> StreamingResponse:
        request_id, resume = body.get("request_id"), body.get("resume")
        if not isinstance(request_id, str) or not isinstance(resume, dict):
            raise ApiError(400, "request_id and resume are required", param="request_id")
        entry = self.adopted.get(request_id)
        if entry is None:
            raise ApiError(
                404,
                f"request_id: no migrated request {request_id!r} waits here",
                param="request_id",
                kind="not_found_error",
            )
        generation = entry.generation
        try:
            count = int(resume["num_output_tokens"])
            emitted, completion = int(resume["emitted_chars"]), int(resume["completion_tokens"])
            if count != entry.num_output_tokens:
                raise ValueError(f"{count} tokens streamed; {entry.num_output_tokens} came here")
            generation.output.resume(generation.output.token_ids, emitted)
        except (KeyError, TypeError, ValueError) as error:
            raise ApiError(409, f"resume: {error}", param="resume") from error
        del self.adopted[request_id]
        if entry.expiry is not None:
            entry.expiry.cancel()
        generation.completion_tokens = completion
        assert generation.stream is not None
        events = sse_events(generation, request, self.served, generation.stream, opening=False)
        return StreamingResponse(events, media_type="text/event-stream")

    # ---- source ------------------------------------------------------------------------

    async def _kv_address(self, base: str) -> str:
        return kv_address(base, await self._targets.get(base))

    async def migrate(
        self, request_id: str, target: str, fault: str | None = None
    ) -> MigrationReport:
        """Move one streamed request to `target` (a base URL); the report says if it moved.
        Shielded: a caller that goes away (an HTTP client, a drain past its deadline) does
        not cut a migration short in the middle."""
        return await asyncio.shield(asyncio.ensure_future(self._migrate(request_id, target, fault)))

    async def _migrate(self, request_id: str, target: str, fault: str | None) -> MigrationReport:
        loop, generation = self.served.loop, self.served.streams.get(request_id)
        if loop is None or generation is None or generation.stream is None:
            raise LookupError(f"no streamed request {request_id!r} here")
        if request_id in self.migrating:
            raise LookupError(f"request {request_id!r} is migrating already")
        self.migrating.add(request_id)
        try:
            try:
                channel = await self.transport.connect(
                    await self._kv_address(target), CONNECT_TIMEOUT_S
                )
            except (
                KVTransportError,
                aiohttp.ClientError,
                TimeoutError,
                MigrationRefusedError,
                KeyError,
                ValueError,
            ) as error:
                self._targets.forget(target)
                self.metrics.count("out", "aborted")
                return MigrationReport(request_id, target, reason=f"cannot reach target: {error}")
            elapsed = time.monotonic() - generation.started_s
            serving = {
                "stream": dataclasses.asdict(generation.stream),
                "stop": generation.stop,
                "timeout_s": None
                if generation.timeout_s is None
                else max(0.001, generation.timeout_s - elapsed),
            }

            def committed(report: MigrationReport) -> None:
                generation.end_migrated({"target": target, "request_id": request_id})

            try:
                report = await migrate_out(
                    loop, request_id, channel, target, serving, self.config, fault, committed
                )
            finally:
                await channel.close()
        finally:
            self.migrating.discard(request_id)
        self.metrics.count("out", "committed" if report.committed else "aborted")
        if report.committed:
            self.metrics.stall.labels(**self.metrics.labels).observe(report.stall_s)
        self.metrics.precopy_bytes.labels(**self.metrics.labels).inc(report.precopy_bytes)
        return report

    # ---- drain -------------------------------------------------------------------------

    async def drain(self, deadline_s: float, peers: list[str]) -> dict[str, Any]:
        served = self.served
        served.draining = True
        started = time.monotonic()
        end = started + deadline_s
        loop = served.loop
        if loop is None:
            return {
                "complete": True,
                "migrated": 0,
                "finished_here": 0,
                "left": [],
                "aborted_migrations": 0,
                "elapsed_s": 0.0,
            }
        initial = set(loop.live_request_ids())
        migrated: set[str] = set()
        attempts: dict[str, int] = {}
        aborted = 0
        order = itertools.cycle(peers) if peers else None
        tasks: dict[str, asyncio.Task[MigrationReport]] = {}
        while time.monotonic() < end:
            for request_id, task in list(tasks.items()):
                if task.done():
                    del tasks[request_id]
                    report = task.result() if not task.exception() else None
                    if report is not None and report.committed:
                        migrated.add(request_id)
                    else:
                        aborted += 1
            live = set(loop.live_request_ids())
            if not live and not tasks:
                break
            if order is not None:
                for request_id in sorted(live & set(served.streams)):
                    if request_id in tasks or attempts.get(request_id, 0) >= DRAIN_ATTEMPTS:
                        continue
                    if not await asyncio.wrap_future(loop.call(partial(_migratable, request_id))):
                        continue
                    attempts[request_id] = attempts.get(request_id, 0) + 1
                    tasks[request_id] = asyncio.create_task(
                        self._migrate_quietly(request_id, next(order))
                    )
            await asyncio.sleep(DRAIN_POLL_S)
        left = sorted(set(loop.live_request_ids()) - migrated)
        return {
            "complete": not left,
            "migrated": len(migrated),
            "finished_here": len(initial - migrated - set(left)),
            "left": left,
            "aborted_migrations": aborted,
            "elapsed_s": round(time.monotonic() - started, 3),
        }

    async def _migrate_quietly(self, request_id: str, target: str) -> MigrationReport:
        try:
            return await self.migrate(request_id, target)
        except LookupError as error:  # finished (or moved) before the attempt began
            return MigrationReport(request_id, target, reason=str(error))

    async def close(self) -> None:
        await self._targets.close()


def _target_port(info: Any) -> int:
    """A migration target's port from its INFO_PATH document; a draining target refuses."""
    if not isinstance(info, dict):
        raise TypeError("not a JSON object")
    if info.get("draining"):
        raise MigrationRefusedError("the target is draining")
    return int(info["port"])


def _migratable(request_id: str, engine: Engine) -> bool:
    return engine.migratable(request_id)


def _check_url(name: str, value: Any) -> str:
    parsed = urlparse(value) if isinstance(value, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ApiError(
            400, f"{name}: expected an http(s)://host:port base URL, got {value!r}", param=name
        )
    return str(value).rstrip("/")


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as error:
        raise ApiError(400, "body: the body is not valid JSON", param="body") from error
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", param="body")
    return body


def attach_migration(
    app: FastAPI,
    served: Served,
    host: str,
    port: int,
    test_faults: bool,
    timeout_s: float,
    attach_timeout_s: float = ATTACH_TIMEOUT_S,
) -> MigrationService:
    """Give a colocated or decode server its migration listener and internal routes (after
    `build_app`, before serving)."""
    transport = TcpTransport(timeout_s=timeout_s)
    service = MigrationService(
        served,
        MigrationMetrics(served),
        transport,
        test_faults=test_faults,
        attach_timeout_s=attach_timeout_s,
    )
    serve_app = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        """The listener lives on the server's event loop, as long as the app."""

        async def handle(channel: Any) -> None:
            try:
                target = service.target()
            except RuntimeError as error:
                with contextlib.suppress(KVTransportError):
                    await channel.send_message({"error": str(error)})
                return
            before = target.aborted
            await target.handle(channel)
            if target.aborted > before:
                service.metrics.count("in", "aborted")

        listener = await transport.listen(host, port, handle)
        service.port = int(listener.address.rsplit(":", 1)[1])
        log.info("migration channels on %s (%s)", listener.address, transport.name)
        try:
            async with serve_app(application) as state:
                yield state
        finally:
            await listener.close()
            await service.close()

    app.router.lifespan_context = lifespan

    @app.get(INFO_PATH, include_in_schema=False)
    async def migration_info() -> dict[str, Any]:
        return {
            "transport": transport.name,
            "port": service.port,
            "draining": served.draining,
            "streams": sorted(served.streams),
        }

    @app.post(MIGRATE_PATH, include_in_schema=False)
    async def migrate(request: Request) -> JSONResponse:
        body = await _json_body(request)
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ApiError(400, "request_id: a non-empty string is required", param="request_id")
        target = _check_url("target", body.get("target"))
        fault = body.get("test_fault")
        if fault is not None and (not test_faults or fault not in FAULTS):
            raise ApiError(
                400,
                f"test_fault: {fault!r} needs --migration-test-faults and one of "
                f"{', '.join(FAULTS)}",
                param="test_fault",
            )
        try:
            report = await service.migrate(request_id, target, fault)
        except LookupError as error:
            raise ApiError(
                404, f"request_id: {error}", param="request_id", kind="not_found_error"
            ) from error
        return JSONResponse(report.as_dict(), status_code=200 if report.committed else 409)

    @app.post(ATTACH_PATH, include_in_schema=False)
    async def attach(request: Request) -> StreamingResponse:
        return await service.attach(await _json_body(request), request)

    @app.post(DRAIN_PATH, include_in_schema=False)
    async def drain(request: Request) -> JSONResponse:
        body = await _json_body(request)
        deadline = body.get("deadline_s")
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not 0 < deadline <= MAX_DRAIN_S
        ):
            raise ApiError(
                400,
                f"deadline_s: a number in (0, {MAX_DRAIN_S:g}], got {deadline!r}",
                param="deadline_s",
            )
        peers = body.get("peers", [])
        if not isinstance(peers, list):
            raise ApiError(400, "peers: a list of base URLs", param="peers")
        checked = [_check_url(f"peers[{i}]", peer) for i, peer in enumerate(peers)]
        return JSONResponse(await service.drain(float(deadline), checked))

    return service
