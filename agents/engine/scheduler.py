"""The engine's scheduler: it owns the waiting and running queues and the requests' KV blocks,
and carries out `policies.batching.form_batch`'s decision each step.

The decision (who runs, with how many tokens, who is admitted or preempted) is the pure
policy's, the same one the simulator's instances call; this module only turns the engine's
sequences into the policy's integer views and applies the result: preempted requests lose their
blocks and wait at the head of the queue to be recomputed (prompt plus what they generated),
every scheduled request gets the blocks its tokens fill, admitted ones start running.

The engine goes through this interface (`add`, `add_running`, `park`, `resume`, `remove`,
`release`, `schedule`, the counts), never into the queues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tessera.agents.engine.kv_cache import BlockAllocator
from tessera.agents.engine.request import RequestState, Sequence
from tessera.api.scheduler import SchedulerConfig
from tessera.policies.batching import RequestView, ViewTuple, decode_growth_blocks, form_batch

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    """What the next step runs: decode tokens, prompt chunks (request, tokens), and the
    requests preempted to make room."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(count for _, count in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


def _view(seq: Sequence) -> RequestView:
    return RequestView(seq.num_computed_tokens, seq.num_tokens, len(seq.block_ids))


def _views(seqs: Iterable[Sequence]) -> Iterator[ViewTuple]:
    """Plain-tuple views (`ViewTuple`), made lazily: one per running request per step, and a
    named RequestView costs about five times a tuple to build; the waiting queue's are read
    only as far as admission gets."""
    for seq in seqs:
        yield (
            seq.num_computed_tokens,
            len(seq.prompt_token_ids) + len(seq.output_token_ids),
            len(seq.block_ids),
        )


class Scheduler:
    """Decides which tokens of which requests run in the next step, and owns their blocks."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, block_size: int):
        self.config = config
        self.allocator = allocator
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.state = RequestState.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A request that arrives with its KV already in blocks it holds (an import)."""
        seq.state = RequestState.RUNNING
        self.running.append(seq)

    def park(self, seq: Sequence) -> None:
        """Stop scheduling a running request that keeps its blocks (prefill done, waiting
        for its export; or a live migration's stop-and-copy); `release` frees them."""
        self.running.remove(seq)
        seq.state = RequestState.PARKED

    def resume(self, seq: Sequence) -> None:
        """Schedule a parked request again, with the blocks it kept (an aborted migration)."""
        if seq.state is not RequestState.PARKED:
            raise ValueError(f"request {seq.request_id!r} is {seq.state.value}, not parked")
        seq.state = RequestState.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a request out of the queues and free its blocks (finish, abort, export)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []

    def decode_growth_blocks(self) -> int:
        """Blocks the next step's decodes will take (`policies.batching.decode_growth_blocks`).
        An import that would leave fewer free forces a preemption next step."""
        return decode_growth_blocks([_view(seq) for seq in self.running], self.block_size)

    def schedule(self) -> SchedulerOutput:
        running, waiting = self.running, self.waiting
        decision = form_batch(
            self.config,
            self.block_size,
            list(_views(running)),
            _views(waiting),
            self.allocator.num_free,
        )
        out = SchedulerOutput(preempted=[running[i] for i in decision.preempted])
        work = list(zip(running, decision.num_tokens, decision.new_blocks, strict=False))
        for count, blocks in zip(decision.admitted_tokens, decision.admitted_blocks, strict=True):
            seq = waiting.popleft()
            seq.state = RequestState.RUNNING
            running.append(seq)
            work.append((seq, count, blocks))
        for seq in out.preempted:
            self._preempt(seq)
        decodes, prefills = out.decodes, out.prefills
        for seq, count, blocks in work:
            if blocks:
                seq.block_ids.extend(self.allocator.allocate(blocks))
            total = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            if total - seq.num_computed_tokens == 1:
                decodes.append(seq)
            else:
                prefills.append((seq, count))
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.num_preemptions += 1
        seq.num_computed_tokens = 0
        seq.state = RequestState.WAITING
        self.waiting.appendleft(seq)
