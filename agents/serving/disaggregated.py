"""`tessera serve --role prefill|decode`: a request's prompt computed on one instance, its tokens
on another, the KV between them over a `KVTransport`.

Design: the decode instance *pulls*. A client request (from `tessera router`, or straight from a
client) reaches a decode instance, naming the prefill instance in the `X-Tessera-Prefill` header
(its HTTP base URL; without it the decode's `--prefill-service`). The decode instance opens one
KV channel to that prefill instance, sends the prompt and its sampling, and the prefill instance
runs it to its first token, exports the request's KV and answers it on the same channel, block
by block. Why pull over push: one connection carries one transfer from request to last block,
so there is no rendezvous state (no package waiting for a request that may never come, no
request waiting for a package that was lost), either side dying is seen by the other as the
channel's end, and the KV never crosses the router.

What can go wrong, and what happens:
- The prefill instance cannot be reached, refuses or fails: 502 `prefill_unavailable`, before
  any byte of the response; the router retries the request with another prefill instance.
- The package fails its checksums (corrupted in transit): the decode instance computes the
  prompt itself (its engine keeps the colocated role for this) and counts it in
  `tessera:kv_transfer_received_total{outcome="corrupted"}`; the client sees the same tokens.
- The request ends at its first token on the prefill instance (EOS, max_tokens 1): nothing to
  transfer; the decode instance computes it (one token).

Transport: the prefill instance's KV endpoint answers its `KVEndpoint` (host, GPU, transports)
and the decode instance picks with `choose_transport`: CUDA IPC when both run on the same host
and GPU (the blocks never leave the GPU's memory), TCP otherwise; it names its choice in the
request message, and the prefill instance's channel grants it (`KVChannel.negotiate`); the
prefill engine then exports the request's KV on the GPU without checksums (nothing to corrupt in
transit) unless the corruption test hook is on. A handle the decode side cannot open falls back
to TCP frames, checksummed, on the same channel.

Test hook: `--fault-corrupt-kv-every N` makes a prefill instance flip one bit in every Nth
package it sends, after the checksums were taken. It exists for the CI test that proves
corruption is caught, and is never rendered by the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Histogram
from starlette.middleware.base import RequestResponseEndpoint
from tessera.agents.engine.engine import EngineRole
from tessera.agents.engine.kv_reshard import reshard
from tessera.agents.engine.kv_transfer import KVPackage, KVTransferError
from tessera.agents.engine.kv_transport import (
    FrameKind,
    KVChannel,
    KVEndpoint,
    KVTransport,
    KVTransportError,
    TcpTransport,
    choose_transport,
    decode_message,
    host_id,
)
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.serving_loop import QueueFullError, ServingLoop, TokenEvent
from tessera.agents.router import PREFILL_HEADER
from tessera.agents.serving.app import ApiError, Served
from tessera.agents.serving.metrics import LABELS
from tessera.agents.serving.peer_address import CONNECT_TIMEOUT_S, PeerDirectory, kv_address

log = logging.getLogger(__name__)

KV_TRANSPORT_PATH = "/tessera/v1/kv-transport"
"""A prefill instance's KV endpoint: `{"transport": name, "port": N, "endpoint": KVEndpoint}`."""


def engine_role(role: str) -> EngineRole:
    """The engine's role for a server role. A decode server's engine is colocated: it imports
    requests like a decode-only one and can still compute a prompt whose KV did not arrive."""
    return EngineRole.PREFILL if role == "prefill" else EngineRole.COLOCATED


@dataclass
class PrefillResult:
    """What a prefill produced: the KV package, or (no KV) the tokens of a finished request."""

    package: KVPackage | None
    token_ids: list[int]
    finish_reason: str | None = None


