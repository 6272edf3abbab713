"""Laws and rules of the batch-formation policy (policies.batching) that the engine and the
simulator share."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.api.scheduler import SchedulerConfig
from tessera.policies.batching import (
    BatchDecision,
    RequestView,
    blocks_for_tokens,
    decode_growth_blocks,
    form_batch,
)

SIZE = 16


def running_view(computed: int, pending: int) -> RequestView:
    """A running request between steps: it holds the blocks its cached tokens fill."""
    return RequestView(computed, computed + pending, blocks_for_tokens(computed, SIZE))


def waiting_view(tokens: int) -> RequestView:
    return RequestView(0, tokens)


def test_blocks_round_up() -> None:
    assert [blocks_for_tokens(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_an_admitted_prompt_holds_only_its_first_chunks_blocks() -> None:
    config = SchedulerConfig(max_num_batched_tokens=256)
    decision = form_batch(config, SIZE, [], [waiting_view(1000)], free_blocks=20)
    assert decision.admitted_tokens == [256]
    assert decision.admitted_blocks == [16]  # not the 63 the whole prompt fills


def test_running_requests_go_first_and_decodes_ride_with_chunks() -> None:
    config = SchedulerConfig(max_num_batched_tokens=64)
    running = [running_view(100, 1), running_view(32, 200), running_view(50, 1)]
    decision = form_batch(config, SIZE, running, [waiting_view(10)], free_blocks=100)
    # One token, then the prompt chunk takes what is left: the last decode waits, nobody enters.
    assert decision.num_tokens == [1, 63]
    assert decision.admitted_tokens == []


def test_a_whole_prompt_must_fit_the_budget_the_decodes_leave() -> None:
    config = SchedulerConfig(max_num_batched_tokens=100, enable_chunked_prefill=False)
    running = [running_view(40, 1) for _ in range(10)]
    for prompt, admitted in ((90, [90]), (91, [])):
        decision = form_batch(config, SIZE, running, [waiting_view(prompt)], free_blocks=100)
        assert decision.num_tokens == [1] * 10
        assert decision.admitted_tokens == admitted


def test_the_newest_request_is_preempted_and_nobody_is_admitted_that_step() -> None:
    config = SchedulerConfig(max_num_batched_tokens=512)
    # Three decodes each start a new block; one block is free.
    running = [running_view(32, 1), running_view(48, 1), running_view(64, 1)]
    decision = form_batch(config, SIZE, running, [waiting_view(1)], free_blocks=1)
    assert decision.preempted == [2]
    assert decision.num_tokens == [1, 1]
    assert decision.new_blocks == [1, 1]  # the second uses a block the preempted one freed
    assert decision.admitted_tokens == []


def test_a_request_that_cannot_grow_even_alone_preempts_itself() -> None:
    config = SchedulerConfig(max_num_batched_tokens=512)
    decision = form_batch(config, SIZE, [running_view(16, 1)], [], free_blocks=0)
    assert decision.preempted == [0]
    assert decision.num_tokens == []


def test_the_batch_cap_bounds_admissions() -> None:
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=512)
    running = [running_view(10, 1)]
    decision = form_batch(config, SIZE, running, [waiting_view(5)] * 4, free_blocks=100)
    assert decision.admitted_tokens == [5, 5]


def test_decode_growth_counts_decodes_that_start_a_block() -> None:
    running = [running_view(16, 1), running_view(17, 1), running_view(32, 100)]
    assert decode_growth_blocks(running, SIZE) == 1


requests = st.tuples(st.integers(0, 300), st.integers(1, 300))


@settings(max_examples=300, deadline=None)
@given(
    running=st.lists(requests, max_size=12),
    waiting=st.lists(st.integers(1, 600), max_size=8),
    free=st.integers(0, 60),
    budget=st.integers(1, 600),
    max_num_seqs=st.integers(1, 16),
    chunked=st.booleans(),
)
def test_a_decision_fits_the_budget_the_blocks_and_the_cap(
    running: list[tuple[int, int]],
    waiting: list[int],
    free: int,
    budget: int,
    max_num_seqs: int,
    chunked: bool,
) -> None:
    config = SchedulerConfig(max_num_seqs, budget, chunked)
    run = [running_view(computed, pending) for computed, pending in running]
    wait = [waiting_view(tokens) for tokens in waiting]
    decision: BatchDecision = form_batch(config, SIZE, run, wait, free)
    assert decision.total_tokens <= budget
    # Preempted requests are the newest, newest first, and none of them runs.
    count = len(decision.preempted)
    assert decision.preempted == list(range(len(run) - 1, len(run) - 1 - count, -1))
    assert len(decision.num_tokens) <= len(run) - count
    freed = sum(run[i].num_blocks for i in decision.preempted)
    assert sum(decision.new_blocks) + sum(decision.admitted_blocks) <= free + freed
    for view, tokens, blocks in zip(run, decision.num_tokens, decision.new_blocks, strict=False):
        assert 1 <= tokens <= view.num_pending_tokens
        held = view.num_blocks + blocks
        assert held == max(
            view.num_blocks, blocks_for_tokens(view.num_computed_tokens + tokens, SIZE)
        )
    if decision.admitted_tokens:
        assert not decision.preempted
        assert len(run) + len(decision.admitted_tokens) <= max_num_seqs
    for view, tokens in zip(wait, decision.admitted_tokens, strict=False):
        assert tokens == view.num_pending_tokens or (chunked and tokens < view.num_pending_tokens)
    # Nothing was left out while it could have run: an unfinished pass ends on a binding limit.
    if not decision.preempted and len(decision.num_tokens) < len(run):
        assert decision.total_tokens == budget
