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

Inputs are integers only (`RequestView`, or plain tuples in its field order), outputs
per-request counts over them (`BatchDecision`): the callers own their requests, block tables and
queues and apply the decision to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from tessera.api.scheduler import SchedulerConfig


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """KV blocks of `block_size` tokens that hold `num_tokens` tokens (rounded up)."""
    return -(-num_tokens // block_size)


ViewTuple = tuple[int, int, int]
"""A `RequestView` as a plain tuple (computed, total, blocks held). `form_batch` reads views
only by position, and the simulator, which builds one per running request per iteration, passes
these: a plain tuple costs a fifth of a named one to build."""


class RequestView(NamedTuple):
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


@dataclass
class BatchDecision:
    """One step's batch, as indices into the views it was formed from. Apply `preempted`
    first, then allocate the new blocks.

    The requests that run are always a prefix of the running ones (oldest first) and the
    admitted a prefix of the waiting queue, so each is described by per-request lists:
    `running[i]` computes `num_tokens[i]` tokens and gets `new_blocks[i]` blocks for every
    `i < len(num_tokens)`; likewise `waiting[i]` with the `admitted_` lists.
    """

    num_tokens: list[int] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    admitted_tokens: list[int] = field(default_factory=list)
    admitted_blocks: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    """Running indices to preempt, newest first (the order vLLM frees them)."""

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens) + sum(self.admitted_tokens)


def form_batch(
    config: SchedulerConfig,
    block_size: int,
    running: Sequence[ViewTuple],
    waiting: Iterable[ViewTuple],
    free_blocks: int,
) -> BatchDecision:
    """The next step's batch (see the module docstring for the rules).

    `waiting` is read in order and only as far as admission gets (at most the free batch
    slots), so a caller may pass a lazy iterable over a long queue."""
    # Written for speed (the simulator calls it every iteration): block rounding inline,
    # as in `blocks_for_tokens`, list appends bound once.
    decision = BatchDecision()
    preempted = decision.preempted
    add_tokens, add_blocks = decision.num_tokens.append, decision.new_blocks.append
    budget = config.max_num_batched_tokens
    free = free_blocks
    newest = len(running) - 1  # the newest running request not preempted yet
    for index, (computed, total, held) in enumerate(running):
        if budget == 0 or index > newest:
            break
        count = total - computed
        if count > budget:
            count = budget
        need = -(-(computed + count) // block_size) - held
        if need > free:
            while need > free and newest >= index:
                preempted.append(newest)
                free += running[newest][2]
                newest -= 1
            if index > newest:
                break
        if need < 0:
            need = 0
        free -= need
        budget -= count
        add_tokens(count)
        add_blocks(need)
    if preempted:
        return decision
    slots = config.max_num_seqs - len(running)
    chunked = config.enable_chunked_prefill
    for computed, total, held in waiting:
        if budget == 0 or slots <= 0:
            break
        count = total - computed
        if count > budget:
            if not chunked:
                break
            count = budget
        need = max(0, -(-(computed + count) // block_size) - held)
        if need > free:
            break
        free -= need
        budget -= count
        slots -= 1
        decision.admitted_tokens.append(count)
        decision.admitted_blocks.append(need)
    return decision


def decode_growth_blocks(running: Iterable[ViewTuple], block_size: int) -> int:
    """Blocks the next step's decodes take: running requests with one token pending whose
    token starts a new block. A KV import that leaves fewer free forces a preemption there."""
    return sum(
        max(0, blocks_for_tokens(computed + 1, block_size) - held)
        for computed, total, held in running
        if total - computed == 1
    )
