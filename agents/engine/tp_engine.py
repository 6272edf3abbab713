"""A tensor-parallel engine as the caller sees it: `start_tensor_parallel_engine` starts one
process per rank (tp_worker.py) and returns a `TensorParallelEngine`, which has the
single-device `Engine`'s interface (add_request, step, abort, pop_finished, stats_snapshot,
generate, has_unfinished, scheduler counts) and runs each call on rank 0.

It is also the ranks' supervisor: a thread waits on the rank processes and, when any one
exits unasked, ends all the others and marks the engine dead (every later call raises
EngineDeadError; `on_death` is told once, e.g. to stop a server). The ranks in turn exit when
the caller's process dies (each holds a lifeline pipe to it), so none is ever orphaned.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.engine import EngineConfig
from tessera.agents.engine.kv_transfer import KVGeometry, KVPackage, KVTransferError
from tessera.agents.engine.parallel import TensorParallelShard
from tessera.agents.engine.request import Completion, RequestOutput, SamplingParams
from tessera.agents.engine.stats import EngineStatsSnapshot
from tessera.agents.engine.tp_worker import (
    EXIT_GROUP_BROKEN,
    EngineCounts,
    EngineInfo,
    RankSpec,
    RemoteError,
    rank_main,
)
from tessera.agents.engine.warmup import WarmUpReport

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
"""How long a rank gets to exit after SIGTERM before SIGKILL."""


class EngineDeadError(RuntimeError):
    """A rank of the tensor-parallel engine died (or never started); the engine is gone."""


@dataclass(frozen=True)
class SchedulerCounts:
    """`engine.scheduler`'s counts as of the last call (the queues live on rank 0)."""

    num_waiting: int
    num_running: int


