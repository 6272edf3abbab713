"""The migration policy (Llumnix virtual usage): balance, make room, headroom, drain, no
ping-pong; and the least-virtual-usage dispatch that shares its load measure."""

from __future__ import annotations

import math

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
from tessera.policies.migration import (
    InstanceState,
    Migration,
    MigrationReason,
    MigrationSettings,
    QueuedRequest,
    RunningRequest,
    instance_load,
    plan_migrations,
    virtual_usage_tokens,
)

CAPACITY = 10_000


def instance(
    name: str,
    kv: list[int],
    queued: list[int] | None = None,
    draining: bool = False,
    high: set[int] | None = None,
    capacity: int = CAPACITY,
) -> InstanceState:
    high = high or set()
    return InstanceState(
        name=name,
        capacity_tokens=capacity,
        running=tuple(
            RunningRequest(f"{name}-{i}", tokens, high_priority=i in high)
            for i, tokens in enumerate(kv)
        ),
        queued=tuple(QueuedRequest(tokens) for tokens in queued or []),
        draining=draining,
    )


def apply(instances: list[InstanceState], moves: tuple[Migration, ...]) -> list[InstanceState]:
    """The instances once the moves completed (what the engine does with a plan)."""
    by_name = {i.name: i for i in instances}
    running = {i.name: list(i.running) for i in instances}
    for move in moves:
        [request] = [r for r in running[move.source] if r.request_id == move.request_id]
        running[move.source].remove(request)
        running[move.target].append(request)
    return [
        InstanceState(
            name,
            state.capacity_tokens,
            tuple(running[name]),
            state.queued,
            draining=state.draining,
        )
        for name, state in by_name.items()
    ]


def test_balance_moves_the_shortest_request_from_the_busiest_to_the_idlest() -> None:
    instances = [
        instance("a", [3000, 2000, 1500, 1000]),
        instance("b", [1000]),
        instance("c", [500]),
    ]
    plan = plan_migrations(instances, MigrationSettings(max_migrations=1))
    [move] = plan.migrations
    assert (move.source, move.target, move.request_id) == ("a", "c", "a-3")
    assert move.reason is MigrationReason.BALANCE
    assert plan.loads_after["a"] == pytest.approx(0.65)
    assert plan.loads_after["c"] == pytest.approx(0.15)


def test_a_balanced_pool_does_not_move() -> None:
    instances = [instance("a", [3000, 3000]), instance("b", [3000, 2500])]
    assert plan_migrations(instances, MigrationSettings(source_min_load=0.0)).migrations == ()
    # A gap above min_gain that no single request can narrow without reversing it: no move.
    instances = [instance("a", [6000]), instance("b", [4000])]
    assert plan_migrations(instances, MigrationSettings(source_min_load=0.0)).migrations == ()


def test_a_lightly_loaded_pool_is_left_alone() -> None:
    instances = [instance("a", [2000, 2000]), instance("b", [])]
    assert plan_migrations(instances, MigrationSettings(source_min_load=0.5)).migrations == ()
    assert plan_migrations(instances, MigrationSettings(source_min_load=0.3)).migrations


def test_a_queued_long_prompt_makes_room_by_moving_running_requests_out() -> None:
    # a has 2,000 free tokens and a 6,000-token prompt waiting: it looks 140% full.
    instances = [instance("a", [4000, 2000, 2000], queued=[6000]), instance("b", [1000])]
    loads = {i.name: instance_load(i, MigrationSettings()) for i in instances}
    assert loads["a"] == pytest.approx(1.4)
    plan = plan_migrations(instances, MigrationSettings(max_per_instance=4))
    reasons = [m.reason for m in plan.migrations]
    assert reasons[:2] == [MigrationReason.MAKE_ROOM] * 2  # the two 2,000s free 4,000 tokens
    assert all(m.source == "a" and m.target == "b" for m in plan.migrations)
    freed = sum(m.kv_tokens for m in plan.migrations)
    assert CAPACITY - (8000 - freed) >= 6000


