"""The HTTP routes of `tessera serve` (FastAPI), OpenAI-compatible.

- `POST /v1/completions`, `POST /v1/chat/completions`: JSON, or server-sent events with
  `stream: true` (one `data:` chunk per batch of tokens, then `data: [DONE]`).
- `GET /v1/models`: the one served model. `GET /tessera/v1/instance-stats`: what the node
  agent's telemetry reads (`InstanceStats` as JSON; latency samples since its last read).
- `GET /health`: the process is alive. `GET /ready`: weights loaded and kernels warm (503
  before). `GET /metrics`: Prometheus text.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
request with `param` naming the field (FastAPI's own 422 is mapped to 400), 404 for another
model's name, 429 with Retry-After when the waiting queue is full, 503 before /ready, 504 past
the request timeout, 500 only when the engine itself failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from tessera.agents.engine.kv_transfer import KVPackage
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.serving_loop import QueueFullError, ServingLoop
from tessera.agents.engine.warmup import WarmUpReport
from tessera.agents.instance_stats import INSTANCE_STATS_PATH
from tessera.agents.router import MIGRATED_EVENT
from tessera.agents.serving.generation import (
    Delta,
    EngineFailureError,
    Generation,
    GenerationTimeoutError,
    StreamMeta,
)
from tessera.agents.serving.metrics import ServingMetrics
from tessera.agents.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    StreamChunkText,
    Usage,
    stream_chunk,
)
from tessera.agents.serving.tokenizer import ServingTokenizer, TemplateError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
PrefillHook = Callable[[list[int], SamplingParams, Mapping[str, str]], Awaitable[KVPackage | None]]
"""Decode role (disaggregated.py): a request's KV from a prefill instance, or None to compute
the prompt here; raises ApiError when no prefill instance can serve it."""
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 500, 503, 504)
}


class ApiError(Exception):
    """An error answered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Served:
    """What the routes serve: set once the engine has loaded and warmed up."""

    model_name: str
    max_model_len: int
    metrics: ServingMetrics
    instance_id: str = ""
    request_timeout_s: float | None = None
    loop: ServingLoop | None = None
    tokenizer: ServingTokenizer | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None
    prefill: PrefillHook | None = None
    draining: bool = False
    """Set by POST /internal/drain (migration.py): /ready answers 503 and no request is taken."""
    streams: dict[str, Generation] = field(default_factory=dict)
    """Streamed requests being served, by engine request id: what a migration can move."""
    warmup: WarmUpReport | None = None
    """What the engine's warm-up prepared, shown on /ready."""

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.tokenizer is not None