class TensorParallelEngine:
    """The handle of a running tensor-parallel engine (see the module docstring)."""

    def __init__(
        self,
        processes: list[BaseProcess],
        commands: Connection,
        lifelines: list[Connection],
        info: EngineInfo,
        rendezvous: Path,
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        self.processes = processes
        self.info = info
        self.config = info.config
        self.device = torch.device(info.device)
        self.max_model_len = info.max_model_len
        self.tensor_parallel_size = len(processes)
        self._commands = commands
        self._lifelines = lifelines
        self._rendezvous = rendezvous
        self._on_death = on_death
        self._counts = info.counts
        self._lock = threading.Lock()
        self._closing = False
        self.death: str | None = None
        """Why the engine died (which rank, how), or None while it lives."""
        self._supervisor = threading.Thread(
            target=self._supervise, name="tp-supervisor", daemon=True
        )
        self._supervisor.start()

    # ---- the Engine interface --------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        result: str = self._call("add_request", list(prompt_token_ids), params, request_id)
        return result

    def step(self) -> list[RequestOutput]:
        result: list[RequestOutput] = self._call("step")
        return result

    def abort(self, request_id: str) -> None:
        self._call("abort", request_id)

    def pop_finished(self, request_id: str) -> Completion:
        result: Completion = self._call("pop_finished", request_id)
        return result

    def stats_snapshot(self, drain: bool = False) -> EngineStatsSnapshot:
        result: EngineStatsSnapshot = self._call("stats_snapshot", drain)
        return result

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        result: list[Completion] = self._call("generate", [list(p) for p in prompts], params)
        return result

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        self._call("run_until_idle", max_steps)

    def warm_up(self) -> WarmUpReport:
        """Rank 0 warms up; its launches go through the driving model, so every rank compiles
        the same kernel variants."""
        result: WarmUpReport = self._call("warm_up")
        return result

    def has_unfinished(self) -> bool:
        """Whether requests wait or run (as of the last call: only calls change it)."""
        return self.death is None and self._counts.has_unfinished

    @property
    def scheduler(self) -> SchedulerCounts:
        return SchedulerCounts(self._counts.num_waiting, self._counts.num_running)

    @property
    def kv_geometry(self) -> KVGeometry:
        """The layout of its KV packages: all the model's heads, gathered from the ranks."""
        return self.info.kv_geometry

    def export_kv(self, request_id: str, on_device: bool = False) -> KVPackage:
        """`Engine.export_kv`, with every rank's heads gathered on rank 0 (tp_kv.py). Always a
        checksummed host package: `on_device` (a same-GPU CUDA IPC share) is not taken, since
        the gathered blocks cross the rank pipe to this process, and the transport then falls
        back to checksummed frames."""
        result: KVPackage = self._call("export_kv", request_id, on_device=False)
        return result

    def import_kv(
        self,
        package: KVPackage,
        held_blocks: list[int] | None = None,
        prompt_checked: bool = False,
    ) -> str:
        """`Engine.import_kv` of a package with all the model's heads (re-shard one from another
        layout first: kv_reshard.reshard); rank 0 hands each rank its heads (tp_kv.py)."""
        if held_blocks:
            raise KVTransferError(
                f"tensor_parallel_size {self.tensor_parallel_size}: live migration into a "
                "tensor-parallel engine (held_blocks) is not supported; import whole packages"
            )
        if package.blocks.device.type != "cpu":  # a CUDA IPC package: through the pipe as bytes
            package = dataclasses.replace(package, blocks=package.blocks.cpu())
        result: str = self._call("import_kv", package, None, prompt_checked)
        return result

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the ranks (rank 0 tells the others), wait for them, kill what is left."""
        if self._closing:
            return
        self._closing = True
        # A call stuck in a step (a hung collective) holds the lock: then no goodbye, only kills.
        if self.death is None and self._lock.acquire(timeout=timeout_s):
            try:
                self._commands.send(("shutdown", (), {}))
                if self._commands.poll(timeout_s):
                    self._commands.recv()
            except (OSError, EOFError):
                pass
            finally:
                self._lock.release()
        _end_processes(self.processes, deadline_s=timeout_s)
        self._release()

    def __enter__(self) -> TensorParallelEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        for conn in (self._commands, *self._lifelines):
            conn.close()
        shutil.rmtree(self._rendezvous, ignore_errors=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.death is not None:
                raise EngineDeadError(self.death)
            try:
                self._commands.send((method, args, kwargs))
                status, payload, counts = self._commands.recv()
            except (OSError, EOFError) as error:
                self._wait_for_death()
                raise EngineDeadError(self.death or f"rank 0 is gone ({error})") from error
            if status == "broken":
                self._wait_for_death()
                cause = payload.rebuild()
                raise EngineDeadError(self.death or f"{method} failed: {cause}") from cause
            self._counts = counts
            if status == "error":
                raise payload.rebuild()
            return payload

    def _wait_for_death(self, timeout_s: float = STOP_GRACE_S * 3) -> None:
        """After rank 0 stopped answering: give the supervisor the time to see why."""
        self._supervisor.join(timeout_s)

    def _supervise(self) -> None:
        sentinels = [p.sentinel for p in self.processes]
        ended = [sentinels.index(s) for s in wait(sentinels)]  # type: ignore[arg-type]
        if self._closing:
            return
        # Name the rank that died first: rank 0 leaves with EXIT_GROUP_BROKEN because of it.
        codes = {rank: self.processes[rank].exitcode for rank in ended}
        rank = next((r for r, c in codes.items() if c != EXIT_GROUP_BROKEN), ended[0])
        code = codes[rank]
        self.death = (
            f"tensor-parallel rank {rank} (pid {self.processes[rank].pid}) exited with "
            f"status {code}; the other ranks were stopped"
        )
        log.error("%s", self.death)
        _end_processes(self.processes, deadline_s=0.0)  # the others could only hang now
        if self._on_death is not None:
            try:
                self._on_death(self.death)
            except Exception:
                log.exception("on_death callback failed")


def _end_processes(processes: list[BaseProcess], deadline_s: float) -> None:
    """Wait up to `deadline_s` for the processes, then SIGTERM, then SIGKILL the rest."""
    end = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    end = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def rank_context() -> multiprocessing.context.ForkServerContext:
    """Ranks fork from a forkserver that has imported torch and the engine once: every rank
    (and every later engine of this process) starts without paying the import again, and,
    unlike a fork of the caller, without its threads or CUDA state."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "tessera.agents.engine.tp_worker"])
    return context


def rank_devices(engine_config: EngineConfig, tensor_parallel_size: int) -> list[str]:
    """One device per rank: cuda:0..TP-1 on CUDA (the default when present), else the CPU."""
    device = engine_config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return ["cpu"] * tensor_parallel_size
    if device != "cuda":
        raise ValueError(
            f"device {device!r}: a tensor-parallel engine takes 'cuda' (ranks on cuda:0.."
            f"{tensor_parallel_size - 1}, see CUDA_VISIBLE_DEVICES) or 'cpu'"
        )
    visible = torch.cuda.device_count()
    if visible < tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} CUDA "
            f"devices; {visible} visible"
        )
    return [f"cuda:{rank}" for rank in range(tensor_parallel_size)]