def test_headroom_moves_normal_requests_off_an_instance_running_high_priority() -> None:
    instances = [instance("a", [2000, 1000, 1500], high={0}), instance("b", [2500, 2000])]
    quiet = MigrationSettings(source_min_load=0.3)
    assert plan_migrations(instances, quiet).migrations == ()  # 0.45 vs 0.45
    roomy = MigrationSettings(source_min_load=0.3, high_priority_headroom_tokens=3000)
    assert virtual_usage_tokens(instances[0], roomy) == 7500
    [move] = plan_migrations(instances, roomy).migrations
    assert move.reason is MigrationReason.PRIORITY_HEADROOM
    assert move.request_id == "a-1"  # a normal request, the shortest; not the high one


def test_a_draining_instance_sends_everything_and_receives_nothing() -> None:
    instances = [
        instance("a", [500, 400], draining=True),
        instance("b", [9000]),
        instance("c", [100]),
    ]
    assert math.isinf(instance_load(instances[0], MigrationSettings()))
    plan = plan_migrations(instances, MigrationSettings(max_per_instance=4, min_gain=0.5))
    assert sorted(m.request_id for m in plan.migrations) == ["a-0", "a-1"]
    assert all(m.reason is MigrationReason.DRAIN for m in plan.migrations)
    assert all(m.target == "c" for m in plan.migrations)


def test_a_target_never_takes_more_than_its_physical_capacity() -> None:
    instances = [instance("a", [6000, 3000], draining=True), instance("b", [5000])]
    plan = plan_migrations(instances, MigrationSettings(max_per_instance=4))
    assert [m.request_id for m in plan.migrations] == ["a-1"]  # 6,000 more would not fit


def test_migrations_in_progress_count_against_the_per_instance_limit() -> None:
    busy = InstanceState("a", CAPACITY, instance("a", [4000, 4000]).running, migrations_out=1)
    assert plan_migrations([busy, instance("b", [])]).migrations == ()


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="min_gain must be"):
        MigrationSettings(min_gain=float("nan"))
    with pytest.raises(ValueError, match="max_per_instance must be"):
        MigrationSettings(max_per_instance=0)
    with pytest.raises(ValueError, match="capacity_tokens must be > 0"):
        InstanceState("x", 0)
    with pytest.raises(ValueError, match="unique"):
        plan_migrations([instance("a", []), instance("a", [])])


# ---- properties -------------------------------------------------------------------------------

kv_lists = st.lists(st.integers(1, 3000), max_size=6)


@st.composite
def pools(draw: st.DrawFn) -> list[InstanceState]:
    count = draw(st.integers(2, 6))
    drain = draw(st.sets(st.integers(0, count - 1), max_size=count - 1))
    return [
        instance(
            f"i{k}",
            draw(kv_lists),
            queued=draw(st.lists(st.integers(1, 4000), max_size=2)),
            draining=k in drain,
            high=draw(st.sets(st.integers(0, 5), max_size=2)),
        )
        for k in range(count)
    ]


policy_settings = st.builds(
    MigrationSettings,
    min_gain=st.floats(0.0, 0.3),
    source_min_load=st.floats(0.0, 1.0),
    high_priority_headroom_tokens=st.integers(0, 2000),
    max_migrations=st.integers(0, 10),
    max_per_instance=st.integers(1, 3),
)


@settings(max_examples=200, deadline=None)
@given(pool=pools(), knobs=policy_settings)
def test_never_to_a_more_loaded_or_draining_instance_nor_over_capacity(
    pool: list[InstanceState], knobs: MigrationSettings
) -> None:
    plan = plan_migrations(pool, knobs)
    before = plan.loads_before
    by_name = {i.name: i for i in pool}
    assert len(plan.migrations) <= knobs.max_migrations
    for move in plan.migrations:
        assert not by_name[move.target].draining
        assert before[move.target] < before[move.source]
        assert move.target_load_after < move.source_load_before
    after = {i.name: i for i in apply(pool, plan.migrations)}
    for name in {m.target for m in plan.migrations}:
        assert after[name].used_tokens <= after[name].capacity_tokens
    moved = [m.request_id for m in plan.migrations]
    assert len(moved) == len(set(moved))
    outgoing: dict[str, int] = {}
    for move in plan.migrations:
        outgoing[move.source] = outgoing.get(move.source, 0) + 1
    assert all(count <= knobs.max_per_instance for count in outgoing.values())


