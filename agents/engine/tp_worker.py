"""The processes of a tensor-parallel engine: one per rank, one rank per device.

Rank 0 runs the `Engine` (scheduler, KV block allocator, sampling) over a `DrivingModel`: before
each forward it broadcasts the step (token ids, positions, cache slots, block tables) to the
other ranks, and before the logits the rows that sample; the other ranks (`follow`) run the same
forward and logits on their shards, so the collectives inside meet. Rank 0 also answers the
caller's commands over a pipe (`serve_commands`): `TensorParallelEngine` (tp_engine.py) sends
add_request, step, abort, ... and gets back each result with the engine's counts. That is
SGLang's split: the scheduler lives in the first TP rank, the caller only talks to it.

Every rank watches a lifeline pipe from the caller and exits when it closes, so no rank outlives
its supervisor; the supervisor ends all ranks when any one dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
from tessera.agents.engine.checkpoint_identity import checkpoint_identity
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.engine import Engine, EngineConfig
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.kv_transfer import KVGeometry
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.parallel import (
    TensorParallelGroup,
    TensorParallelShard,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from tessera.agents.engine.tp_kv import READ_KV, WRITE_KV, ShardedKVCache, follow_read, follow_write
from tessera.agents.engine.weights import load_llama_weights

log = logging.getLogger(__name__)

EXIT_SUPERVISOR_GONE = 3
"""A rank's exit status when its lifeline closed (the process that started it died)."""
EXIT_GROUP_BROKEN = 4
"""Rank 0's exit status when a collective failed under it (another rank died or hung)."""

FORWARD, LOGITS, STOP = "forward", "logits", "stop"
"""What rank 0 tells the other ranks each time: run this step, compute these rows' logits, end."""

COMMANDS = frozenset(
    {
        "add_request",
        "step",
        "abort",
        "pop_finished",
        "stats_snapshot",
        "generate",
        "run_until_idle",
        "warm_up",
        "export_kv",
        "import_kv",
    }
)
"""The Engine methods the caller may run on rank 0."""


@dataclass(frozen=True)
class RankSpec:
    """What one rank process is started with (pickled to it)."""

    shard: TensorParallelShard
    weights: str
    engine_config: EngineConfig
    init_method: str
    device: str
    cpu_threads: int | None = None
    timeout_s: float = 600.0


@dataclass(frozen=True)
class EngineCounts:
    """The engine's state after a command: what the caller reads without asking again."""

    has_unfinished: bool
    num_waiting: int
    num_running: int


@dataclass(frozen=True)
class EngineInfo:
    """Rank 0's engine, described to the caller once it is ready."""

    config: LlamaConfig
    """The whole model's shape (each rank computes `config.tensor_parallel_shard(TP)`)."""
    device: str
    dtype: torch.dtype
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    kv_cache_shape: tuple[int, ...]
    """Rank 0's cache: [layers, 2, blocks, block_size, its KV heads, head_dim]."""
    counts: EngineCounts
    kv_geometry: KVGeometry
    """The layout of the packages the engine exports and imports (all heads, tp_kv.py)."""
    pids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RemoteError:
    """An exception raised on rank 0, carried back to be raised again in the caller.

    Exceptions pickle as `cls(*args)`, which fails for those whose __init__ takes other
    arguments (InvalidSamplingParamsError); this rebuilds them without calling __init__.
    """

    cls: type[BaseException]
    args: tuple[Any, ...]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, error: BaseException) -> RemoteError:
        return cls(type(error), tuple(error.args), dict(vars(error)))

    def rebuild(self) -> BaseException:
        error = self.cls.__new__(self.cls)
        error.args = self.args
        vars(error).update(self.attributes)
        return error


