"""The dispatch policy: a pure choice over a load snapshot."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.policies.dispatch import (
    DispatchPolicy,
    DispatchRequest,
    InstanceLoads,
    NoEligibleInstanceError,
    choose_instance,
)


def loads(
    pending: list[float],
    kv_used: list[float] | None = None,
    capacity: list[float] | None = None,
    speed: list[float] | None = None,
    running: list[int] | None = None,
) -> InstanceLoads:
    n = len(pending)
    snapshot = InstanceLoads.empty(
        np.array(capacity or [10_000.0] * n), np.array(speed or [1.0] * n)
    )
    snapshot.pending_prefill_tokens[:] = pending
    snapshot.kv_used_tokens[:] = kv_used or [0.0] * n
    snapshot.running_requests[:] = running or [0] * n
    return snapshot


REQUEST = DispatchRequest(prompt_tokens=500, sequence=0)


def test_least_tokens_weighs_load_by_speed() -> None:
    snapshot = loads([1000, 600, 900], speed=[1.0, 1.0, 2.0])
    assert choose_instance(DispatchPolicy.LEAST_TOKENS, REQUEST, snapshot) == 2


def test_least_kv_prefers_the_emptiest_cache_then_fewest_tokens() -> None:
    snapshot = loads([0, 50, 10], kv_used=[5000, 1000, 1000], capacity=[10_000, 2_000, 2_000])
    assert choose_instance(DispatchPolicy.LEAST_KV, REQUEST, snapshot) == 2


def test_least_requests_counts_waiting_and_running() -> None:
    snapshot = loads([0, 0, 0], running=[3, 1, 2])
    snapshot.waiting_requests[:] = [0, 2, 0]
    assert choose_instance(DispatchPolicy.LEAST_REQUESTS, REQUEST, snapshot) == 2


def test_round_robin_cycles_over_eligible_instances() -> None:
    snapshot = loads([0, 0, 0], capacity=[10_000, 100, 10_000])
    chosen = [
        choose_instance(DispatchPolicy.ROUND_ROBIN, DispatchRequest(500, i), snapshot)
        for i in range(4)
    ]
    assert chosen == [0, 2, 0, 2]


def test_power_of_two_is_seeded_and_needs_a_generator() -> None:
    snapshot = loads([5, 1, 9, 3])
    picks = [
        [
            choose_instance(
                DispatchPolicy.POWER_OF_TWO, REQUEST, snapshot, np.random.default_rng(seed)
            )
            for _ in range(5)
        ]
        for seed in (1, 1)
    ]
    assert picks[0] == picks[1]
    with pytest.raises(ValueError, match="Generator"):
        choose_instance(DispatchPolicy.POWER_OF_TWO, REQUEST, snapshot)


def test_no_instance_can_hold_the_prompt() -> None:
    with pytest.raises(NoEligibleInstanceError, match="exceeds the KV cache"):
        choose_instance(DispatchPolicy.LEAST_TOKENS, REQUEST, loads([0, 0], capacity=[100, 200]))


@settings(max_examples=50, deadline=None)
@given(
    policy=st.sampled_from(list(DispatchPolicy)),
    pending=st.lists(st.floats(0, 1e5), min_size=1, max_size=20),
    data=st.data(),
)
def test_the_choice_is_always_an_eligible_instance(
    policy: DispatchPolicy, pending: list[float], data: st.DataObject
) -> None:
    n = len(pending)
    capacity = data.draw(st.lists(st.sampled_from([100.0, 10_000.0]), min_size=n, max_size=n))
    capacity[data.draw(st.integers(0, n - 1))] = 10_000.0
    kv = data.draw(st.lists(st.floats(0, 100.0), min_size=n, max_size=n))
    snapshot = loads(pending, kv_used=kv, capacity=capacity)
    chosen = choose_instance(
        policy,
        DispatchRequest(500, data.draw(st.integers(0, 100))),
        snapshot,
        np.random.default_rng(0),
    )
    assert 0 <= chosen < n and capacity[chosen] >= 500
