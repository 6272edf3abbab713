"""The engine: requests in, tokens out, KV blocks across engines.

Roles:
- colocated: prefill and decode here.
- prefill: run a request's prompt, sample its first token, then park it with its KV until
  `export_kv` hands the blocks to a decode engine.
- decode: accept requests only as KV imports (`import_kv`) and continue them.
Any role can export a decoding request (live migration) and import one.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tessera.agents.engine import ops
from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
from tessera.agents.engine.block_tables import padded_block_table
from tessera.agents.engine.checkpoint_identity import checkpoint_identity
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphRunner
from tessera.agents.engine.kv_cache import OutOfKVBlocksError, PagedKVCache
from tessera.agents.engine.kv_transfer import (
    UNCHECKED,
    KVGeometry,
    KVPackage,
    KVTransferError,
    model_identity,
)
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.request import (
    Completion,
    FinishReason,
    RequestOutput,
    RequestState,
    SamplingParams,
    Sequence,
)
from tessera.agents.engine.sampling import SamplingFailure, sample
from tessera.agents.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tessera.agents.engine.stats import EngineStats, EngineStatsSnapshot
from tessera.agents.engine.warmup import WarmUpReport, warm_up
from tessera.agents.engine.weights import LlamaWeights, load_llama_weights

log = logging.getLogger(__name__)


class EngineRole(enum.Enum):
    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


class RoleError(RuntimeError):
    """The operation is not what this engine's role does (e.g. a prompt sent to decode-only)."""


class RequestNotFoundError(KeyError):
    """No request with this id is in the engine (or not in a state the operation needs)."""


class NoProgressError(RuntimeError):
    """Requests remain but none can be scheduled (the KV cache is held by parked requests)."""


@dataclass(frozen=True)
class EngineConfig:
    role: EngineRole = EngineRole.COLOCATED
    device: str | None = None
    """Default: cuda when available, else cpu."""
    dtype: torch.dtype | None = None
    """Default: bfloat16 on CUDA, float32 on the CPU."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    """Default: `kv_cache_memory_fraction` of free GPU memory, or 1024 blocks on the CPU."""
    kv_cache_memory_fraction: float = 0.85
    max_model_len: int | None = None
    """Default: the model's max_position_embeddings."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    use_cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seed: int = 0


