"""One request's generation as seen from the HTTP handler's event loop.

Bridges the serving loop's thread to asyncio: the loop's sink puts each `TokenEvent` on this
request's `Inbox` (one `call_soon_threadsafe` per step, EventHandoff), the handler iterates
`deltas()`, and turns
them into one JSON body or a stream of server-sent events. The request is aborted, freeing its
KV, when the client disconnects, when a stop string is seen, or when the handler leaves early
for any reason (`close`).

A streamed generation can also end by migration (agents/serving/migration.py): `end_migrated`
ends `deltas()` after the tokens the source produced, and the stream says where it went.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request
from tessera.agents.engine.kv_transfer import KVPackage
from tessera.agents.engine.request import FinishReason, SamplingParams
from tessera.agents.engine.serving_loop import ServingLoop, TokenEvent
from tessera.agents.serving.metrics import ServingMetrics
from tessera.agents.serving.output import OutputText
from tessera.agents.serving.tokenizer import ServingTokenizer

log = logging.getLogger(__name__)
_ids = itertools.count()
_PROCESS = uuid.uuid4().hex[:12]
"""In request ids, so that a request migrated here never takes the id of one made here."""


class GenerationTimeoutError(RuntimeError):
    """The request ran past the server's --request-timeout-s."""


class EngineFailureError(RuntimeError):
    """The engine failed while running the request."""


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" or "length" on the last delta."""


@dataclass(frozen=True)
class StreamMeta:
    """What a stream's chunks carry besides text: the same on every server it passes through."""

    id: str
    created: int
    chat: bool
    return_token_ids: bool
    include_usage: bool


