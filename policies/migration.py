"""Live migration of running requests between instances: which request moves where, and why.

Llumnix's idea (OSDI '24), as a pure decision over a snapshot of instances. Every instance has a
*virtual usage* of KV-cache tokens, which is more than what it physically holds whenever it should
look busier than its memory says:

- the KV tokens of its running requests (and those reserved for migrations coming in);
- a headroom for each high-priority request it runs or queues, so that instances carrying
  high-priority traffic are kept lightly loaded (fewer neighbours, shorter batches);
- the demand of its head-of-line queued request: a long prompt waiting for memory makes its
  instance look full, so running requests move out to make room for it (de-fragmentation);
- infinity for a draining instance (scale-down): everything running on it must leave, and it
  never receives a request, by dispatch or by migration.

An instance's *load* is its virtual usage over its KV capacity. A round pairs the most-loaded
instances (sources) with the least-loaded (targets) and moves the cheapest request that helps:
normal-priority requests before high-priority ones (a migration stalls the request a little),
then the shortest KV (the least to copy). A move is taken only when the source's load exceeds
the target's by at least `min_gain` (the imbalance worth a migration's stall), the move does
not reverse their order (the target stays at most as loaded as the source), and the target
stays below `target_max_load` (room to grow without preempting). The same request can then
never move back (that would need the target ahead by `min_gain`), an instance that sends in a
round does not receive in it, and every balancing move lowers the sum of squared loads, so a
pool whose requests stay put settles instead of ping-ponging (tests/test_migration_policy.py
checks it). A draining source skips these tests: any target with physical room and a load at
most `drain_target_max_load` after the move will do.

The same decision runs in the simulator (`sim/migration.py`) and is meant for the router; the
engine carries a migration out (pre-copy while decoding, then a short stop-and-copy) and may
abort it, in which case the request simply stays where it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray


class MigrationReason(StrEnum):
    """Why a request moves (the first that applies to its source)."""

    DRAIN = "drain"
    """The source is draining (scale-down): everything on it leaves."""
    MAKE_ROOM = "make-room"
    """The source's head-of-line queued request does not fit its free memory."""
    PRIORITY_HEADROOM = "priority-headroom"
    """The source runs high-priority requests; a normal one leaves to give them room."""
    BALANCE = "balance"
    """The source is more loaded than the target by more than the minimal gain."""