class Engine:
    """A single-device inference engine for one Llama-architecture model."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        engine_config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: LlamaModel | None = None,
        kv_cache: PagedKVCache | None = None,
        identity: str | None = None,
    ) -> None:
        """`model`: one built by the caller over these weights (a tensor-parallel rank's,
        tp_worker.py); by default a plain LlamaModel. `kv_cache`: one built by the caller (an
        attention-offloaded engine's, whose blocks live on its attention worker,
        attention_offload.py; a tensor-parallel driver's, which reads and writes every rank's
        heads, tp_kv.py); by default one on the weights' device. `identity`: the model's
        identity in KV packages, by default `model_identity` of these weights; an engine
        loaded from a checkpoint passes `checkpoint_identity`, the same at any degree and
        dtype, so that re-sharded KV (kv_reshard.py) enters it."""
        self.config = config
        self.engine_config = ec = engine_config or EngineConfig()
        self.role = ec.role
        self.device = weights.device
        self.clock = clock
        self.max_model_len = ec.max_model_len or config.max_position_embeddings
        self.model = model or LlamaModel(config, weights, max_positions=self.max_model_len)
        self.model_identity = identity or model_identity(config, weights)
        """What a KV package must be made by to enter this engine (config and weights)."""
        self.kv_cache = (
            kv_cache
            if kv_cache is not None
            else PagedKVCache(
                config, self._num_blocks(weights), ec.block_size, self.device, weights.dtype
            )
        )
        self.scheduler = Scheduler(ec.scheduler, self.kv_cache.allocator, ec.block_size)
        self.stats = EngineStats(clock=clock)
        self.generator = torch.Generator().manual_seed(ec.seed)
        self.requests: dict[str, Sequence] = {}
        self.parked: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.graphs: DecodeGraphRunner | None = None
        if self.device.type == "cuda" and ec.use_cuda_graphs and ops.triton_available():
            self.graphs = DecodeGraphRunner(
                self.model,
                self.kv_cache,
                self.max_model_len,
                tuple(b for b in ec.cuda_graph_batch_sizes if b <= ec.scheduler.max_num_seqs)
                or (1,),
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, engine_config: EngineConfig | None = None) -> Engine:
        """Load a local Hugging Face-layout folder (config.json + safetensors)."""
        ec = engine_config or EngineConfig()
        device = ec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = ec.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        config = LlamaConfig.from_pretrained(path)
        weights = load_llama_weights(path, config, device=device, dtype=dtype)
        return cls(config, weights, ec, identity=checkpoint_identity(path, config))

    def _num_blocks(self, weights: LlamaWeights) -> int:
        ec = self.engine_config
        if ec.num_kv_blocks is not None:
            return ec.num_kv_blocks
        if self.device.type != "cuda":
            return 1024
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        budget = int(free_bytes * ec.kv_cache_memory_fraction)
        return PagedKVCache.num_blocks_for_bytes(self.config, budget, ec.block_size, weights.dtype)

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt; returns its request id."""
        if self.role is EngineRole.DECODE:
            raise RoleError("a decode-only engine takes requests through import_kv, not prompts")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        self._check_request(list(prompt_token_ids), [], params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival_s=self.clock())
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def check_token_ids(self, name: str, tokens: list[int]) -> None:
        """Raise ValueError unless every id in `tokens` is in the vocabulary. A Python pass over
        every id (about 0.3 us each: 10 ms at 32k tokens on a loaded host), so a migration
        target runs it on the prompt when the prompt arrives, off the stall's path."""
        vocab = self.config.vocab_size
        bad = [t for t in tokens if type(t) is not int or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def _check_request(
        self,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        params: SamplingParams,
        prompt_checked: bool = False,
    ) -> None:
        """Raise ValueError unless the tokens are vocabulary ids and the request fits: room to
        generate under max_model_len, and its longest KV within the cache. `prompt_checked`:
        the prompt's ids passed `check_token_ids` already (only its length is checked)."""
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")
        if not prompt_checked:
            self.check_token_ids("prompt_token_ids", prompt_token_ids)
        self.check_token_ids("output_token_ids", output_token_ids)
        num_tokens = len(prompt_token_ids) + len(output_token_ids)
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"{num_tokens} tokens leave no room under max_model_len {self.max_model_len}"
            )
        longest = min(len(prompt_token_ids) + params.max_new_tokens, self.max_model_len)
        if self.kv_cache.blocks_for_tokens(longest) > self.kv_cache.allocator.capacity:
            raise ValueError(
                f"request needs up to {self.kv_cache.blocks_for_tokens(longest)} KV blocks; "
                f"the cache has {self.kv_cache.allocator.capacity}"
            )

    def abort(self, request_id: str) -> None:
        seq = self._get(request_id)
        self._finish(seq, FinishReason.ABORTED)

    def _get(self, request_id: str) -> Sequence:
        try:
            return self.requests[request_id]
        except KeyError:
            raise RequestNotFoundError(f"no request {request_id!r} in this engine") from None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch (decode tokens and prefill chunks); returns what each request got."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self.stats.preemptions_total += len(plan.preempted)
        if plan.empty:
            return []
        logits, rows, prompt_tokens = self._execute(plan)
        outputs = self._apply(plan, logits, rows)
        self.stats.record_step(prompt_tokens, len(rows), time.perf_counter() - started)
        return outputs

    def _slot(self, seq: Sequence, position: int) -> int:
        size = self.kv_cache.block_size
        return seq.block_ids[position // size] * size + position % size

    def _execute(
        self, plan: SchedulerOutput
    ) -> tuple[torch.Tensor, list[tuple[Sequence, int]], int]:
        """Run the model; returns logits, the (request, token count) each row samples for, and
        the number of prompt tokens computed."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        lens: list[int] = []
        size = self.kv_cache.block_size
        # Per decoding request per step: inlined `_slot`, `token_at` and `blocks_for_tokens`
        # (a decode's token is its last output, or a prompt's last after a preemption).
        for seq in plan.decodes:
            position = seq.num_computed_tokens
            blocks = seq.block_ids
            ids.append(seq.token_at(position))
            positions.append(position)
            slots.append(blocks[position // size] * size + position % size)
            lens.append(position + 1)
            tables.append(blocks[: position // size + 1])
        rows: list[tuple[Sequence, int]] = [(seq, 1) for seq in plan.decodes]
        sample_rows = list(range(len(plan.decodes)))
        if not plan.prefills and self.graphs is not None and len(ids) <= self.graphs.max_batch:
            logits = self.graphs.run(ids, positions, slots, tables, lens)
            return logits, rows, 0
        spans: list[PrefillSpan] = []
        prompt_tokens = 0
        for seq, count in plan.prefills:
            start = seq.num_computed_tokens
            spans.append(
                PrefillSpan(
                    start=len(ids),
                    num_tokens=count,
                    num_cached=start,
                    block_table=torch.tensor(seq.block_ids, dtype=torch.long, device=self.device),
                )
            )
            ids.extend(seq.tokens(start, start + count))
            positions.extend(range(start, start + count))
            slots.extend(self._slot(seq, p) for p in range(start, start + count))
            prompt_tokens += count
            if start + count == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
            rows.append((seq, count))
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(plan.decodes),
            prefill_spans=spans,
        )
        if plan.decodes:
            width = max(len(t) for t in tables)
            table = padded_block_table(tables, len(tables), width)
            meta.decode_block_tables = table.to(device)
            meta.decode_context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
            meta.decode_max_context_len = max(lens)
            meta.decode_context_lens_host = lens
        hidden = self.model.forward(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            meta,
            self.kv_cache,
        )
        index = torch.tensor(sample_rows, dtype=torch.long, device=device)
        return self.model.compute_logits(hidden.index_select(0, index)), rows, prompt_tokens

    def _apply(
        self, plan: SchedulerOutput, logits: torch.Tensor, rows: list[tuple[Sequence, int]]
    ) -> list[RequestOutput]:
        now = self.clock()
        sampling: list[Sequence] = []
        partial: list[Sequence] = []
        for seq, count in rows:
            if seq.num_computed_tokens + count == seq.num_tokens:
                sampling.append(seq)
            else:
                partial.append(seq)
        # Sampled before any request advances: if it raises, the step changed nothing.
        tokens = sample(
            logits,
            [seq.params for seq in sampling],
            [len(seq.output_token_ids) for seq in sampling],
            self.generator,
        )
        for seq, count in rows:
            seq.num_computed_tokens += count
        outputs = [RequestOutput(seq.request_id, [], finished=False) for seq in partial]
        parks = self.role is EngineRole.PREFILL
        for row, (seq, token) in enumerate(zip(sampling, tokens, strict=True)):
            if isinstance(token, SamplingFailure):
                log.warning("request %s failed in its step: %s", seq.request_id, token.reason)
                seq.error = token.reason
                self._finish(seq, FinishReason.ERROR)
                outputs.append(
                    RequestOutput(seq.request_id, [], True, FinishReason.ERROR, error=token.reason)
                )
                continue
            if seq.params.return_logits:
                seq.logits.append(logits[row].detach().to("cpu", copy=True))
            seq.output_token_ids.append(token)
            seq.last_token_s = now
            if seq.first_token_s is None:
                seq.first_token_s = now
                seq.decode_start_s = now
                seq.decode_start_outputs = 1
                self.stats.record_ttft(now - seq.arrival_s)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                outputs.append(RequestOutput(seq.request_id, [token], True, reason))
            elif parks:
                self._park(seq)
                outputs.append(RequestOutput(seq.request_id, [token], False, parked=True))
            else:
                outputs.append(RequestOutput(seq.request_id, [token], False))
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in self.config.eos_token_ids:
            return FinishReason.STOP
        produced = len(seq.output_token_ids)
        if produced >= params.max_new_tokens:
            return FinishReason.LENGTH
        if len(seq.prompt_token_ids) + produced >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _park(self, seq: Sequence) -> None:
        self.scheduler.park(seq)
        self.parked[seq.request_id] = seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.request_id in self.parked:
            del self.parked[seq.request_id]
            self.scheduler.release(seq)
        else:
            self.scheduler.remove(seq)
        seq.state = RequestState.FINISHED
        seq.finish_reason = reason
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.stats.requests_finished_total += 1
            produced = len(seq.output_token_ids) - seq.decode_start_outputs
            if produced > 0 and seq.decode_start_s is not None and seq.last_token_s is not None:
                self.stats.record_tpot((seq.last_token_s - seq.decode_start_s) / produced)

    def pop_finished(self, request_id: str) -> Completion:
        """Remove a finished request from the engine and return its result."""
        seq = self._get(request_id)
        if seq.state is not RequestState.FINISHED:
            raise RequestNotFoundError(f"request {request_id!r} is {seq.state.value}, not finished")
        del self.requests[request_id]
        return Completion(
            seq.request_id,
            seq.prompt_token_ids,
            seq.output_token_ids,
            seq.finish_reason,
            seq.logits,
            seq.error,
        )

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Run prompts to completion (colocated role); results in prompt order."""
        ids = [self.add_request(prompt, params) for prompt in prompts]
        self.run_until_idle()
        return [self.pop_finished(request_id) for request_id in ids]

    def warm_up(self) -> WarmUpReport:
        """Capture every decode graph and compile every attention kernel variant this engine
        can reach (warmup.py), so that no step while serving stalls on a compile."""
        return warm_up(self)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until nothing is waiting or running (parked requests do not count)."""
        for _ in range(max_steps):
            if not self.has_unfinished():
                return
            if not self.step() and not self.scheduler.num_running:
                raise NoProgressError(
                    f"{self.scheduler.num_waiting} requests wait but none fits: "
                    f"{len(self.parked)} parked requests hold KV blocks"
                )
        raise NoProgressError(f"requests still unfinished after {max_steps} steps")

    # ---- KV export and import -------------------------------------------------------------

    @property
    def kv_geometry(self) -> KVGeometry:
        """The layout of the blocks this engine exports and imports: all the model's KV heads
        (a tensor-parallel driver's cache, tp_kv.py, gathers and scatters the ranks' slices)."""
        degree: int = getattr(self.kv_cache, "tensor_parallel_size", 1)
        return KVGeometry(
            model_signature=self.model_identity,
            num_layers=self.config.num_hidden_layers,
            num_kv_heads=self.config.num_key_value_heads * degree,
            head_dim=self.config.head_dim,
            block_size=self.kv_cache.block_size,
            dtype=str(self.kv_cache.dtype).removeprefix("torch."),
            tensor_parallel_size=degree,
        )

    def export_kv(self, request_id: str, on_device: bool = False) -> KVPackage:
        """Hand a parked or decoding request's KV blocks out; the request leaves this engine.

        Between steps only: a request is exportable once its prompt is fully computed.
        `on_device`: the blocks stay on the cache's device and carry no checksums (UNCHECKED),
        for a same-GPU transport (CUDA IPC): they never cross a wire, and hashing them would
        copy them to the host, the cost that transport avoids.
        """
        seq = self._get(request_id)
        exportable = seq.state is RequestState.PARKED or (
            seq.state is RequestState.RUNNING and seq.num_pending_tokens == 1
        )
        if not exportable:
            raise KVTransferError(
                f"request {request_id!r} is {seq.state.value} with "
                f"{seq.num_pending_tokens} tokens pending; export after its prefill completes"
            )
        used = self.kv_cache.blocks_for_tokens(seq.num_computed_tokens)
        blocks = self.kv_cache.read_blocks(seq.block_ids[:used])
        if on_device:
            package = KVPackage(
                request_id=seq.request_id,
                geometry=self.kv_geometry,
                prompt_token_ids=list(seq.prompt_token_ids),
                output_token_ids=list(seq.output_token_ids),
                num_computed_tokens=seq.num_computed_tokens,
                sampling=seq.params.to_dict(),
                blocks=blocks,
                checksum_algorithm=UNCHECKED,
                block_checksums=[],
            )
        else:
            package = KVPackage.build(
                request_id=seq.request_id,
                geometry=self.kv_geometry,
                prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                num_computed_tokens=seq.num_computed_tokens,
                sampling=seq.params.to_dict(),
                blocks=blocks,
            )
        self.complete_export(request_id)
        return package

    def complete_export(self, request_id: str) -> None:
        """The request continues in another engine (its KV was copied there): end it here and
        free its blocks."""
        seq = self._get(request_id)
        self._finish(seq, FinishReason.EXPORTED)
        del self.requests[request_id]
        self.stats.kv_exports_total += 1

    # ---- live migration (migration.py drives these, between steps) ------------------------

    def migratable(self, request_id: str) -> bool:
        """Decoding now (prompt computed, next token sampled and not yet computed)."""
        seq = self.requests.get(request_id)
        return (
            seq is not None
            and seq.state is RequestState.RUNNING
            and seq.num_pending_tokens == 1
            and bool(seq.output_token_ids)
        )

    def read_kv_blocks(
        self, request_id: str, first: int, max_blocks: int, full_only: bool
    ) -> tuple[torch.Tensor, int]:
        """A copy of the request's KV blocks from index `first` (on the cache's device), and
        its preemption count. `full_only`: only blocks whose every slot is computed, which no
        later step writes (a pre-copy stage); else up to its last computed token (the
        stop-and-copy, with the request paused)."""
        seq = self._get(request_id)
        size = self.kv_cache.block_size
        computed = seq.num_computed_tokens
        end = computed // size if full_only else self.kv_cache.blocks_for_tokens(computed)
        end = min(end, first + max_blocks, len(seq.block_ids))
        ids = seq.block_ids[first:end] if end > first else []
        return self.kv_cache.read_blocks(ids), seq.num_preemptions

    def pause(self, request_id: str) -> None:
        """Stop scheduling a decoding request; it keeps its blocks (stop-and-copy)."""
        if not self.migratable(request_id):
            raise KVTransferError(f"request {request_id!r} is not decoding; it cannot be paused")
        self.scheduler.park(self.requests[request_id])

    def resume(self, request_id: str) -> None:
        """Schedule a paused request again (its migration was aborted)."""
        self.scheduler.resume(self._get(request_id))

    def package_state(
        self, request_id: str, blocks: torch.Tensor, with_prompt: bool = True
    ) -> KVPackage:
        """A paused request's state with `blocks` (the tail its migration has not copied yet).
        Without `with_prompt` the prompt is left out (a migration sent it ahead, off the
        stall's path: 32k token ids are a 200 kB header to write, hash and parse)."""
        seq = self._get(request_id)
        return KVPackage.build(
            request_id=seq.request_id,
            geometry=self.kv_geometry,
            prompt_token_ids=seq.prompt_token_ids if with_prompt else [],
            output_token_ids=seq.output_token_ids,
            num_computed_tokens=seq.num_computed_tokens,
            sampling=seq.params.to_dict(),
            blocks=blocks,
        )

    def hold_kv_blocks(self, package: KVPackage) -> list[int]:
        """Take blocks for a pre-copy stage of a migration and write `package`'s blocks into
        them; returns their ids. Checked like an import (geometry, checksums, the same
        headroom: OutOfKVBlocksError otherwise), and nothing is kept if writing fails.
        `import_kv(held_blocks=...)` or `free_kv_blocks` ends the hold."""
        package.check_compatible(self.kv_geometry)
        return self._write_into_new_blocks(package, "migration needs {} more KV blocks")

    def _write_into_new_blocks(self, package: KVPackage, shortfall: str) -> list[int]:
        """Take blocks for `package`'s KV and write it into them; nothing is kept if writing
        fails. Only the blocks beyond what the running requests' next tokens need may be
        taken (OutOfKVBlocksError, `shortfall` formatted with the count, otherwise)."""
        count = package.num_blocks
        headroom = self.kv_cache.allocator.num_free - self.scheduler.decode_growth_blocks()
        if count > headroom:
            raise OutOfKVBlocksError(
                f"{shortfall.format(count)}; {headroom} are free beyond what the running "
                "requests' next tokens take"
            )
        blocks = self.kv_cache.allocator.allocate(count)
        try:
            self.kv_cache.write_blocks(blocks, package.blocks)
        except BaseException:
            self.kv_cache.allocator.free(blocks)
            raise
        return blocks

    def free_kv_blocks(self, blocks: list[int]) -> None:
        if blocks:
            self.kv_cache.allocator.free(blocks)

    def import_kv(
        self,
        package: KVPackage,
        held_blocks: list[int] | None = None,
        prompt_checked: bool = False,
    ) -> str:
        """Continue a request from another engine's KV blocks; returns its request id.

        `held_blocks`: blocks already reserved and written with the request's first KV blocks
        (a live migration's pre-copy); the package then carries only the blocks after them.
        They stay the caller's if the import is refused. `prompt_checked`: the caller ran
        `check_token_ids` on the package's prompt already (a migration target, when the prompt
        came ahead), so the import's work, done while the request stalls, does not grow with
        the context.

        Everything about the package is checked before a block is taken (its geometry against
        this engine's model identity, its blocks' shape, dtype and checksums, its tokens and
        sampling), and the blocks are given back if writing them fails: a refused import leaves
        the cache as it found it.

        Raises OutOfKVBlocksError when the blocks do not fit now beside the blocks the running
        requests' next tokens need (the caller retries later). Taking those would preempt a
        running request at the next step, and on a decode-only engine a preempted request is
        recomputed from its whole prompt: serving on an H100 thrashed that way
        (bench/serving_validation.py), as the simulator's decode replicas, which leave the same
        room, do not.
        """
        if self.role is EngineRole.PREFILL:
            raise RoleError("a prefill-only engine does not continue imported requests")
        held = list(held_blocks or [])
        params = self._check_import(package, len(held), prompt_checked)
        blocks = self._write_into_new_blocks(package, "import needs {} KV blocks")
        now = self.clock()
        seq = Sequence(
            request_id=package.request_id,
            prompt_token_ids=list(package.prompt_token_ids),
            params=params,
            arrival_s=now,
            output_token_ids=list(package.output_token_ids),
            block_ids=held + blocks,
            num_computed_tokens=package.num_computed_tokens,
            imported=True,
            first_token_s=now,
            last_token_s=now,
            decode_start_s=now,
            decode_start_outputs=len(package.output_token_ids),
        )
        self.requests[seq.request_id] = seq
        self.scheduler.add_running(seq)
        self.stats.kv_imports_total += 1
        return seq.request_id

    def _check_import(
        self, package: KVPackage, num_held: int = 0, prompt_checked: bool = False
    ) -> SamplingParams:
        """Raise KVTransferError unless `package` (after `num_held` blocks already here) can
        continue here; returns its sampling."""
        if not isinstance(package, KVPackage):
            raise KVTransferError(f"import_kv takes a KVPackage, not {type(package).__name__}")
        package.check_compatible(self.kv_geometry)
        request_id = package.request_id
        if not isinstance(request_id, str) or not request_id:
            raise KVTransferError(f"package request_id must be a non-empty string: {request_id!r}")
        if request_id in self.requests:
            raise KVTransferError(f"request id {request_id!r} is already in the engine")
        if not isinstance(package.sampling, dict):
            raise KVTransferError(f"{request_id}: sampling must be a dict of SamplingParams")
        try:
            params = SamplingParams.from_dict(package.sampling)
            prompt = package.prompt_token_ids
            prompt = prompt if type(prompt) is list else list(prompt)  # 32k ids: copy once
            output = list(package.output_token_ids)
            self._check_request(prompt, output, params, prompt_checked)
        except (TypeError, ValueError) as error:
            raise KVTransferError(f"package {request_id!r}: {error}") from error
        # An exported request has sampled its next token and not yet computed it.
        num_tokens, computed = len(prompt) + len(output), package.num_computed_tokens
        if not output or type(computed) is not int or computed != num_tokens - 1:
            raise KVTransferError(
                f"package {request_id!r} has num_computed_tokens {package.num_computed_tokens} "
                f"for {num_tokens} tokens ({len(output)} generated); an exported request has "
                "at least one generated token and all but the last computed"
            )
        if len(output) >= params.max_new_tokens:
            raise KVTransferError(
                f"package {request_id!r} has generated {len(output)} of its max_new_tokens "
                f"{params.max_new_tokens}: it is finished, nothing to continue"
            )
        needed = self.kv_cache.blocks_for_tokens(package.num_computed_tokens)
        if num_held + package.num_blocks != needed:
            raise KVTransferError(
                f"package has {package.num_blocks} blocks (after {num_held} held) for "
                f"{package.num_computed_tokens} tokens; {needed} expected"
            )
        return params

    # ---- telemetry -----------------------------------------------------------------------

    def stats_snapshot(self, drain: bool = False) -> EngineStatsSnapshot:
        allocator = self.kv_cache.allocator
        return self.stats.snapshot(
            role=self.role.value,
            queue_length=self.scheduler.num_waiting,
            running_batch=self.scheduler.num_running,
            parked_requests=len(self.parked),
            kv_blocks_total=allocator.capacity,
            kv_blocks_used=allocator.num_used,
            kv_block_size=self.kv_cache.block_size,
            drain=drain,
        )
