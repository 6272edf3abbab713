"""Live KV migration inside the simulator: `policies.migration` every interval, pre-copy while
the request keeps decoding, then a short stall for the last tokens.

A `SimulatedMigrator` is an event target on a built `Simulation` (the loop's `push_event`
hook, as sim/power.py's controller is). Each round it snapshots the instances that decode
(colocated, or the decode pool of a disaggregated plan) as `policies.migration.InstanceState`,
asks `plan_migrations` what to move, and carries each move out as the engine does:

1. reserve the request's blocks on the target (a target without them is skipped);
2. pre-copy: the KV the request holds crosses the link while it keeps decoding on the source;
   the link is booked on the same per-interface queues as prefill->decode KV transfers
   (sim/transfer.py), so migrations and disaggregated hand-offs contend;
3. at the source's next iteration boundary, stop-and-copy: the request leaves the source's batch
   and is stalled for `MigrationCosts.stall_s` (the tokens generated since the pre-copy started
   plus the last partial block, over the link, and a fixed overhead; or measured stalls by
   context length from a JSON file); then it joins the target's running requests.

A migration aborts, leaving the request where it was, when the request finished, was preempted
or stopped decoding meanwhile, or the target cannot hold the tokens it grew by. A migrated
request is not moved again for `cooldown_s`, so that a changing load does not bounce it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tessera.api.model_deployment import PoolRole
from tessera.policies.batching import blocks_for_tokens
from tessera.policies.migration import (
    InstanceState,
    MigrationPlan,
    MigrationSettings,
    QueuedRequest,
    RunningRequest,
    plan_migrations,
)
from tessera.sim.instance import Instance, Request
from tessera.sim.simulation import Simulation
from tessera.sim.transfer import KvLinks, TransferModel

MIN_REMAINING_TOKENS = 8
"""A request this close to its end is not worth moving: it frees its blocks soon anyway."""


@dataclass(frozen=True)
class MigrationCosts:
    """What one migration costs besides the pre-copy (which overlaps decoding)."""

    stall_overhead_s: float = 0.0
    """Fixed part of the stall (request state, the commit round trip)."""
    precopy_gbps: float | None = None
    """Pre-copy bandwidth, GB/s; None: the link the KV transfer model uses (sim/transfer.py)."""
    stall_context_tokens: tuple[float, ...] = ()
    stall_ms: tuple[float, ...] = ()
    """Measured stall by context length (interpolated, flat beyond the ends); when given, it
    replaces the modelled stall."""
    source: str = "the KV transfer model (sim/transfer.py)"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stall_overhead_s) and self.stall_overhead_s >= 0):
            raise ValueError(f"stall_overhead_s must be >= 0, got {self.stall_overhead_s}")
        if self.precopy_gbps is not None and not (
            math.isfinite(self.precopy_gbps) and self.precopy_gbps > 0
        ):
            raise ValueError(f"precopy_gbps must be a finite number > 0, got {self.precopy_gbps}")
        if len(self.stall_context_tokens) != len(self.stall_ms):
            raise ValueError("stall_context_tokens and stall_ms must have equal lengths")
        if any(b <= a for a, b in itertools.pairwise(self.stall_context_tokens)):
            raise ValueError("stall_context_tokens must increase")
        if any(not (math.isfinite(v) and v >= 0) for v in self.stall_ms):
            raise ValueError(f"every stall_ms must be a finite number >= 0, got {self.stall_ms}")

    @classmethod
    def from_json(cls, path: Path | str) -> MigrationCosts:
        """Measured costs: `bench/migration_bench.py`'s JSON (`{"rows": [{"context_tokens": N,
        "stall_ms": S, "precopy_mib": M, "precopy_s": T}, ...]}`, repeats per context: the
        median stall is taken), the same under `"points"` (with `precopy_bytes` or
        `precopy_mib`), or `{"stall_ms": {"1024": S, ...}, "precopy_gbps": G}`."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a JSON object")
        pairs: list[tuple[float, float]] = []
        gbps = data.get("precopy_gbps")
        rows = data.get("rows", data.get("points"))
        if isinstance(rows, list):
            stalls: dict[float, list[float]] = {}
            rates = []
            for row in rows:
                stalls.setdefault(float(row["context_tokens"]), []).append(float(row["stall_ms"]))
                size = row.get("precopy_bytes") or float(row.get("precopy_mib") or 0) * 2**20
                if size and row.get("precopy_s"):
                    rates.append(float(size) / float(row["precopy_s"]) / 1e9)
            pairs = [(context, float(np.median(values))) for context, values in stalls.items()]
            if gbps is None and rates:
                gbps = float(np.median(rates))
        elif isinstance(data.get("stall_ms"), Mapping):
            pairs = [(float(k), float(v)) for k, v in data["stall_ms"].items()]
        else:
            raise ValueError(f"{path}: needs 'rows' or 'points' (a list) or 'stall_ms' (an object)")
        pairs.sort()
        return cls(
            precopy_gbps=float(gbps) if gbps is not None else None,
            stall_context_tokens=tuple(p[0] for p in pairs),
            stall_ms=tuple(p[1] for p in pairs),
            source=f"measured ({Path(path).name})",
        )

    def stall_s(self, context_tokens: int, copy_s: float) -> float:
        """The stall of a request with `context_tokens`, whose last tokens take `copy_s`."""
        if self.stall_ms:
            ms = np.interp(context_tokens, self.stall_context_tokens, self.stall_ms)
            return float(ms) / 1e3
        return copy_s + self.stall_overhead_s


class _Bandwidth:
    """A transfer model at a fixed measured bandwidth (`TransferModel` for `KvLinks.book`)."""

    def __init__(self, bytes_per_token: float, gbps: float) -> None:
        self.bytes_per_token = bytes_per_token
        self.gbps = gbps

    def kv_transfer_time_s(self, tokens: int, link_gbps: float | None = None) -> float:
        return tokens * self.bytes_per_token / (self.gbps * 1e9)


@dataclass
class MigrationStats:
    """What the migrator did over a run."""

    rounds: int = 0
    planned: int = 0
    started: int = 0
    committed: int = 0
    aborted: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    stall_s: list[float] = field(default_factory=list)
    precopy_s: list[float] = field(default_factory=list)
    precopy_tokens: int = 0

    def abort(self, why: str) -> None:
        self.aborted[why] = self.aborted.get(why, 0) + 1

    def summary(self) -> dict[str, Any]:
        stalls = np.array(self.stall_s) * 1e3
        precopy = np.array(self.precopy_s) * 1e3
        return {
            "rounds": self.rounds,
            "planned": self.planned,
            "started": self.started,
            "committed": self.committed,
            "aborted": dict(sorted(self.aborted.items())),
            "by_reason": dict(sorted(self.by_reason.items())),
            "stall_ms_p50": round(float(np.percentile(stalls, 50)), 3) if len(stalls) else None,
            "stall_ms_p99": round(float(np.percentile(stalls, 99)), 3) if len(stalls) else None,
            "precopy_ms_p50": round(float(np.percentile(precopy, 50)), 3) if len(precopy) else None,
            "precopy_tokens": self.precopy_tokens,
        }


@dataclass
class _InFlight:
    request: Request
    source: Instance
    target: Instance
    reserved_blocks: int
    kv_at_start: int


class _Event:
    """A bound event of one migration for the loop (`step_end(now, version)`)."""

    __slots__ = ("flight", "handler")

    def __init__(self, handler: Any, flight: _InFlight) -> None:
        self.handler = handler
        self.flight = flight

    def step_end(self, now: float, version: int) -> None:
        self.handler(self.flight, now)


class SimulatedMigrator:
    """The migration policy over the decoding instances of every deployment of a simulation."""

    def __init__(
        self,
        simulation: Simulation,
        settings: MigrationSettings | None = None,
        costs: MigrationCosts | None = None,
        interval_s: float = 0.25,
        cooldown_s: float = 5.0,
    ) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a finite number > 0, got {interval_s}")
        self.sim = simulation
        self.settings = settings or MigrationSettings()
        self.costs = costs or MigrationCosts()
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self.links: KvLinks = dataclasses.replace(
            simulation.links, transfers=0, busy_s=0.0, tokens=0
        )
        """The simulation's link settings with migrations' own counters; the interfaces' queues
        are the instances', shared with prefill->decode transfers."""
        self.stats = MigrationStats()
        self.groups: list[list[Instance]] = []
        for deployment in simulation.deployments:
            stage = deployment.decode or deployment.entry
            instances = [i for i in stage.instances if i.role is not PoolRole.PREFILL]
            if len(instances) > 1:
                self.groups.append(instances)
        self.moving: dict[int, _InFlight] = {}
        self.out_count: dict[int, int] = {}
        self.in_count: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.moved_at: dict[int, float] = {}
        simulation.push_event(interval_s, self, 0)

    # ---- the round ------------------------------------------------------------------------
    def step_end(self, now: float, version: int) -> None:
        self.stats.rounds += 1
        for group in self.groups:
            if self._worth_planning(group):
                self._carry_out(self._plan(group, now), group, now)
        if self._work_left(now):
            self.sim.push_event(now + self.interval_s, self, 0)

    def _work_left(self, now: float) -> bool:
        sim = self.sim
        if len(sim.arrival_s) and now < float(sim.arrival_s[-1]):
            return True
        return bool(((sim.finish_count == 0) & ~sim.rejected).any())

    def _worth_planning(self, group: Sequence[Instance]) -> bool:
        """A cheap test before building the snapshot: is any instance a possible source?"""
        threshold = self.settings.source_min_load
        for instance in group:
            draining = instance.loads.draining
            if draining is not None and draining[instance.slot] and instance.running:
                return True
            used = instance.used_blocks * instance.block_size
            head = instance.waiting[0] if instance.waiting else None
            if head is not None:
                used += head.target - head.prefilled
            if used >= threshold * instance.capacity_tokens and instance.running:
                return True
        return False

    def _plan(self, group: Sequence[Instance], now: float) -> MigrationPlan:
        """The policy's snapshot: every instance's usage, and the migratable requests of the
        instances that may be sources (the others' requests are only counted)."""
        states = []
        threshold = self.settings.source_min_load
        for instance in group:
            key = id(instance)
            block = instance.block_size
            flags = instance.loads.draining
            draining = bool(flags is not None and flags[instance.slot])
            queued: tuple[QueuedRequest, ...] = ()
            if instance.waiting:
                head = instance.waiting[0]
                queued = (QueuedRequest(head.target - head.prefilled),)
            elif instance.incoming:
                queued = (QueuedRequest(instance.incoming[0].kv),)
            reserved = self.reserved.get(key, 0) * block
            held = instance.used_blocks * block - reserved
            demand = held + reserved + (queued[0].prompt_tokens if queued else 0)
            running = []
            if draining or demand >= threshold * instance.capacity_tokens:
                for r in instance.running:
                    if (
                        r.prefilled >= r.target
                        and r.rid not in self.moving
                        and r.output - r.generated > MIN_REMAINING_TOKENS
                        and now - self.moved_at.get(r.rid, -math.inf) >= self.cooldown_s
                    ):
                        running.append(RunningRequest(str(r.rid), r.kv))
            states.append(
                InstanceState(
                    name=instance.name,
                    capacity_tokens=instance.capacity_tokens,
                    running=tuple(running),
                    queued=queued,
                    reserved_tokens=reserved,
                    other_tokens=max(0, held - sum(r.kv_tokens for r in running)),
                    draining=draining,
                    migrations_out=self.out_count.get(key, 0),
                    migrations_in=self.in_count.get(key, 0),
                )
            )
        return plan_migrations(states, self.settings)

    def _carry_out(self, plan: MigrationPlan, group: Sequence[Instance], now: float) -> None:
        by_name = {i.name: i for i in group}
        self.stats.planned += len(plan.migrations)
        for move in plan.migrations:
            source, target = by_name[move.source], by_name[move.target]
            rid = int(move.request_id)
            request = next((r for r in source.running if r.rid == rid), None)
            if request is None:
                self.stats.abort("gone before start")
                continue
            blocks = blocks_for_tokens(request.kv, target.block_size) + 1
            if not target.reserve_blocks(blocks):
                self.stats.abort("no room on target")
                continue
            flight = _InFlight(request, source, target, blocks, request.kv)
            self._track(flight, +1)
            self.stats.started += 1
            self.stats.by_reason[move.reason.value] = (
                self.stats.by_reason.get(move.reason.value, 0) + 1
            )
            _, end = self.links.book(source, target, request.kv, now, self._model(source))
            self.stats.precopy_s.append(end - now)
            self.stats.precopy_tokens += request.kv
            self.sim.push_event(end, _Event(self._precopied, flight), 0)

    # ---- one migration --------------------------------------------------------------------
    def _model(self, instance: Instance) -> TransferModel:
        perf: Any = instance.cost.perf
        if self.costs.precopy_gbps is None:
            model: TransferModel = perf
            return model
        return _Bandwidth(perf.architecture.kv_bytes_per_token, self.costs.precopy_gbps)

    def _track(self, flight: _InFlight, step: int) -> None:
        source, target = id(flight.source), id(flight.target)
        self.out_count[source] = self.out_count.get(source, 0) + step
        self.in_count[target] = self.in_count.get(target, 0) + step
        self.reserved[target] = self.reserved.get(target, 0) + step * flight.reserved_blocks
        if step > 0:
            self.moving[flight.request.rid] = flight
        else:
            del self.moving[flight.request.rid]

    @staticmethod
    def _still_decoding(flight: _InFlight) -> bool:
        r = flight.request
        return (
            r.home is flight.source
            and r.prefilled >= r.target
            and r.generated < r.output
            and r in flight.source.running
        )

    def _abort(self, flight: _InFlight, why: str, now: float) -> None:
        self._track(flight, -1)
        flight.target.unreserve_blocks(flight.reserved_blocks, now)
        self.stats.abort(why)

    def _precopied(self, flight: _InFlight, now: float) -> None:
        """Pre-copy done: stop and copy at the source's next iteration boundary."""
        if not self._still_decoding(flight):
            self._abort(flight, "request finished or preempted during pre-copy", now)
            return
        flight.source.at_next_boundary(lambda at: self._stop_and_copy(flight, at), now)

    def _stop_and_copy(self, flight: _InFlight, now: float) -> None:
        request, target = flight.request, flight.target
        if not self._still_decoding(flight):
            self._abort(flight, "request finished or preempted during pre-copy", now)
            return
        need = blocks_for_tokens(request.kv, target.block_size)
        if need > flight.reserved_blocks:
            extra = need - flight.reserved_blocks
            if not target.reserve_blocks(extra):
                self._abort(flight, "target full at stop-and-copy", now)
                return
            self.reserved[id(target)] = self.reserved.get(id(target), 0) + extra
            flight.reserved_blocks = need
        flight.source.detach(request)
        block = target.block_size
        last = request.kv - flight.kv_at_start + flight.kv_at_start % block
        copy_s = self._model(flight.source).kv_transfer_time_s(
            last, self.links.link_gbps or min(flight.source.network_gbps, target.network_gbps)
        )
        stall = self.costs.stall_s(request.kv, copy_s)
        self.stats.stall_s.append(stall)
        self.sim.push_event(now + stall, _Event(self._arrived, flight), 0)

    def _arrived(self, flight: _InFlight, now: float) -> None:
        request, target = flight.request, flight.target
        need = blocks_for_tokens(request.kv, target.block_size)
        surplus = flight.reserved_blocks - need
        self._track(flight, -1)
        request.blocks = need
        target.receive(request, now)
        if surplus:
            target.unreserve_blocks(surplus, now)
        self.moved_at[request.rid] = now
        self.stats.committed += 1
