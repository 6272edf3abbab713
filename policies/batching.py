"""Batch formation: which requests run in an engine's next step, with how many tokens, which
are admitted and which are preempted to make room. The engine's scheduler
(`agents.engine.scheduler`) and the simulator's instances (`sim.instance`) both call
`form_batch`, so the simulator runs the engine's policy rather than a model of it.

The rules are vLLM V1's scheduler without prefix caching:
- KV blocks grow with the tokens computed. A step allocates, for each request it runs, the
  blocks its cached tokens plus this step's tokens fill (`blocks_for_tokens`); an admitted
  prompt holds only its first chunk's blocks, not its whole prompt's.
- Running requests come first, oldest first, each taking what it has pending (one token when
  decoding) up to the step's remaining token budget. When a request's blocks do not fit, the
  newest running request not yet scheduled in this step is preempted (its blocks freed, to be
  recomputed from scratch), until the blocks fit or the request itself was the newest.
- Then waiting requests, in queue order, while budget remains, fewer than `max_num_seqs` run
  and the first chunk's blocks fit. Without chunked prefill a prompt must fit the remaining
  budget whole. A step that preempted admits nothing: the preempted wait at the head of the
  queue, and a request freed in this step is not re-admitted in it.
Decode tokens and prompt chunks share every step, chunked prefill or not (V1; vLLM V0's
whole-prompt steps that exclude decodes are not modelled).

Inputs are integers only (`RequestView`), outputs indices into them (`BatchDecision`): the
callers own their requests, block tables and queues and apply the decision to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tessera.api.scheduler import SchedulerConfig


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """KV blocks of `block_size` tokens that hold `num_tokens` tokens (rounded up)."""
    return -(-num_tokens // block_size)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What batch formation needs to know about one request."""

    num_computed_tokens: int
    """Tokens whose K/V are in the cache (0 while waiting)."""
    num_tokens: int
    """Tokens to run through the model before its next sample: the cached ones plus the
    pending (prompt, or prompt + generated when recomputing, or one token when decoding)."""
    num_blocks: int = 0
    """KV blocks it holds."""

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(frozen=True, slots=True)
class Work:
    """One request's share of a step."""

    request: int
    """Index into the running (or, for admissions, the waiting) views."""
    num_tokens: int
    """Tokens it computes in this step."""
    new_blocks: int
    """Blocks to allocate to it before the step runs."""


@dataclass
class BatchDecision:
    """One step's batch. Apply `preempted` first, then allocate every `new_blocks`."""

    scheduled: list[Work] = field(default_factory=list)
    """Running requests that run, in their running order."""
    admitted: list[Work] = field(default_factory=list)
    """The head of the waiting queue, in order: they start running with this step."""
    preempted: list[int] = field(default_factory=list)
    """Running indices to preempt, newest first (the order vLLM frees them)."""

    @property
    def num_tokens(self) -> int:
        return sum(w.num_tokens for w in self.scheduled) + sum(w.num_tokens for w in self.admitted)

    @property
    def new_blocks(self) -> int:
        return sum(w.new_blocks for w in self.scheduled) + sum(w.new_blocks for w in self.admitted)


def _missing_blocks(view: RequestView, num_tokens: int, block_size: int) -> int:
    return max(
        0, blocks_for_tokens(view.num_computed_tokens + num_tokens, block_size) - view.num_blocks
    )


def form_batch(
    config: SchedulerConfig,
    block_size: int,
    running: Sequence[RequestView],
    waiting: Sequence[RequestView],
    free_blocks: int,
) -> BatchDecision:
    """The next step's batch (see the module docstring for the rules)."""
    decision = BatchDecision()
    budget = config.max_num_batched_tokens
    free = free_blocks
    newest = len(running) - 1  # the newest running request not preempted yet
    for index, view in enumerate(running):
        if budget == 0 or index > newest:
            break
        count = min(view.num_pending_tokens, budget)
        need = _missing_blocks(view, count, block_size)
        while need > free and newest >= index:
            decision.preempted.append(newest)
            free += running[newest].num_blocks
            newest -= 1
        if index > newest:
            break
        free -= need
        budget -= count
        decision.scheduled.append(Work(index, count, need))
    if decision.preempted:
        return decision
    admitted_running = len(running)
    for index, view in enumerate(waiting):
        if budget == 0 or admitted_running >= config.max_num_seqs:
            break
        pending = view.num_pending_tokens
        if not config.enable_chunked_prefill and pending > budget:
            break
        count = min(pending, budget)
        need = _missing_blocks(view, count, block_size)
        if need > free:
            break
        free -= need
        budget -= count
        admitted_running += 1
        decision.admitted.append(Work(index, count, need))
    return decision


def decode_growth_blocks(running: Sequence[RequestView], block_size: int) -> int:
    """Blocks the next step's decodes take: running requests with one token pending whose
    token starts a new block. A KV import that leaves fewer free forces a preemption there."""
    return sum(
        _missing_blocks(view, 1, block_size) for view in running if view.num_pending_tokens == 1
    )
