"""Live migration of a decoding request between two engines, over one KV channel.

Where it sits: `ServingLoop` owns each engine; this module drives a migration from the outside,
on an asyncio loop, doing every piece of engine work through the loop (`ServingLoop.call`,
`import_now`, `hand_off`) so that it happens between steps. The HTTP side (routes, streams, the
router following the request, drain) is agents/serving/migration.py; this module needs neither
FastAPI nor a tokenizer, so the GPU benchmark runs it as it is (bench/migration_bench.py).

The protocol, on a channel the source opens to the target's migration listener (JSON messages
and KV packages, `KVChannel`):

    source -> target  {"type": "begin", "protocol", "request_id", "geometry",
                       "prompt_token_ids", "serving"}
    target -> source  {"ok": true}                      or {"error": why}: nothing taken
    repeat (pre-copy; the request keeps decoding on the source meanwhile):
      source -> target  {"type": "blocks", "first_block": k}, then a package of blocks k..k+n-1
      target -> source  {"ok": true, "held_blocks": k+n}  or {"error": why}
    source pauses the request (stop-and-copy):
      source -> target  {"type": "commit", "first_block": k}, then a package with the request's
                        state (generated tokens, sampling, computed count; the prompt came with
                        begin) and its blocks from k on
      target -> source  {"committed": true, "timings_ms": {...}}  or {"error": why}

Pre-copy stages copy only *full* blocks (every slot computed), which no later step writes, so a
copied block never goes stale: each stage takes the blocks filled since the last one. The source
stops pre-copying when a stage has at most `stop_copy_blocks` new blocks (or after
`max_precopy_stages`), pauses the request (`Engine.pause`, through the scheduler's `park`) and
sends the last blocks with the request's state: what crosses the network while the request
does not decode is a block or two and a header, whatever the context length.

Commit point: the target's {"committed": true}. The target sends it once the request is in its
engine and decoding (`import_now`); the source then ends the request (`hand_off`, freeing its
blocks) and the serving layer tells the client's stream where it went. Anything else aborts:

- refused at begin (another model, a draining target, a duplicate id): nothing was taken;
- a package fails its checksums, the target has no room (`OutOfKVBlocksError`), the channel
  breaks or times out (either side killed), the request was preempted (its copied blocks are
  gone): the target frees every block it held for the request when the channel ends without a
  commit, and the source resumes the request (`Engine.resume`) if it had paused it. No request
  is lost and no block is leaked on either side.
- the commit's answer is lost (the target committed, the source did not hear it): the source
  resumes and keeps the request; the target's copy is never attached to by a client, and the
  serving layer aborts it after its attach timeout. The request runs twice for a while; it is
  never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from tessera.agents.engine.engine import Engine
from tessera.agents.engine.kv_cache import OutOfKVBlocksError
from tessera.agents.engine.kv_transfer import KVGeometry, KVPackage, KVTransferError
from tessera.agents.engine.kv_transport import KVChannel, KVTransportError
from tessera.agents.engine.serving_loop import LoopStoppedError, ServingLoop, Sink

log = logging.getLogger(__name__)

PROTOCOL = "tessera-migration/1"
PAUSED_STAGES = ("stop-and-copy", "commit")
"""Stages in which the source holds the request paused: an abort there resumes it."""
FAULTS = ("corrupt-precopy", "corrupt-final", "hold-precopy", "hold-final", "drop-commit-answer")
"""Test hooks of a migration's source (never set in production): flip one bit of the first
pre-copy or the final package after its checksums were taken; wait `hold_s` before the second
pre-copy stage or before sending the final package, with the request paused (time for a test to
kill a process there); close the channel without reading the commit's answer."""


