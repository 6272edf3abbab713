"""The engine in real time: requests arrive from any thread, tokens leave as each step makes them.

`Engine` itself is single-threaded and synchronous (add, step, abort). `ServingLoop` owns one
engine and is the only code that touches it: callers on other threads (the HTTP server's event
loop, a benchmark) `submit` and `abort`; the loop thread drains those commands between steps,
steps while anything is unfinished, hands each request's new tokens to that request's sink, and
sleeps on an event when idle. What it adds to the engine is what serving needs and a batch run
does not: a bounded waiting queue (`QueueFullError`, which the server answers with 429),
per-request deadlines, and aborts that free a request's KV blocks at the next step boundary.

Live migration (migration.py) runs its engine work here too: `call` runs a function on the
engine between steps (reading blocks, pausing a request, reserving blocks), `import_now` takes a
migrated request in at once or not at all, and `hand_off` ends a request that continues
elsewhere without ending its stream.

Sinks run on the loop thread and must not block (the server's puts the event on its asyncio
loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from tessera.agents.engine.engine import Engine, RequestNotFoundError, RoleError
from tessera.agents.engine.kv_cache import OutOfKVBlocksError
from tessera.agents.engine.kv_transfer import KVPackage
from tessera.agents.engine.request import FinishReason, RequestOutput, SamplingParams
from tessera.agents.engine.stats import EngineStatsSnapshot

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests; try again later."""


class LoopStoppedError(RuntimeError):
    """The loop is not running (stopped, or never started)."""


@dataclass(slots=True)
class TokenEvent:
    """What one step (or an abort, deadline or failure) did for one request. Not frozen (a
    frozen dataclass's __init__ sets each field through object.__setattr__: 1.9 us against
    0.6, made for every live stream every step); nobody changes one after it is made."""

    request_id: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    timed_out: bool = False
    parked: bool = False
    """Prefill-only role: prefill done, first token sampled, KV held until exported (or
    aborted)."""
    error: str | None = None
    """The engine failed while running this request (FinishReason.ERROR, or a step that
    raised); the server answers 500."""


Sink = Callable[[TokenEvent], None]
T = TypeVar("T")


@dataclass
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink
    deadline_s: float | None
    admitted: Future[str]


@dataclass
class _Import:
    package: KVPackage
    sink: Sink
    deadline_s: float | None
    admitted: Future[str]


@dataclass
class _Live:
    sink: Sink
    deadline_s: float | None