@dataclass
class StepInputs:
    """One forward's inputs, on the host, as rank 0 broadcasts them."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    decode_max_context_len: int
    decode_context_lens_host: list[int] | None
    prefill_spans: list[tuple[int, int, int, torch.Tensor]]

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> StepInputs:
        def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.cpu()

        return cls(
            input_ids=input_ids.cpu(),
            positions=positions.cpu(),
            slot_mapping=meta.slot_mapping.cpu(),
            num_decode_tokens=meta.num_decode_tokens,
            decode_block_tables=host(meta.decode_block_tables),
            decode_context_lens=host(meta.decode_context_lens),
            decode_max_context_len=meta.decode_max_context_len,
            decode_context_lens_host=meta.decode_context_lens_host,
            prefill_spans=[
                (s.start, s.num_tokens, s.num_cached, s.block_table.cpu())
                for s in meta.prefill_spans
            ],
        )

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        def there(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            num_decode_tokens=self.num_decode_tokens,
            decode_block_tables=there(self.decode_block_tables),
            decode_context_lens=there(self.decode_context_lens),
            decode_max_context_len=self.decode_max_context_len,
            decode_context_lens_host=self.decode_context_lens_host,
            prefill_spans=[
                PrefillSpan(start, count, cached, table.to(device))
                for start, count, cached, table in self.prefill_spans
            ],
        )
        return self.input_ids.to(device), self.positions.to(device), meta


class GroupBrokenError(RuntimeError):
    """A collective failed: another rank died or hung, and this group cannot step again."""


class DrivingModel(LlamaModel):
    """Rank 0's model: tells the other ranks what to compute, then computes its own shard."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = False

    def tell(self, kind: str, payload: Any) -> TensorParallelGroup:
        """Broadcast what the other ranks do next (tp_kv.py's reads and writes use it)."""
        return self._tell(kind, payload)

    def _tell(self, kind: str, payload: Any) -> TensorParallelGroup:
        group = self.group
        assert group is not None
        try:
            group.broadcast_object((kind, payload))
        except Exception as error:
            self.broken = True
            raise GroupBrokenError(
                f"tensor-parallel group failed sending {kind}: {error}"
            ) from error
        return group

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        self._tell(FORWARD, StepInputs.of(input_ids, positions, meta))
        try:
            return super().forward(input_ids, positions, meta, kv_cache)
        except Exception as error:
            self.broken = True
            raise GroupBrokenError(f"tensor-parallel forward failed: {error}") from error

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The engine hands over only the rows that sample; the others get them by broadcast.
        group = self._tell(LOGITS, hidden.shape[0])
        try:
            group.broadcast_tensor(hidden.contiguous())
            return super().compute_logits(hidden)
        except Exception as error:
            self.broken = True
            raise GroupBrokenError(f"tensor-parallel logits failed: {error}") from error

    def stop_followers(self) -> None:
        if not self.broken:
            self._tell(STOP, None)


def follow(model: LlamaModel, kv_cache: PagedKVCache, group: TensorParallelGroup) -> None:
    """Ranks 1..TP-1: run what rank 0 broadcasts until it says stop."""
    device = kv_cache.device
    hidden_size, dtype = model.config.hidden_size, model.dtype
    while True:
        kind, payload = group.broadcast_object()
        if kind == STOP:
            return
        if kind == FORWARD:
            input_ids, positions, meta = payload.on(device)
            model.forward(input_ids, positions, meta, kv_cache)
        elif kind == LOGITS:
            rows = torch.empty(payload, hidden_size, dtype=dtype, device=device)
            model.compute_logits(group.broadcast_tensor(rows))
        elif kind == READ_KV:
            follow_read(kv_cache, group, payload)
        elif kind == WRITE_KV:
            follow_write(kv_cache, group, payload)
        else:
            raise RuntimeError(f"rank {group.rank}: unknown message {kind!r} from rank 0")


def counts_of(engine: Engine) -> EngineCounts:
    return EngineCounts(
        engine.has_unfinished(), engine.scheduler.num_waiting, engine.scheduler.num_running
    )