@dataclass(frozen=True)
class RunningRequest:
    """A request decoding on an instance, as the instance reports it."""

    request_id: str
    kv_tokens: int
    high_priority: bool = False
    migratable: bool = True
    """False while it prefills, is already migrating, or is about to finish."""


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting on an instance for memory (the engine's waiting queue, in order)."""

    prompt_tokens: int
    high_priority: bool = False


@dataclass(frozen=True)
class InstanceState:
    """One instance of a pool as a router observes it."""

    name: str
    capacity_tokens: int
    running: tuple[RunningRequest, ...] = ()
    queued: tuple[QueuedRequest, ...] = ()
    reserved_tokens: int = 0
    """KV tokens held for migrations coming in."""
    other_tokens: int = 0
    """KV tokens held by requests not listed in `running` (still prefilling, or left out of the
    snapshot because they may not move: a caller need list only the candidates)."""
    draining: bool = False
    migrations_out: int = 0
    """Migrations out of this instance in progress."""
    migrations_in: int = 0
    """Migrations into this instance in progress."""

    def __post_init__(self) -> None:
        if self.capacity_tokens <= 0:
            raise ValueError(
                f"instance {self.name}: capacity_tokens must be > 0, got {self.capacity_tokens}"
            )

    @property
    def used_tokens(self) -> int:
        """KV tokens physically held or promised."""
        return sum(r.kv_tokens for r in self.running) + self.reserved_tokens + self.other_tokens


@dataclass(frozen=True)
class MigrationSettings:
    """Knobs of the migration policy."""

    min_gain: float = 0.1
    """Least load gap (a share of capacity) between a source and a target for a move to be
    worth its stall; also the margin that keeps a request from moving back."""
    source_min_load: float = 0.5
    """Instances below this load are not relieved (they have room; a migration is not free).
    Draining instances are always sources."""
    high_priority_headroom_tokens: int = 0
    """Extra virtual usage per high-priority request (running or queued)."""
    target_max_load: float = 0.85
    """Highest load a target may reach by a balancing or make-room move: below 1, so that its
    own requests can grow (and its queue be admitted) without preempting the newcomer, which,
    being the newest request there, an engine would preempt first."""
    drain_target_max_load: float = 1.0
    """Highest load a target of a draining instance may reach."""
    max_migrations: int = 8
    """Most migrations started in one round."""
    max_per_instance: int = 1
    """Most migrations in progress out of, or into, any one instance."""

    def __post_init__(self) -> None:
        for name, value, low in (
            ("min_gain", self.min_gain, 0.0),
            ("source_min_load", self.source_min_load, 0.0),
            ("target_max_load", self.target_max_load, 0.0),
            ("drain_target_max_load", self.drain_target_max_load, 0.0),
        ):
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
        for name, count, least in (
            ("high_priority_headroom_tokens", self.high_priority_headroom_tokens, 0),
            ("max_migrations", self.max_migrations, 0),
            ("max_per_instance", self.max_per_instance, 1),
        ):
            if count < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {count}")


@dataclass(frozen=True)
class Migration:
    """Move `request_id` (holding `kv_tokens`) from `source` to `target`."""

    source: str
    target: str
    request_id: str
    kv_tokens: int
    reason: MigrationReason
    source_load_before: float
    target_load_after: float


@dataclass(frozen=True)
class MigrationPlan:
    migrations: tuple[Migration, ...]
    loads_before: dict[str, float] = field(default_factory=dict)
    loads_after: dict[str, float] = field(default_factory=dict)
    """Loads once the planned migrations complete (virtual usage over capacity)."""


ArrayOrFloat = TypeVar("ArrayOrFloat", float, NDArray[np.float64])


def load_fraction(
    virtual_tokens: ArrayOrFloat, capacity_tokens: ArrayOrFloat, draining: bool | NDArray[np.bool_]
) -> ArrayOrFloat:
    """Virtual usage over capacity; infinite while draining. Works on floats (the policy's
    rounds, in plain Python for speed) and on arrays (dispatch scores every instance of a pool
    at once with it)."""
    if isinstance(virtual_tokens, float | int) and isinstance(capacity_tokens, float | int):
        if draining:
            return math.inf
        return virtual_tokens / capacity_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(draining, np.inf, np.asarray(virtual_tokens) / capacity_tokens)
    return fraction


def virtual_usage_tokens(instance: InstanceState, settings: MigrationSettings) -> float:
    """The instance's virtual usage (infinite while draining): see the module docstring."""
    if instance.draining:
        return math.inf
    headroom = settings.high_priority_headroom_tokens
    usage = float(instance.used_tokens)
    usage += headroom * sum(1 for r in instance.running if r.high_priority)
    usage += headroom * sum(1 for q in instance.queued if q.high_priority)
    if instance.queued:
        usage += instance.queued[0].prompt_tokens
    return usage


def instance_load(instance: InstanceState, settings: MigrationSettings) -> float:
    return load_fraction(
        virtual_usage_tokens(instance, settings), float(instance.capacity_tokens), instance.draining
    )


@dataclass
class _Working:
    """An instance's state while a round is being planned (moves applied as they are chosen)."""

    state: InstanceState
    virtual: float
    used: int
    candidates: list[RunningRequest]
    outgoing: int
    incoming: int
    role: str = ""
    """"source" or "target" once it sent or received in this round: never both, so that a
    round does not move requests both ways between two instances."""

    @property
    def capacity(self) -> int:
        return self.state.capacity_tokens

    @property
    def load(self) -> float:
        return load_fraction(self.virtual, float(self.capacity), self.state.draining)


def _request_virtual(request: RunningRequest, settings: MigrationSettings) -> float:
    return request.kv_tokens + (
        settings.high_priority_headroom_tokens if request.high_priority else 0
    )


def _reason(source: _Working) -> MigrationReason:
    state = source.state
    if state.draining:
        return MigrationReason.DRAIN
    if state.queued and state.queued[0].prompt_tokens > state.capacity_tokens - source.used:
        return MigrationReason.MAKE_ROOM
    if any(r.high_priority for r in state.running):
        return MigrationReason.PRIORITY_HEADROOM
    return MigrationReason.BALANCE


def plan_migrations(
    instances: Sequence[InstanceState], settings: MigrationSettings | None = None
) -> MigrationPlan:
    """The migrations to start now (at most `max_migrations`), most-loaded sources first."""
    settings = settings or MigrationSettings()
    names = [i.name for i in instances]
    if len(set(names)) != len(names):
        raise ValueError(f"instance names must be unique, got {names}")
    working = [
        _Working(
            state=i,
            virtual=virtual_usage_tokens(i, settings),
            used=i.used_tokens,
            # Normal priority first (a stall hurts a high-priority request more), then the
            # least KV to copy; the id breaks ties so that the plan is deterministic.
            candidates=sorted(
                (r for r in i.running if r.migratable),
                key=lambda r: (r.high_priority, r.kv_tokens, r.request_id),
            ),
            outgoing=i.migrations_out,
            incoming=i.migrations_in,
        )
        for i in instances
    ]
    before = {w.state.name: w.load for w in working}
    chosen: list[Migration] = []
    while len(chosen) < settings.max_migrations:
        move = _best_move(working, settings)
        if move is None:
            break
        chosen.append(move)
    return MigrationPlan(tuple(chosen), before, {w.state.name: w.load for w in working})


def _best_move(working: list[_Working], settings: MigrationSettings) -> Migration | None:
    """The next move of the round (applied to `working`), or None when no move helps."""
    limit = settings.max_per_instance
    sources = sorted(
        (
            w
            for w in working
            if w.candidates
            and w.role != "target"
            and w.outgoing < limit
            and (w.state.draining or w.load >= settings.source_min_load)
        ),
        key=lambda w: (-w.load, w.state.name),
    )
    targets = sorted(
        (w for w in working if not w.state.draining and w.role != "source" and w.incoming < limit),
        key=lambda w: (w.load, w.state.name),
    )
    for source in sources:
        source_load = source.load
        for request in source.candidates:
            moved = _request_virtual(request, settings)
            for target in targets:
                if target is source or target.load >= source_load:
                    continue
                if target.used + request.kv_tokens > target.capacity:
                    continue
                target_after = (target.virtual + moved) / target.capacity
                if source.state.draining:
                    if target_after > settings.drain_target_max_load:
                        continue
                else:
                    if target_after > settings.target_max_load:
                        continue
                    source_after = (source.virtual - moved) / source.capacity
                    if source_load - target.load < settings.min_gain:
                        continue
                    if target_after > source_after:  # would reverse the pair's order
                        continue
                migration = Migration(
                    source=source.state.name,
                    target=target.state.name,
                    request_id=request.request_id,
                    kv_tokens=request.kv_tokens,
                    reason=_reason(source),
                    source_load_before=source_load,
                    target_load_after=target_after,
                )
                source.candidates.remove(request)
                source.role, target.role = "source", "target"
                source.outgoing += 1
                source.used -= request.kv_tokens
                if not source.state.draining:
                    source.virtual -= moved
                target.incoming += 1
                target.used += request.kv_tokens
                target.virtual += moved
                return migration
    return None