class ServingLoop:
    """One engine, stepped on its own thread; thread-safe `submit` and `abort`."""

    def __init__(
        self,
        engine: Engine,
        max_waiting: int = 256,
        clock: Callable[[], float] = time.monotonic,
        on_iteration: Callable[[EngineStatsSnapshot], None] | None = None,
    ) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.clock = clock
        self.on_iteration = on_iteration
        """Called on the loop thread after every iteration with the engine's stats (drained of
        their TTFT/TPOT samples, which go to the callback once each)."""
        self._lock = threading.Lock()
        self._inbox: deque[_Submission] = deque()
        self._aborts: deque[str] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        """Engine work of other threads (migration), run in arrival order between steps."""
        self._imports: deque[_Import] = deque()
        """KV packages waiting for free blocks, tried in arrival order before each step."""
        self._engine_waiting = 0
        self._wake = threading.Event()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- any thread ----------------------------------------------------------------------

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Future[str]:
        """Queue a request; the future resolves to its id once the engine holds it, or to the
        engine's ValueError when it refuses the prompt. Raises QueueFullError at once when
        `max_waiting` requests are already waiting."""
        rid = request_id or f"serve-{next(self._ids)}"
        prompt = list(prompt_token_ids)
        return self._enqueue(
            self._inbox,
            lambda deadline, admitted: _Submission(rid, prompt, params, sink, deadline, admitted),
            timeout_s,
        )

    def submit_import(
        self, package: KVPackage, sink: Sink, timeout_s: float | None = None
    ) -> Future[str]:
        """Queue a request that arrives with its KV (prefill->decode, migration); it enters
        the engine once its blocks fit (`Engine.import_kv`), in arrival order. The future
        resolves to its id then, or to the engine's KVTransferError."""
        return self._enqueue(
            self._imports,
            lambda deadline, admitted: _Import(package, sink, deadline, admitted),
            timeout_s,
        )

    def _enqueue(
        self,
        queue: deque[Any],
        build: Callable[[float | None, Future[str]], Any],
        timeout_s: float | None,
    ) -> Future[str]:
        """Append what `build` makes to `queue` if the waiting queue has room; wake the loop."""
        if self._stopping:
            raise LoopStoppedError("the serving loop is stopping")
        admitted: Future[str] = Future()
        deadline = None if timeout_s is None else self.clock() + timeout_s
        with self._lock:
            self._check_room()
            queue.append(build(deadline, admitted))
        self._wake.set()
        return admitted

    def _check_room(self) -> None:
        waiting = len(self._inbox) + len(self._imports) + self._engine_waiting
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting")

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, stop string seen); its KV is freed before the next step.
        Unknown or finished ids are ignored: the request may have finished meanwhile."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run `fn(engine)` on the loop thread at the next step boundary; the future holds its
        result or exception. For short engine work of other threads (a migration's block
        reads and pauses): the engine is the loop's alone."""
        engine = self.engine
        return self._call(lambda: fn(engine))

    def import_now(
        self,
        package: KVPackage,
        sink: Sink,
        held_blocks: list[int],
        timeout_s: float | None = None,
        prompt_checked: bool = False,
    ) -> Future[str]:
        """Take in a migrated request at the next step boundary, with its pre-copied
        `held_blocks`, and give its tokens to `sink`: at once or not at all (the engine's
        OutOfKVBlocksError or KVTransferError), never queued, since its source waits paused.
        `prompt_checked`: as `Engine.import_kv`'s."""

        def take() -> str:
            request_id = self.engine.import_kv(package, held_blocks, prompt_checked)
            deadline = None if timeout_s is None else self.clock() + timeout_s
            self._live[request_id] = _Live(sink, deadline)
            return request_id

        return self._call(take)

    def hand_off(self, request_id: str) -> Future[None]:
        """The request continues in another engine: end it here, freeing its blocks, without
        an event to its sink (its stream ends with the migration's own event)."""

        def end() -> None:
            self._live.pop(request_id, None)
            self.engine.complete_export(request_id)

        return self._call(end)

    def _call(self, fn: Callable[[], T]) -> Future[T]:
        if self._stopping:
            raise LoopStoppedError("the serving loop is stopping")
        done: Future[T] = Future()
        with self._lock:
            self._calls.append((fn, done))
        self._wake.set()
        return done

    def live_request_ids(self) -> list[str]:
        """Requests the loop holds now (any thread; a snapshot)."""
        with self._lock:
            return list(self._live)

    @property
    def num_waiting(self) -> int:
        """Requests queued for the engine, submitted or waiting inside it."""
        with self._lock:
            return len(self._inbox) + len(self._imports) + self._engine_waiting

    def has_work(self) -> bool:
        """Anything submitted and not yet finished (for callers that drive `run_once`)."""
        with self._lock:
            return bool(self._inbox or self._imports or self._aborts or self._live or self._calls)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="serving-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort everything in flight and end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # ---- the loop thread -----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The loop thread runs (a server's liveness: requests would hang without it)."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping:
            try:
                self.run_once(idle_wait_s=1.0)
            except Exception as error:  # keep serving: fail what is in flight, not the thread
                log.exception("serving loop iteration failed; failing %d requests", len(self._live))
                for request_id in list(self._live):
                    self._end(request_id, FinishReason.ERROR, error=f"serving loop: {error}")
        self.shutdown()

    def shutdown(self) -> None:
        """Abort every request in flight, queued imports included (on the loop's thread, or
        by a caller driving `run_once` itself)."""
        self._drain()
        with self._lock:
            imports = list(self._imports)
            self._imports.clear()
            calls = list(self._calls)
            self._calls.clear()
        for queued in imports:
            queued.admitted.cancel()
        for _, done in calls:
            done.cancel()
        for request_id in list(self._live):
            self._end(request_id, FinishReason.ABORTED)

    def run_once(self, idle_wait_s: float = 0.0) -> None:
        """One iteration: take commands, expire deadlines, run one step (or wait for work up to
        `idle_wait_s`), report. The thread calls it in a loop; a caller that owns the loop (a
        single-threaded benchmark) may call it directly instead of `start`."""
        self._wake.clear()
        self._drain()
        self._expire()
        engine = self.engine
        stepped = False
        if engine.has_unfinished():
            try:
                outputs = engine.step()
            except Exception as error:  # the engine's state is unknown: fail what it held
                log.exception("engine step failed; failing %d requests", len(self._live))
                for request_id in list(self._live):
                    self._end(request_id, FinishReason.ERROR, error=f"engine failure: {error}")
                outputs = []
            stepped = bool(outputs)
            self._dispatch(outputs)
        if self.on_iteration is not None:
            snapshot = engine.stats_snapshot(drain=True)
            waiting = snapshot.queue_length
            self.on_iteration(snapshot)
        else:
            waiting = engine.scheduler.num_waiting
        with self._lock:
            self._engine_waiting = waiting
        if not stepped and idle_wait_s > 0:
            self._wake.wait(self._idle_wait(idle_wait_s))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand each live request's step output to its sink. Runs per live stream per step,
        so kept lean: the engine makes each output's token list for this step alone, which
        the event takes as it is (no copy)."""
        live_of = self._live.get
        for output in outputs:
            request_id = output.request_id
            live = live_of(request_id)
            if live is None:
                continue
            finished = output.finished
            if finished:
                del self._live[request_id]
                self.engine.pop_finished(request_id)
            live.sink(
                TokenEvent(
                    request_id,
                    output.new_token_ids,
                    finished,
                    output.finish_reason,
                    False,
                    output.parked,
                    output.error,
                )
            )

    def _idle_wait(self, idle_wait_s: float) -> float:
        """Sleep until woken, or until the nearest deadline."""
        deadlines = [live.deadline_s for live in self._live.values() if live.deadline_s]
        if not deadlines:
            return idle_wait_s
        return max(0.0, min(idle_wait_s, min(deadlines) - self.clock()))

    def apply_commands(self) -> None:
        """Take submissions, aborts and imports now, without stepping (for a caller driving
        `run_once` on its own thread, e.g. to free an aborted request's blocks at once)."""
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            submissions = list(self._inbox)
            self._inbox.clear()
            aborts = list(self._aborts)
            self._aborts.clear()
            calls = list(self._calls)
            self._calls.clear()
        for sub in submissions:
            try:
                self.engine.add_request(sub.prompt_token_ids, sub.params, sub.request_id)
            except ValueError as error:
                sub.admitted.set_exception(error)
                continue
            self._live[sub.request_id] = _Live(sub.sink, sub.deadline_s)
            sub.admitted.set_result(sub.request_id)
        # A request is aborted only after its submission (which this drain took first), so an
        # id that is not live has finished already.
        for request_id in aborts:
            if request_id in self._live:
                self._end(request_id, FinishReason.ABORTED)
        for fn, done in calls:
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn())
            except Exception as error:  # the caller's to handle; the loop goes on
                done.set_exception(error)
        self._admit_imports()

    def _admit_imports(self) -> None:
        while True:
            with self._lock:
                if not self._imports:
                    return
                queued = self._imports[0]
            try:
                request_id = self.engine.import_kv(queued.package)
            except OutOfKVBlocksError:
                return  # the blocks are not free yet: retry before the next step
            except (ValueError, RoleError) as error:  # a package this engine cannot take
                queued.admitted.set_exception(error)
                request_id = None
            with self._lock:
                self._imports.popleft()
            if request_id is not None:
                self._live[request_id] = _Live(queued.sink, queued.deadline_s)
                queued.admitted.set_result(request_id)

    def _expire(self) -> None:
        now = self.clock()
        for request_id, live in list(self._live.items()):
            if live.deadline_s is not None and now >= live.deadline_s:
                self._end(request_id, FinishReason.ABORTED, timed_out=True)

    def _end(
        self,
        request_id: str,
        reason: FinishReason,
        timed_out: bool = False,
        error: str | None = None,
    ) -> None:
        """Take a live request out of the engine (freeing its KV) and tell its sink."""
        live = self._live.pop(request_id)
        try:
            self.engine.abort(request_id)
            self.engine.pop_finished(request_id)
        except RequestNotFoundError:
            log.warning("request %s was not in the engine when it ended", request_id)
        live.sink(TokenEvent(request_id, [], True, reason, timed_out=timed_out, error=error))