class PrefillLoop(ServingLoop):
    """The serving loop of a prefill instance: each request's KV is exported the moment its
    prompt is computed (in the sink, on the loop thread, between steps), so its blocks are free
    for the next prompt while the package travels."""

    def submit_prefill(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        timeout_s: float,
        on_device: bool = False,
    ) -> Future[PrefillResult]:
        """`on_device`: export the KV on the GPU without checksums (`Engine.export_kv`), for a
        channel that shares it by CUDA IPC."""
        result: Future[PrefillResult] = Future()

        def sink(event: TokenEvent) -> None:
            if result.done():
                return
            if event.parked:
                try:
                    package = self.engine.export_kv(event.request_id, on_device=on_device)
                except Exception as error:  # still in the engine: the abort frees its KV
                    self.abort(event.request_id)
                    result.set_exception(error)
                    return
                self._live.pop(event.request_id, None)  # it left the engine with its KV
                result.set_result(PrefillResult(package, list(event.token_ids)))
            elif event.error is not None or event.timed_out:
                result.set_exception(RuntimeError(event.error or "prefill timed out"))
            elif event.finished:
                reason = event.finish_reason.value if event.finish_reason else None
                result.set_result(PrefillResult(None, list(event.token_ids), reason))

        def refused(admitted: Future[str]) -> None:  # the engine's ValueError for the prompt
            error = admitted.exception()
            if error is not None and not result.done():
                result.set_exception(error)

        admitted = self.submit(prompt, params, sink, request_id=request_id, timeout_s=timeout_s)
        admitted.add_done_callback(refused)
        return result