def serve_commands(engine: Engine, model: DrivingModel, commands: Connection) -> int:
    """Rank 0: run the caller's commands until it shuts down or goes; returns the exit status."""
    while True:
        try:
            method, args, kwargs = commands.recv()
        except EOFError:  # the caller is gone; the lifeline ends this process too
            return EXIT_SUPERVISOR_GONE
        if method == "shutdown":
            model.stop_followers()
            commands.send(("ok", None, counts_of(engine)))
            return 0
        try:
            if method not in COMMANDS:
                raise AttributeError(f"{method!r} is not a tensor-parallel engine command")
            reply = ("ok", getattr(engine, method)(*args, **kwargs), counts_of(engine))
        except Exception as error:
            if model.broken:  # the ranks may be out of step: this engine cannot go on
                commands.send(("broken", RemoteError.of(error), None))
                return EXIT_GROUP_BROKEN
            reply = ("error", RemoteError.of(error), counts_of(engine))
        commands.send(reply)


def local_kv_blocks(spec: RankSpec, config: LlamaConfig, device: torch.device) -> int:
    """KV blocks this rank's device holds for its shard of the heads (the engine's rule)."""
    ec = spec.engine_config
    if ec.num_kv_blocks is not None:
        return ec.num_kv_blocks
    if device.type != "cuda":
        return 1024
    free_bytes, _ = torch.cuda.mem_get_info(device)
    dtype = ec.dtype or torch.bfloat16
    budget = int(free_bytes * ec.kv_cache_memory_fraction)
    return PagedKVCache.num_blocks_for_bytes(config, budget, ec.block_size, dtype)


def _die_with(lifeline: Connection) -> None:
    """Exit at once when the supervisor's end of the lifeline closes (it died or let go)."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os._exit(EXIT_SUPERVISOR_GONE)


def rank_main(spec: RankSpec, conn: Connection, lifeline: Connection) -> None:
    """A rank process's entry point (started by tp_engine.py from its forkserver)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when ranks end
    threading.Thread(target=_die_with, args=(lifeline,), name="lifeline", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"rank {spec.shard.rank} %(name)s %(message)s")
    device = torch.device(spec.device)
    if device.type == "cpu" and spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    try:
        status = _run_rank(spec, conn, device)
    except Exception as error:
        log.exception("rank %d failed", spec.shard.rank)
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", RemoteError.of(error), None))
        status = 1
    destroy_tensor_parallel()
    os._exit(status)  # no interpreter teardown: nothing is left to flush, and gloo may hang


def _run_rank(spec: RankSpec, conn: Connection, device: torch.device) -> int:
    ec = spec.engine_config
    group = init_tensor_parallel(spec.shard, spec.init_method, device, spec.timeout_s)
    config = LlamaConfig.from_pretrained(spec.weights)
    shard_config = config.tensor_parallel_shard(spec.shard.size)
    dtype = ec.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    weights = load_llama_weights(spec.weights, config, device, dtype, spec.shard)
    blocks = group.min_int(local_kv_blocks(spec, shard_config, device))
    max_model_len = ec.max_model_len or config.max_position_embeddings
    if not group.is_driver:
        model = LlamaModel(shard_config, weights, max_model_len, group)
        kv_cache = PagedKVCache(shard_config, blocks, ec.block_size, device, dtype)
        conn.send(("ready", os.getpid(), None))
        follow(model, kv_cache, group)
        return 0
    driving = DrivingModel(shard_config, weights, max_model_len, group)
    # No CUDA graphs: a captured step would replay without telling the other ranks.
    config_here = replace(ec, num_kv_blocks=blocks, use_cuda_graphs=False, device=str(device))
    kv_cache = ShardedKVCache(
        shard_config, blocks, ec.block_size, device, dtype, driving, spec.shard.size
    )
    # The whole checkpoint's identity, as a TP=1 engine of it has: their KV packages match.
    identity = checkpoint_identity(spec.weights, config)
    engine = Engine(
        shard_config, weights, config_here, model=driving, kv_cache=kv_cache, identity=identity
    )
    info = EngineInfo(
        config=config,
        device=str(device),
        dtype=dtype,
        max_model_len=engine.max_model_len,
        num_kv_blocks=blocks,
        block_size=ec.block_size,
        kv_cache_shape=tuple(engine.kv_cache.data.shape),
        counts=counts_of(engine),
        kv_geometry=engine.kv_geometry,
    )
    conn.send(("ready", os.getpid(), info))
    return serve_commands(engine, driving, conn)