class Inbox:
    """One stream's events, put on its event loop (the hand-off's flush, a disconnect, a
    migration's end) and taken by `Generation.deltas`. An asyncio.Queue's work cut to what
    one reader needs: no maxsize, no getter/putter lists, one future made only when the
    reader finds it empty (an event per live stream per step goes through here)."""

    def __init__(self) -> None:
        self._items: deque[TokenEvent | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: TokenEvent | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> TokenEvent | None:
        """The oldest event; IndexError when there is none."""
        return self._items.popleft()

    async def get(self) -> TokenEvent | None:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class EventHandoff:
    """Moves token events from the serving loop's thread onto one asyncio loop, batched.

    One `call_soon_threadsafe` (a wake-up of the event loop through its self-pipe) per batch,
    not per request: a step that produces tokens for 64 streams wakes the event loop once.
    """

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventHandoff]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self.aio_loop = aio_loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Inbox, TokenEvent]] = []

    @classmethod
    def of(cls, aio_loop: asyncio.AbstractEventLoop) -> EventHandoff:
        handoff = cls._by_loop.get(aio_loop)
        if handoff is None:
            handoff = cls._by_loop[aio_loop] = cls(aio_loop)
        return handoff

    def put(self, queue: Inbox, event: TokenEvent) -> None:
        """From the loop thread: queue the event; wake the event loop if it is not due."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a flush is scheduled already
        with contextlib.suppress(RuntimeError):  # the event loop closed (shutdown)
            self.aio_loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def _mergeable(event: TokenEvent | None) -> bool:
    """A plain step's tokens, which the next event's may join."""
    return (
        event is not None
        and not event.finished
        and event.error is None
        and not event.timed_out
        and not event.parked
    )


def _joins(event: TokenEvent | None) -> bool:
    """Tokens (maybe the last) that may join the step before: not an error or a timeout,
    which raise before their tokens would be shown."""
    return event is not None and event.error is None and not event.timed_out


class Generation:
    """Submit once, then iterate `deltas()`; `close()` in a finally block."""

    def __init__(
        self,
        loop: ServingLoop,
        tokenizer: ServingTokenizer,
        metrics: ServingMetrics,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop: list[str],
        timeout_s: float | None,
        package: KVPackage | None = None,
        adopt: bool = False,
    ) -> None:
        """With a `package` (decode role) the request continues from KV computed elsewhere:
        its tokens so far are the first delta, and it enters the engine as an import. With
        `adopt` nothing is submitted: a migration imports the request with `self.sink` and
        resolves `admitted` (agents/serving/migration.py)."""
        self.loop = loop
        self.metrics = metrics
        self.request_id = package.request_id if package else f"req-{_PROCESS}-{next(_ids)}"
        self.prompt_token_ids = prompt_token_ids
        self.output = OutputText(tokenizer, stop)
        self.completion_tokens = 0
        self.finished = False
        self.started_s = time.monotonic()
        self.stop = list(stop)
        self.timeout_s = timeout_s
        self.stream: StreamMeta | None = None
        """Set while a server-sent event stream serves it (only those can migrate)."""
        self.migrated: dict[str, Any] | None = None
        """Where it went, once migrated (`end_migrated`)."""
        self._queue = Inbox()
        handoff = EventHandoff.of(asyncio.get_running_loop())
        queue = self._queue

        def sink(event: TokenEvent) -> None:
            handoff.put(queue, event)

        self.sink = sink
        if adopt:
            self.request_id = ""
            self.admitted: Future[str] = Future()
            return
        if package is not None:
            self.admitted = loop.submit_import(package, sink, timeout_s=timeout_s)
            first = TokenEvent(self.request_id, list(package.output_token_ids), False)
            self._queue.put_nowait(first)
            return
        self.admitted = loop.submit(
            prompt_token_ids, params, sink, request_id=self.request_id, timeout_s=timeout_s
        )

    async def wait_admitted(self) -> None:
        """Raise the engine's ValueError if it refused the request."""
        await asyncio.wrap_future(self.admitted)

    async def deltas(self, request: Request | None = None) -> AsyncIterator[Delta]:
        """Text deltas until the request finishes; ends early (aborting) if the client goes."""
        watcher = asyncio.create_task(self._watch(request)) if request is not None else None
        try:
            queue = self._queue
            while True:
                first = await queue.get()
                # One event (a step's token, the usual case at one wake-up per step) needs
                # no merging.
                for event in (first,) if queue.empty() else self._coalesced(first):
                    if event is None:  # the client disconnected (close() aborts)
                        return
                    delta = self._on_event(event)
                    if delta is not None:
                        yield delta
                    if self.finished:
                        return
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()

    def _coalesced(self, first: TokenEvent | None) -> list[TokenEvent | None]:
        """`first` and every event queued behind it, the token events among them merged into
        one: when the event loop falls behind the engine (64 streams), a stream answers all
        the steps since its last wake-up with one delta, so one SSE write, not one per step.
        Errors, timeouts and the end-of-stream None stay apart. Without stop strings only:
        with them, tokens after a stop string's step must stay out of the usage count."""
        if self.stop or self._queue.empty():
            return [first]
        events = [first]
        while not self._queue.empty():
            event = self._queue.get_nowait()
            last = events[-1]
            if last is not None and event is not None and _mergeable(last) and _joins(event):
                event = TokenEvent(
                    last.request_id,
                    last.token_ids + event.token_ids,
                    event.finished,
                    event.finish_reason,
                    parked=event.parked,
                )
                events[-1] = event
            else:
                events.append(event)
        return events

    def _on_event(self, event: TokenEvent) -> Delta | None:
        if event.error is not None:
            self.finished = True
            self.metrics.reject("error")
            raise EngineFailureError(event.error)
        if event.timed_out:
            self.finished = True
            self.metrics.reject("timeout")
            raise GenerationTimeoutError("the request ran past the server's --request-timeout-s")
        if self.output.stopped:
            return None  # tokens that were in flight when a stop string ended the request
        self.completion_tokens += len(event.token_ids)
        final = event.finished
        text = self.output.push(event.token_ids, final=final)
        reason = None
        if self.output.stopped:
            reason = "stop"
            if not final:
                self.loop.abort(self.request_id)
        elif final:
            reason = "length" if event.finish_reason is FinishReason.LENGTH else "stop"
            if event.finish_reason is FinishReason.ABORTED:
                self.finished = True
                self.metrics.reject("aborted")
                return None
        if reason is not None:
            self.finished = True
            self.metrics.finished(reason, time.monotonic() - self.started_s)
        return Delta(text, list(event.token_ids), reason)

    async def _watch(self, request: Request) -> None:
        """Abort when the client disconnects (the body has been read, so the next message
        the server receives for this request is its disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.finished:
            log.info("client of %s disconnected; aborting it", self.request_id)
            self.loop.abort(self.request_id)
            self._queue.put_nowait(None)

    def end_migrated(self, where: dict[str, Any]) -> None:
        """The request continues on another server: `deltas()` ends once it has handed out
        the tokens produced here (they are queued before this), and nothing is aborted."""
        self.migrated = where
        self._queue.put_nowait(None)

    def close(self) -> None:
        """Abort the request unless it finished or migrated (idempotent)."""
        if not self.finished and self.migrated is None:
            self.finished = True
            self.metrics.reject("aborted")
            self.loop.abort(self.request_id)
