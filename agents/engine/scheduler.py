"""Continuous batching with chunked prefill under a per-step token budget.

Each step: every running request gets its tokens first (decodes one each, in arrival order,
then unfinished prompt chunks), then waiting requests are admitted in arrival order while the
token budget, the sequence limit and free KV blocks allow. When a running request needs a block
and none is free, the newest running request is preempted: its blocks are freed and it waits to
be recomputed (prompt plus what it generated so far), which keeps the oldest requests moving.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tessera.agents.engine.kv_cache import BlockAllocator, blocks_for_tokens
from tessera.agents.engine.request import RequestState, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Requests running at once (decoding or prefilling)."""
    max_num_batched_tokens: int = 2048
    """Tokens per step: the chunked-prefill budget, decode tokens included."""
    enable_chunked_prefill: bool = True
    """Without chunking a prompt is admitted only when it fits the step's budget whole."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class PrefillChunk:
    seq: Sequence
    num_tokens: int


@dataclass
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Decides which tokens of which requests run in the next step, and owns their blocks."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, block_size: int):
        self.config = config
        self.allocator = allocator
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.state = RequestState.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A request that arrives with its KV already in blocks it holds (an import)."""
        seq.state = RequestState.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a request out of the queues and free its blocks (finish, abort, export)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def decode_growth_blocks(self) -> int:
        """Blocks the next step's decodes will take: running requests whose next token starts a
        new block. An import that would leave fewer free forces a preemption next step."""
        decoding = (seq for seq in self.running if seq.num_pending_tokens == 1)
        return sum(1 for seq in decoding if self._missing_blocks(seq, seq.num_computed_tokens + 1))

    def _missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold `num_tokens` tokens (0 when it holds enough)."""
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - len(seq.block_ids))

    def release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq` hold blocks for `num_tokens` tokens; False if too few are free."""
        needed = self._missing_blocks(seq, num_tokens)
        if needed == 0:
            return True
        if not self.allocator.can_allocate(needed):
            return False
        seq.block_ids.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.num_computed_tokens = 0
        seq.state = RequestState.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.state is not RequestState.RUNNING:
                continue  # preempted earlier in this loop
            pending = seq.num_pending_tokens
            count = 1 if pending == 1 else min(pending, budget)
            while not self._grow(seq, seq.num_computed_tokens + count):
                victims = [s for s in self.running if s.request_id not in scheduled]
                victim = victims[-1]  # the newest; `seq` itself is among them
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.state is not RequestState.RUNNING:
                continue
            scheduled.add(seq.request_id)
            budget -= count
            if pending == 1:
                out.decodes.append(seq)
            else:
                out.prefills.append(PrefillChunk(seq, count))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            pending = seq.num_pending_tokens
            if not self.config.enable_chunked_prefill and pending > budget:
                break
            count = min(pending, budget)
            if seq in out.preempted or not self._grow(seq, seq.num_computed_tokens + count):
                break
            self.waiting.popleft()
            seq.state = RequestState.RUNNING
            self.running.append(seq)
            budget -= count
            if pending == 1:
                out.decodes.append(seq)
            else:
                out.prefills.append(PrefillChunk(seq, count))
        return out