def start_tensor_parallel_engine(
    weights: str | Path,
    engine_config: EngineConfig | None = None,
    tensor_parallel_size: int = 2,
    *,
    on_death: Callable[[str], None] | None = None,
    startup_timeout_s: float = 900.0,
) -> TensorParallelEngine:
    """Start `tensor_parallel_size` rank processes over a local Hugging Face folder; return
    once every rank has loaded its shard. A degree that does not divide the model's heads is
    refused here, before any process starts (TensorParallelSizeError names the field)."""
    ec = engine_config or EngineConfig()
    LlamaConfig.from_pretrained(weights).tensor_parallel_shard(tensor_parallel_size)
    devices = rank_devices(ec, tensor_parallel_size)
    rendezvous = Path(tempfile.mkdtemp(prefix="tessera-tp-"))
    cpu_threads = max(1, (os.cpu_count() or 1) // tensor_parallel_size)
    context = rank_context()
    processes: list[BaseProcess] = []
    conns: list[Connection] = []
    lifelines: list[Connection] = []
    try:
        for rank, device in enumerate(devices):
            spec = RankSpec(
                shard=TensorParallelShard(rank, tensor_parallel_size),
                weights=str(weights),
                engine_config=ec,
                init_method=f"file://{rendezvous / 'store'}",
                device=device,
                cpu_threads=cpu_threads if device == "cpu" else None,
            )
            ours, theirs = context.Pipe()
            life_theirs, life_ours = context.Pipe(duplex=False)
            process = context.Process(
                target=rank_main,
                args=(spec, theirs, life_theirs),
                name=f"tessera-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            life_theirs.close()
            processes.append(process)
            conns.append(ours)
            lifelines.append(life_ours)
        info = _await_ready(processes, conns, startup_timeout_s)
    except BaseException:
        _end_processes(processes, deadline_s=0.0)
        for conn in (*conns, *lifelines):
            conn.close()
        shutil.rmtree(rendezvous, ignore_errors=True)
        raise
    for conn in conns[1:]:
        conn.close()
    return TensorParallelEngine(processes, conns[0], lifelines, info, rendezvous, on_death)


def _await_ready(
    processes: list[BaseProcess], conns: list[Connection], timeout_s: float
) -> EngineInfo:
    """Rank 0's EngineInfo once every rank said ready; the first error or death raises."""
    deadline = time.monotonic() + timeout_s
    pending = dict(enumerate(conns))
    info: EngineInfo | None = None
    pids: list[int] = [0] * len(processes)
    sentinels = [p.sentinel for p in processes]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EngineDeadError(f"ranks {sorted(pending)} not ready within {timeout_s:.0f} s")
        ready = wait([*pending.values(), *sentinels], timeout=left)
        for rank, conn in list(pending.items()):
            if conn not in ready:
                continue
            try:
                status, payload, rank_info = conn.recv()
            except EOFError:
                continue  # it died: its sentinel says so
            if status == "error":
                assert isinstance(payload, RemoteError)
                raise payload.rebuild()
            pids[rank] = payload
            if rank == 0:
                info = rank_info
            del pending[rank]
        for rank, sentinel in enumerate(sentinels):
            if sentinel in ready and rank in pending:
                code = processes[rank].exitcode
                raise EngineDeadError(f"tensor-parallel rank {rank} exited with status {code}")
    assert info is not None
    return replace(info, pids=tuple(pids))


__all__ = [
    "EngineCounts",
    "EngineDeadError",
    "SchedulerCounts",
    "TensorParallelEngine",
    "start_tensor_parallel_engine",
]