class KVMetrics:
    """Transfers sent and received, in the server's registry."""

    def __init__(self, served: Served) -> None:
        registry, self.labels = served.metrics.registry, served.metrics.labels
        self.sent = Counter(
            "tessera:kv_transfer_sent_total",
            "KV packages a prefill instance sent, by outcome (ok, corrupted_by_test_hook, failed)",
            (*LABELS, "outcome"),
            registry=registry,
        )
        self.received = Counter(
            "tessera:kv_transfer_received_total",
            "KV pulls of a decode instance, by outcome (ok, corrupted, finished_at_prefill, "
            "no_prefill_instance, unavailable)",
            (*LABELS, "outcome"),
            registry=registry,
        )
        self.bytes = Counter(
            "tessera:kv_transfer_bytes_total", "KV package bytes sent", LABELS, registry=registry
        )
        self.seconds = Histogram(
            "tessera:kv_transfer_seconds",
            "Decode side: from opening the KV channel to a verified package (prefill included)",
            LABELS,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    def count(self, counter: Counter, outcome: str) -> None:
        counter.labels(**self.labels, outcome=outcome).inc()


class PrefillService:
    """Answers KV channels: a prompt in, its KV package (or finished tokens, or an error) out."""

    def __init__(self, served: Served, metrics: KVMetrics, corrupt_every: int = 0) -> None:
        self.served, self.metrics, self.corrupt_every = served, metrics, corrupt_every
        self._sent = itertools.count(1)

    async def handle(self, channel: KVChannel) -> None:
        try:
            request = await channel.receive_message()
            granted = channel.negotiate(request.get("kv_transport"))
            # The test hook's damage must stay detectable: no unchecked packages under it.
            on_device = granted == "cuda_ipc" and not self.corrupt_every
            answer = await self._prefill(request, on_device)
        except KVTransportError as error:
            log.warning("KV channel failed before its prefill: %s", error)
            return
        except Exception as error:  # the decode side needs a reason, not a dropped connection
            await self._send_error(channel, f"{type(error).__name__}: {error}")
            return
        try:
            if answer.package is None:
                message = {"finished": True, "token_ids": answer.token_ids}
                await channel.send_message({**message, "finish_reason": answer.finish_reason})
                return
            corrupt = self.corrupt_every > 0 and next(self._sent) % self.corrupt_every == 0
            sent = await channel.send_package(answer.package, corrupt=corrupt)
        except KVTransportError as error:
            log.warning("sending KV of %s failed: %s", request.get("request_id"), error)
            self.metrics.count(self.metrics.sent, "failed")
            return
        self.metrics.count(self.metrics.sent, "corrupted_by_test_hook" if corrupt else "ok")
        self.metrics.bytes.labels(**self.metrics.labels).inc(sent)

    async def _send_error(self, channel: KVChannel, message: str) -> None:
        with contextlib.suppress(KVTransportError):
            await channel.send_message({"error": message})

    async def _prefill(self, request: dict[str, Any], on_device: bool = False) -> PrefillResult:
        loop = self.served.loop
        if not isinstance(loop, PrefillLoop):
            raise RuntimeError("the model is still loading")
        request_id = request.get("request_id")
        prompt = request.get("prompt_token_ids")
        if not isinstance(request_id, str) or not isinstance(prompt, list):
            raise ValueError("a prefill request needs request_id and prompt_token_ids")
        params = SamplingParams.from_dict(request.get("sampling") or {})
        timeout = self.served.request_timeout_s or 600.0
        try:
            future = loop.submit_prefill(prompt, params, request_id, timeout, on_device)
        except QueueFullError as error:
            raise RuntimeError(f"prefill instance busy: {error}") from error
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            loop.abort(request_id)
            raise


class PrefillClient:
    """A decode instance's `Served.prefill` hook: pull a prompt's KV from a prefill instance."""

    def __init__(
        self,
        metrics: KVMetrics,
        transport: KVTransport,
        default_prefill: str | None,
        timeout_s: float,
        local: KVEndpoint | None = None,
        transports: Mapping[str, KVTransport] | None = None,
    ) -> None:
        self.metrics, self.transport, self.timeout_s = metrics, transport, timeout_s
        self.default_prefill = default_prefill
        self.local = local or KVEndpoint(host_id(), "cpu", (transport.name,))
        self.transports = dict(transports or {transport.name: transport})
        self._prefills = PeerDirectory(KV_TRANSPORT_PATH, _kv_endpoint)
        """Each prefill instance's KV port and endpoint, from its KV_TRANSPORT_PATH."""

    async def __call__(
        self, prompt: list[int], params: SamplingParams, headers: Mapping[str, str]
    ) -> KVPackage | None:
        target = headers.get(PREFILL_HEADER) or self.default_prefill
        if not target:
            self.metrics.count(self.metrics.received, "no_prefill_instance")
            return None
        base = target if "://" in target else f"http://{target}"
        started = time.monotonic()
        try:
            package = await self._pull(base, prompt, params)
        except KVTransferError as error:  # checksums (KVChecksumError) or a malformed package
            log.warning("KV from %s refused (%s); computing the prompt here", base, error)
            self.metrics.count(self.metrics.received, "corrupted")
            return None
        except (KVTransportError, aiohttp.ClientError, TimeoutError, RuntimeError) as error:
            self.metrics.count(self.metrics.received, "unavailable")
            self._prefills.forget(base)
            raise ApiError(
                502, f"prefill instance {base}: {error}", kind="prefill_unavailable"
            ) from error
        if package is None:
            self.metrics.count(self.metrics.received, "finished_at_prefill")
        else:
            self.metrics.count(self.metrics.received, "ok")
            self.metrics.seconds.labels(**self.metrics.labels).observe(time.monotonic() - started)
        return package

    async def _kv_address(self, base: str) -> tuple[str, KVTransport]:
        """The prefill instance's KV address and the transport to reach it by."""
        port, remote = await self._prefills.get(base)
        name = choose_transport(self.local, remote)
        return kv_address(base, port), self.transports[name]

    async def _pull(self, base: str, prompt: list[int], params: SamplingParams) -> KVPackage | None:
        address, transport = await self._kv_address(base)
        channel = await transport.connect(address, CONNECT_TIMEOUT_S)
        try:
            request_id = f"kv-{uuid.uuid4().hex}"
            sampling = params.to_dict()
            await channel.send_message(
                {
                    "request_id": request_id,
                    "prompt_token_ids": prompt,
                    "sampling": sampling,
                    "kv_transport": transport.name,
                }
            )
            kind, payload = await asyncio.wait_for(channel.receive(), self.timeout_s)
            if kind == FrameKind.MESSAGE:
                message = decode_message(payload)
                if "error" in message:
                    raise RuntimeError(f"prefill failed: {message['error']}")
                return None  # finished at its first token: nothing to continue
            return await channel.receive_package((kind, payload))
        finally:
            await channel.close()


def _kv_endpoint(body: Any) -> tuple[int, KVEndpoint]:
    """A prefill instance's KV port and endpoint from its KV_TRANSPORT_PATH document."""
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    return int(body["port"]), KVEndpoint.from_dict(body.get("endpoint"))


class ReshardOnReceipt:
    """A decode instance's `Served.prefill` hook: the package `pull` received, in this engine's
    KV layout (kv_reshard.reshard: heads gathered or split for another tensor-parallel degree,
    another dtype or block size). A package no re-sharding maps (another model, head_dim,
    layers) is refused with its reason logged, and the prompt computed here instead; counted
    in `tessera:kv_reshard_total` by outcome (same, resharded, refused)."""

    def __init__(self, pull: PrefillClient, served: Served) -> None:
        self.pull, self.served = pull, served
        self.outcomes = Counter(
            "tessera:kv_reshard_total",
            "Received KV packages by what their layout needed (same, resharded, refused)",
            (*LABELS, "outcome"),
            registry=served.metrics.registry,
        )

    async def __call__(
        self, prompt: list[int], params: SamplingParams, headers: Mapping[str, str]
    ) -> KVPackage | None:
        package = await self.pull(prompt, params, headers)
        loop = self.served.loop
        if package is None or loop is None:
            return package
        labels = self.served.metrics.labels
        try:  # a cast of a large package takes a while: off the event loop
            mapped = await asyncio.to_thread(reshard, package, loop.engine.kv_geometry)
        except KVTransferError as error:
            log.warning("KV package refused on receipt (%s); computing the prompt here", error)
            self.outcomes.labels(**labels, outcome="refused").inc()
            return None
        self.outcomes.labels(**labels, outcome="same" if mapped is package else "resharded").inc()
        return mapped


def attach(
    app: FastAPI,
    served: Served,
    role: str,
    host: str,
    kv_port: int,
    prefill_service: str | None,
    corrupt_every: int,
    timeout_s: float,
    device: str | None = None,
) -> None:
    """Give a prefill or decode server its KV side (after `build_app`, before serving).
    `device`: the engine's (None: cuda when present), for the same-GPU transport."""
    metrics = KVMetrics(served)
    endpoint, transports = local_transports(device, timeout_s)
    transport = transports[endpoint.transports[0]]
    if role == "decode":
        pull = PrefillClient(
            metrics, transports["tcp"], prefill_service, timeout_s, endpoint, transports
        )
        served.prefill = ReshardOnReceipt(pull, served)
        return
    service = PrefillService(served, metrics, corrupt_every)
    serve_app = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        """The KV listener lives on the server's event loop, as long as the app."""
        listener = await transport.listen(host, kv_port, service.handle)
        log.info("KV channels on %s (%s)", listener.address, transport.name)
        try:
            async with serve_app(application) as state:
                yield state
        finally:
            await listener.close()

    app.router.lifespan_context = lifespan

    @app.get(KV_TRANSPORT_PATH)
    async def kv_transport() -> dict[str, Any]:
        return {"transport": transport.name, "port": kv_port, "endpoint": endpoint.as_dict()}

    @app.middleware("http")
    async def no_client_requests(request: Request, call_next: RequestResponseEndpoint) -> Response:
        """A prefill instance computes prompts for decode instances only."""
        if request.method == "POST" and request.url.path.startswith("/v1/"):
            message = (
                "this instance serves the prefill role; send requests to tessera router "
                "or to a decode instance"
            )
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
            return JSONResponse(body, status_code=400)
        return await call_next(request)


def local_transports(
    device: str | None, timeout_s: float
) -> tuple[KVEndpoint, dict[str, KVTransport]]:
    """This instance's KV endpoint and its transports by name, fastest first: CUDA IPC where
    the engine runs on a GPU whose UUID is known, TCP always."""
    import torch

    tcp = TcpTransport(timeout_s=timeout_s)
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(name)
    if cuda.type != "cuda" or not torch.cuda.is_available():
        return KVEndpoint(host_id(), "cpu", ("tcp",)), {"tcp": tcp}
    from tessera.agents.engine.kv_transport_cuda_ipc import CUDA_IPC, CudaIpcTransport

    index = cuda.index if cuda.index is not None else torch.cuda.current_device()
    uuid_of = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid_of is None:  # no way to tell two processes' GPUs apart: TCP only
        return KVEndpoint(host_id(), "unknown", ("tcp",)), {"tcp": tcp}
    ipc = CudaIpcTransport(torch.device("cuda", index), timeout_s)
    endpoint = KVEndpoint(host_id(), str(uuid_of), (CUDA_IPC, "tcp"))
    return endpoint, {CUDA_IPC: ipc, "tcp": tcp}