class MigrationAbortedError(RuntimeError):
    """The migration stopped before its commit; the request goes on where it was."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"migration aborted at {stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass(frozen=True)
class MigrationConfig:
    max_precopy_stages: int = 8
    """Pre-copy rounds at most before the stop-and-copy, however fast the request grows."""
    stop_copy_blocks: int = 0
    """Stop pre-copying once a round finds at most this many newly filled blocks. 0: the
    stop-and-copy sends only the last, partly filled block unless `max_precopy_stages` ran out
    first (a round for one block is a few ms; filling one takes `block_size` decode steps)."""
    max_stage_blocks: int = 256
    """Blocks per package at most (a long prompt's first round is sent in several): bounds
    the host memory a transfer holds (Llama-3-8B: 2 MiB a block)."""
    answer_timeout_s: float = 30.0
    """Longest wait for the target's answer to one message."""
    hold_s: float = 3.0
    """How long the hold-* test faults wait."""


@dataclass
class MigrationReport:
    """What a migration did (JSON in the server's answer, a row of the benchmark)."""

    request_id: str
    target: str
    committed: bool = False
    stage: str = "begin"
    """Where it ended: begin, precopy, stop-and-copy, commit (or committed)."""
    reason: str = ""
    precopy_stages: int = 0
    precopy_blocks: int = 0
    precopy_bytes: int = 0
    precopy_s: float = 0.0
    final_blocks: int = 0
    final_bytes: int = 0
    stall_s: float = 0.0
    """From the pause on the source to the target's commit answer: the time the request did
    not decode (stop-and-copy and commit)."""
    num_output_tokens: int = 0
    """Tokens it had generated when paused: the target continues from the next."""
    stall_stages_ms: dict[str, float] = field(default_factory=dict)
    """Where the stall went, in order: pause (the source's loop pauses the request, reads its
    last blocks, packages them), handback (to the migration's asyncio loop), send (the commit
    message and package written), answer (until the target's answer); then the target's own
    account, which overlaps send and answer: target_receive (reading and verifying the
    package), target_adopt (its serving side), target_import (queued for and run by its
    loop)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _blocks_package(geometry: KVGeometry, request_id: str, blocks: torch.Tensor) -> KVPackage:
    """A pre-copy stage's package: blocks only (no tokens: those go with the commit)."""
    return KVPackage.build(
        request_id=request_id,
        geometry=geometry,
        prompt_token_ids=[],
        output_token_ids=[],
        num_computed_tokens=0,
        sampling={},
        blocks=blocks,
    )


async def _wait(future: Any) -> Any:
    return await asyncio.wrap_future(future)


async def _answer(channel: KVChannel, stage: str, timeout_s: float) -> dict[str, Any]:
    try:
        message = await asyncio.wait_for(channel.receive_message(), timeout_s)
    except (KVTransportError, TimeoutError) as error:
        raise MigrationAbortedError(stage, f"target did not answer: {error!r}") from error
    if "error" in message:
        raise MigrationAbortedError(stage, f"target refused: {message['error']}")
    return message


async def migrate_out(
    loop: ServingLoop,
    request_id: str,
    channel: KVChannel,
    target: str,
    serving: dict[str, Any] | None = None,
    config: MigrationConfig | None = None,
    fault: str | None = None,
    on_committed: Callable[[MigrationReport], None] | None = None,
) -> MigrationReport:
    """Move `request_id` from `loop`'s engine to the target at the other end of `channel`.

    Returns the report: committed (the request is the target's, ended here, `on_committed`
    called) or not (the request runs here as before; `stage` and `reason` say why). `serving`
    is what the target's serving layer needs besides the engine state (stop strings, the
    stream's identity); it crosses in the begin message.
    """
    config = config or MigrationConfig()
    report = MigrationReport(request_id, target)
    try:
        await _run_source(loop, request_id, channel, serving or {}, config, fault, report)
    except MigrationAbortedError as error:
        report.stage, report.reason = error.stage, error.reason
    except Exception as error:  # the transport, checksums, anything: the request goes on here
        report.reason = f"{type(error).__name__}: {error}"
    except BaseException:  # cancelled: never leave the request paused
        if report.stage in PAUSED_STAGES:
            loop.call(_resume_paused(request_id))
        raise
    if not report.committed:
        if report.stage in PAUSED_STAGES:
            await _resume(loop, request_id)
        log.warning("migration of %s to %s aborted: %s", request_id, target, report.reason)
        return report
    try:
        await _wait(loop.hand_off(request_id))
    except KeyError:  # ended here meanwhile (client gone, deadline): the target's copy times out
        log.warning("request %s ended on the source during its commit", request_id)
    if on_committed is not None:
        on_committed(report)
    return report


def _resume_paused(request_id: str) -> Callable[[Engine], None]:
    def resume(engine: Engine) -> None:
        if engine.requests.get(request_id) is not None:  # else it ended meanwhile
            engine.resume(request_id)

    return resume


async def _resume(loop: ServingLoop, request_id: str) -> None:
    try:
        await _wait(loop.call(_resume_paused(request_id)))
    except Exception:  # the request cannot go on: end it rather than leave it parked
        log.exception("resuming %s after its aborted migration failed; aborting it", request_id)
        loop.abort(request_id)


async def _run_source(
    loop: ServingLoop,
    request_id: str,
    channel: KVChannel,
    serving: dict[str, Any],
    config: MigrationConfig,
    fault: str | None,
    report: MigrationReport,
) -> None:
    geometry: KVGeometry = await _wait(loop.call(lambda engine: engine.kv_geometry))

    def prompt_of(engine: Engine) -> list[int]:
        if not engine.migratable(request_id):
            raise MigrationAbortedError("begin", f"request {request_id!r} is not decoding here")
        return list(engine.requests[request_id].prompt_token_ids)

    prompt = await _wait(loop.call(prompt_of))
    await channel.send_message(
        {
            "type": "begin",
            "protocol": PROTOCOL,
            "request_id": request_id,
            "geometry": dataclasses.asdict(geometry),
            "prompt_token_ids": prompt,
            "serving": serving,
        }
    )
    await _answer(channel, "begin", config.answer_timeout_s)

    report.stage = "precopy"
    started = time.perf_counter()
    sent, epoch = 0, None
    held_once = False
    while report.precopy_stages < config.max_precopy_stages:
        if fault == "hold-precopy" and report.precopy_stages == 1 and not held_once:
            held_once = True
            await asyncio.sleep(config.hold_s)  # test hook: a window to kill a process in

        def read(engine: Engine, first: int = sent) -> tuple[torch.Tensor, int]:
            if not engine.migratable(request_id):
                raise MigrationAbortedError("precopy", "the request stopped decoding")
            return engine.read_kv_blocks(request_id, first, config.max_stage_blocks, True)

        blocks, preemptions = await _wait(loop.call(read))
        if epoch is not None and preemptions != epoch:
            raise MigrationAbortedError("precopy", "the request was preempted; its blocks are gone")
        epoch = preemptions
        count = int(blocks.shape[0])
        if count == 0 or (count <= config.stop_copy_blocks and report.precopy_stages > 0):
            break
        package = await asyncio.to_thread(_blocks_package, geometry, request_id, blocks)
        corrupt = fault == "corrupt-precopy" and report.precopy_stages == 0
        await channel.send_message({"type": "blocks", "first_block": sent})
        report.precopy_bytes += await channel.send_package(package, corrupt=corrupt)
        answer = await _answer(channel, "precopy", config.answer_timeout_s)
        sent += count
        if answer.get("held_blocks") != sent:
            raise MigrationAbortedError("precopy", f"target holds {answer.get('held_blocks')}")
        report.precopy_blocks = sent
        if count < config.max_stage_blocks:  # a round cut by the package bound goes on
            report.precopy_stages += 1
    report.precopy_s = time.perf_counter() - started

    report.stage = "stop-and-copy"
    paused_at: list[float] = []

    def pause(engine: Engine) -> tuple[KVPackage, int]:
        engine.pause(request_id)
        paused_at.append(time.perf_counter())
        try:
            blocks, preemptions = engine.read_kv_blocks(request_id, sent, 1 << 30, False)
            if epoch is not None and preemptions != epoch:
                raise MigrationAbortedError("precopy", "the request was preempted")
            package = engine.package_state(request_id, blocks, with_prompt=False)
        except BaseException:
            engine.resume(request_id)
            raise
        paused_at.append(time.perf_counter())
        return package, len(package.output_token_ids)

    try:
        package, report.num_output_tokens = await _wait(loop.call(pause))
    except KVTransferError as error:  # it stopped decoding (finished) before the pause
        report.stage = "precopy"
        raise MigrationAbortedError("precopy", str(error)) from error
    except MigrationAbortedError:
        report.stage = "precopy"  # resumed already
        raise
    handed_back = time.perf_counter()
    if fault == "hold-final":
        await asyncio.sleep(config.hold_s)
    report.final_blocks = package.num_blocks
    await channel.send_message({"type": "commit", "first_block": sent})
    report.final_bytes = await channel.send_package(package, corrupt=fault == "corrupt-final")
    sent_at = time.perf_counter()
    report.stage = "commit"
    if fault == "drop-commit-answer":
        raise MigrationAbortedError("commit", "test hook: the commit's answer was dropped")
    answer = await _answer(channel, "commit", config.answer_timeout_s)
    if answer.get("committed") is not True:
        raise MigrationAbortedError("commit", f"unexpected answer {answer}")
    answered = time.perf_counter()
    report.stall_s = answered - paused_at[0]
    stages = {
        "pause": paused_at[1] - paused_at[0],
        "handback": handed_back - paused_at[1],
        "send": sent_at - handed_back,
        "answer": answered - sent_at,
    }
    report.stall_stages_ms = {name: round(s * 1e3, 3) for name, s in stages.items()}
    timings = answer.get("timings_ms")
    if isinstance(timings, dict):  # the target's own view (any version may leave it out)
        report.stall_stages_ms.update(
            {f"target_{k}": float(v) for k, v in timings.items() if isinstance(v, int | float)}
        )
    report.committed, report.stage = True, "committed"


# ---- the target ------------------------------------------------------------------------------


class Adoption(Protocol):
    """The target's serving side of one incoming request, made before its commit."""

    @property
    def sink(self) -> Sink:
        """Gets the request's tokens from the import on."""

    @property
    def timeout_s(self) -> float | None:
        """What is left of the request's deadline."""

    def adopted(self, request_id: str) -> None:
        """The request is in the engine and decoding (before the commit answer is sent)."""

    def discard(self) -> None:
        """The commit failed: forget the request."""


Adopter = Callable[[dict[str, Any], KVPackage], Awaitable[Adoption]]
"""Makes the Adoption for a commit (its begin message, its final package); raises
MigrationRefusedError to refuse."""
Admission = Callable[[dict[str, Any]], None]
"""Checks a begin message beyond the engine's checks; raises MigrationRefusedError."""


class MigrationRefusedError(RuntimeError):
    """The target will not take this request (draining, a duplicate, another model)."""


@dataclass
class MigrationTarget:
    """Serves migration channels into one serving loop (a `KVTransport.listen` handler)."""

    loop: ServingLoop
    adopter: Adopter
    admission: Admission | None = None
    timeout_s: float = 30.0
    """Longest wait for the source's next message."""
    committed: int = 0
    aborted: int = 0
    held_by_channel: dict[int, list[int]] = field(default_factory=dict)

    async def handle(self, channel: KVChannel) -> None:
        held: list[int] = []
        self.held_by_channel[id(channel)] = held
        try:
            await self._serve(channel, held)
        except (
            MigrationRefusedError,
            OutOfKVBlocksError,
            KVTransferError,
            KVTransportError,
            TimeoutError,
        ) as error:
            self.aborted += 1
            log.warning("incoming migration aborted: %s", error)
            await _send_error(channel, f"{type(error).__name__}: {error}")
        except Exception as error:
            self.aborted += 1
            log.exception("incoming migration failed")
            await _send_error(channel, f"{type(error).__name__}: {error}")
        finally:
            del self.held_by_channel[id(channel)]
            if held:  # no commit took them: give every pre-copied block back
                with contextlib.suppress(LoopStoppedError):  # the engine goes, cache and all
                    await _wait(self.loop.call(lambda engine: engine.free_kv_blocks(held)))

    async def _next(self, channel: KVChannel) -> dict[str, Any]:
        return await asyncio.wait_for(channel.receive_message(), self.timeout_s)

    async def _serve(self, channel: KVChannel, held: list[int]) -> None:
        begin = await self._next(channel)
        if begin.get("type") != "begin" or begin.get("protocol") != PROTOCOL:
            raise MigrationRefusedError(f"expected a {PROTOCOL} begin message, got {begin}")
        request_id = begin.get("request_id")
        geometry = await _wait(self.loop.call(lambda engine: engine.kv_geometry))
        if begin.get("geometry") != dataclasses.asdict(geometry):
            raise MigrationRefusedError("the source's KV geometry (model, layout) is not ours")
        known = await _wait(self.loop.call(lambda engine: request_id in engine.requests))
        if not isinstance(request_id, str) or not request_id or known:
            raise MigrationRefusedError(f"request id {request_id!r} is missing or here already")
        prompt = begin.get("prompt_token_ids")
        if not isinstance(prompt, list) or not prompt:
            raise MigrationRefusedError("begin carries no prompt_token_ids")
        try:  # now, while the request still decodes on the source: the commit skips it
            await asyncio.to_thread(self.loop.engine.check_token_ids, "prompt_token_ids", prompt)
        except ValueError as error:
            raise MigrationRefusedError(f"begin: {error}") from error
        if self.admission is not None:
            self.admission(begin)
        await channel.send_message({"ok": True})
        while True:
            message = await self._next(channel)
            kind, first = message.get("type"), message.get("first_block")
            if kind not in ("blocks", "commit") or first != len(held):
                raise MigrationRefusedError(f"out of protocol: {message} with {len(held)} held")
            received = time.perf_counter()
            package = await asyncio.wait_for(channel.receive_package(), self.timeout_s)
            if package.request_id != request_id:
                raise MigrationRefusedError(f"package of {package.request_id!r} in {request_id!r}")
            if kind == "blocks":
                held.extend(await _wait(self.loop.call(partial(_hold, package))))
                await channel.send_message({"ok": True, "held_blocks": len(held)})
                continue
            if package.prompt_token_ids:
                raise MigrationRefusedError("the commit package repeats the prompt")
            package.prompt_token_ids = prompt  # checked at begin; the import checks the rest
            parsed = time.perf_counter()
            adoption = await self.adopter(begin, package)
            adopted = time.perf_counter()
            try:
                future = self.loop.import_now(
                    package, adoption.sink, list(held), adoption.timeout_s, prompt_checked=True
                )
                adopted_id = await _wait(future)
            except BaseException:
                adoption.discard()
                raise
            held.clear()  # the request owns them now
            adoption.adopted(adopted_id)
            self.committed += 1
            stages = {
                "receive": parsed - received,
                "adopt": adopted - parsed,
                "import": time.perf_counter() - adopted,
            }
            timings = {name: round(s * 1e3, 3) for name, s in stages.items()}
            await channel.send_message({"committed": True, "timings_ms": timings})
            return


def _hold(package: KVPackage, engine: Engine) -> list[int]:
    return engine.hold_kv_blocks(package)


async def _send_error(channel: KVChannel, message: str) -> None:
    with contextlib.suppress(KVTransportError):  # the source is gone; it aborts on its own
        await channel.send_message({"error": message})