@settings(max_examples=200, deadline=None)
@given(pool=pools(), knobs=policy_settings)
def test_no_ping_pong_a_static_pool_settles_and_its_peak_load_never_rises(
    pool: list[InstanceState], knobs: MigrationSettings
) -> None:
    """With nothing arriving or finishing, rounds reach a plan with no moves: every balancing
    move lowers the sum of squared loads and a drained request never returns."""
    knobs = MigrationSettings(
        min_gain=max(knobs.min_gain, 0.01),
        source_min_load=knobs.source_min_load,
        high_priority_headroom_tokens=knobs.high_priority_headroom_tokens,
        max_migrations=max(1, knobs.max_migrations),
        max_per_instance=knobs.max_per_instance,
    )

    def peak(states: list[InstanceState]) -> float:
        return max(instance_load(i, knobs) for i in states if not i.draining)

    for _ in range(500):
        plan = plan_migrations(pool, knobs)
        if not plan.migrations:
            break
        moved = apply(pool, plan.migrations)
        if all(m.reason is not MigrationReason.DRAIN for m in plan.migrations):
            assert peak(moved) <= peak(pool) + 1e-12
        pool = moved
    else:
        pytest.fail("migrations did not settle within 500 rounds of a static pool")


@settings(max_examples=100, deadline=None)
@given(
    drained=st.lists(st.integers(1, 2000), min_size=1, max_size=12),
    others=st.lists(kv_lists, min_size=1, max_size=4),
    knobs=policy_settings,
)
def test_a_draining_instance_empties_when_the_others_have_room(
    drained: list[int], others: list[list[int]], knobs: MigrationSettings
) -> None:
    knobs = MigrationSettings(
        min_gain=knobs.min_gain,
        high_priority_headroom_tokens=0,
        max_migrations=max(1, knobs.max_migrations),
        max_per_instance=knobs.max_per_instance,
    )
    # Room: every other instance's capacity covers its own load and all that is drained.
    room = sum(drained) + max(sum(kv) for kv in others)
    pool = [instance("d", drained, draining=True, capacity=room)]
    pool += [instance(f"o{k}", kv, capacity=room) for k, kv in enumerate(others)]
    for _ in range(len(drained) + 1):
        plan = plan_migrations(pool, knobs)
        pool = apply(pool, plan.migrations)
        if not pool[0].running:
            break
    assert pool[0].running == ()
    assert sum(len(i.running) for i in pool) == len(drained) + sum(len(kv) for kv in others)


# ---- dispatch ---------------------------------------------------------------------------------


def test_least_virtual_usage_counts_queued_prompts_and_skips_draining_instances() -> None:
    snapshot = InstanceLoads.empty(np.array([10_000.0, 10_000.0, 20_000.0]), np.ones(3))
    snapshot.kv_used_tokens[:] = [2000, 1000, 4000]
    snapshot.pending_prefill_tokens[:] = [0, 3000, 0]
    request = DispatchRequest(prompt_tokens=100, sequence=0)
    assert choose_instance(DispatchPolicy.LEAST_VIRTUAL_USAGE, request, snapshot) == 0
    snapshot.draining[0] = True  # type: ignore[index]
    assert choose_instance(DispatchPolicy.LEAST_VIRTUAL_USAGE, request, snapshot) == 2
    snapshot.draining[:] = True  # type: ignore[index]
    with pytest.raises(NoEligibleInstanceError, match="draining"):
        choose_instance(DispatchPolicy.LEAST_VIRTUAL_USAGE, request, snapshot)


@settings(max_examples=50, deadline=None)
@given(policy=st.sampled_from(list(DispatchPolicy)), drain=st.lists(st.booleans(), min_size=3))
def test_no_dispatch_policy_picks_a_draining_instance(
    policy: DispatchPolicy, drain: list[bool]
) -> None:
    n = len(drain)
    drain[-1] = False
    snapshot = InstanceLoads.empty(np.full(n, 10_000.0), np.ones(n))
    snapshot.draining[:] = drain  # type: ignore[index]
    chosen = choose_instance(policy, DispatchRequest(10, 3), snapshot, np.random.default_rng(0))
    assert not drain[chosen]