# The names pydantic gives union branches in an error's location (`prompt.str`,
# `stop.list[...]`): they are not fields, so the field name the client sees leaves them out.
_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param_of(loc: tuple[Any, ...]) -> str:
    """`("body", "messages", 0, "role")` -> `messages[0].role`."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _BRANCH_TAGS or "[" in str(part) or "-" in str(part):
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def validation_error(error: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400 naming the first bad field."""
    errors = list(error.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
    # Of a union's failed branches, the deepest location is the branch the value's type chose
    # (`prompt[1]` of a token list, not "prompt: not a string").
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _param_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = "unsupported parameter"
    elif first.get("type") == "json_invalid":
        param, message = "body", "the body is not valid JSON"
    return ApiError(400, f"{param}: {message}", param=param)


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="tessera serve", version="0.1.0", responses=ERROR_RESPONSES)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        served.metrics.reject("invalid")
        return validation_error(error).response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        if served.loop is not None and not served.loop.alive:
            raise ApiError(503, "the serving loop has stopped", kind="unavailable")
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        if not served.ready:
            raise ApiError(503, served.load_error or "loading weights", kind="unavailable")
        if served.draining:
            raise ApiError(503, "draining: requests move to other instances", kind="unavailable")
        warmup = dataclasses.asdict(served.warmup) if served.warmup else None
        return JSONResponse({"status": "ready", "warmup": warmup})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get(INSTANCE_STATS_PATH)
    async def instance_stats() -> dict[str, Any]:
        """For the node agent: this instance's load, and latency samples since its last read."""
        return dataclasses.asdict(served.metrics.instance_stats(served.instance_id))

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(
            id=served.model_name, created=served.created, max_model_len=served.max_model_len
        )
        return ModelList(data=[card])

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        loop, tokenizer = _ready(served, body)
        if isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = list(body.prompt)
        return await _generate(served, loop, tokenizer, body, prompt, body.max_tokens, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        loop, tokenizer = _ready(served, body)
        try:
            prompt = tokenizer.encode_chat(body.template_messages())
        except TemplateError as error:
            raise ApiError(400, f"messages: {error}", param="messages") from error
        if not prompt:
            raise ApiError(400, "messages: the conversation renders to no tokens", "messages")
        max_tokens = body.requested_max_tokens
        return await _generate(served, loop, tokenizer, body, prompt, max_tokens, request)

    return app


def _ready(served: Served, body: SamplingFields) -> tuple[ServingLoop, ServingTokenizer]:
    if served.loop is None or served.tokenizer is None:
        raise ApiError(503, "the model is still loading; poll /ready", kind="unavailable")
    if served.draining:
        raise ApiError(
            503, "this instance is draining; send requests elsewhere", kind="unavailable"
        )
    if body.model is not None and body.model != served.model_name:
        raise ApiError(
            404,
            f"model: {body.model!r} is not served here (this server serves {served.model_name!r})",
            param="model",
            kind="not_found_error",
        )
    return served.loop, served.tokenizer


async def _start(
    served: Served,
    loop: ServingLoop,
    tokenizer: ServingTokenizer,
    body: SamplingFields,
    prompt: list[int],
    max_tokens: int | None,
    headers: Mapping[str, str] | None = None,
) -> Generation:
    """Check the lengths, (decode role) fetch the prompt's KV, submit, and wait for the engine
    to accept the request."""
    limit = served.max_model_len
    room = limit - len(prompt)
    if room < 1:
        raise ApiError(
            400,
            f"prompt: {len(prompt)} tokens leave no room under the model's context of {limit}",
            param="prompt" if isinstance(body, CompletionRequest) else "messages",
        )
    if max_tokens is not None and max_tokens > room:
        name = "max_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens:
            name = "max_completion_tokens"
        raise ApiError(
            400,
            f"{name}: {max_tokens} tokens after a prompt of {len(prompt)} exceed the model's "
            f"context of {limit}; at most {room}",
            param=name,
        )
    params = SamplingParams(
        max_new_tokens=max_tokens or room,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    package = None
    if served.prefill is not None:
        package = await served.prefill(prompt, params, headers or {})
    try:
        generation = Generation(
            loop,
            tokenizer,
            served.metrics,
            prompt,
            params,
            body.stop_strings,
            served.request_timeout_s,
            package,
        )
    except QueueFullError as error:
        served.metrics.reject("queue_full")
        raise ApiError(
            429,
            f"server busy: {error}; retry after {RETRY_AFTER_S} s",
            kind="rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from error
    try:
        await generation.wait_admitted()
    except ValueError as error:
        served.metrics.reject("invalid")
        field_name = "max_tokens" if "KV blocks" in str(error) else "prompt"
        raise ApiError(400, f"{field_name}: {error}", param=field_name) from error
    return generation


async def _generate(
    served: Served,
    loop: ServingLoop,
    tokenizer: ServingTokenizer,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: list[int],
    max_tokens: int | None,
    request: Request,
) -> Response:
    """Run one request; a stream of events, or the whole answer as one body."""
    chat = isinstance(body, ChatCompletionRequest)
    generation = await _start(served, loop, tokenizer, body, prompt, max_tokens, request.headers)
    now = int(time.time())
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{generation.request_id}"
    if body.stream:
        return _event_stream(generation, request, body, rid, now, served, chat)
    deltas = await _collect(generation, request)
    text = "".join(d.text for d in deltas)
    finish: Any = deltas[-1].finish_reason if deltas else None
    token_ids = generation.output.token_ids if body.return_token_ids else None
    common: dict[str, Any] = {
        "id": rid,
        "created": now,
        "model": served.model_name,
        "usage": _usage(generation),
        "prompt_token_ids": prompt if body.return_token_ids else None,
    }
    response: BaseModel
    if chat:
        message = AssistantMessage(content=text)
        choice = ChatChoice(message=message, finish_reason=finish, token_ids=token_ids)
        response = ChatCompletionResponse(choices=[choice], **common)
    else:
        plain = CompletionChoice(text=text, finish_reason=finish, token_ids=token_ids)
        response = CompletionResponse(choices=[plain], **common)
    return JSONResponse(response.model_dump(exclude_none=True))


async def _collect(generation: Generation, request: Request) -> list[Delta]:
    try:
        return [delta async for delta in generation.deltas(request)]
    except GenerationTimeoutError as error:
        raise ApiError(504, str(error), kind="timeout") from error
    except EngineFailureError as error:
        raise ApiError(500, str(error), kind="server_error") from error


def _usage(generation: Generation) -> Usage:
    prompt = len(generation.prompt_token_ids)
    completion = generation.completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _event_stream(
    generation: Generation,
    request: Request,
    body: SamplingFields,
    rid: str,
    created: int,
    served: Served,
    chat: bool,
) -> StreamingResponse:
    """Server-sent events: (chat: a first chunk with the role), one chunk per delta, an
    optional usage chunk, then [DONE]. An error after the stream began is an error chunk."""
    meta = StreamMeta(rid, created, chat, body.return_token_ids, body.include_usage)
    events = sse_events(generation, request, served, meta, opening=chat)
    return StreamingResponse(events, media_type="text/event-stream")


async def sse_events(
    generation: Generation, request: Request, served: Served, meta: StreamMeta, opening: bool
) -> AsyncIterator[str]:
    """The events of one stream, here from its start (`opening`: the chat role chunk) or from
    where a migration left it (migration.py). A stream whose request migrates away ends with
    the `tessera.migrated` event (no usage, no [DONE]): the router continues it there."""
    name = served.model_name
    generation.stream = meta
    served.streams[generation.request_id] = generation
    chunks = StreamChunkText(meta.chat, meta.id, meta.created, name)
    try:
        if opening:
            yield _sse(stream_chunk(True, meta.id, meta.created, name, "", role="assistant"))
        async for delta in generation.deltas(request):
            # A token may add no text (a special token, a character still incomplete, text held
            # back for a stop string); with return_token_ids its id is sent all the same.
            with_ids = meta.return_token_ids and bool(delta.token_ids)
            if delta.text or delta.finish_reason is not None or with_ids:
                token_ids = delta.token_ids if meta.return_token_ids else None
                yield chunks.sse(delta.text, delta.finish_reason, token_ids)
        if generation.migrated is not None:
            yield migrated_event(generation)
            return
        if meta.include_usage:
            usage = stream_chunk(meta.chat, meta.id, meta.created, name, None)
            usage["usage"] = _usage(generation).model_dump()
            yield _sse(usage)
    except (GenerationTimeoutError, EngineFailureError) as error:
        kind_name = "timeout" if isinstance(error, GenerationTimeoutError) else "server_error"
        yield _sse({"error": {"message": str(error), "type": kind_name, "param": None}})
    finally:
        served.streams.pop(generation.request_id, None)
        generation.close()
    yield "data: [DONE]\n\n"


def migrated_event(generation: Generation) -> str:
    """The control event that ends a migrated stream's part here: where it went, and what the
    target's stream needs to go on without a repeated or a missing character."""
    where = dict(generation.migrated or {})
    where["resume"] = {
        "num_output_tokens": len(generation.output.token_ids),
        "emitted_chars": generation.output.emitted,
        "completion_tokens": generation.completion_tokens,
    }
    return f"event: {MIGRATED_EVENT}\ndata: {json.dumps(where, separators=(',', ':'))}\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
