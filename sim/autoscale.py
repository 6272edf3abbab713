"""Autoscaling inside the simulator: observed load -> `policies.replan` -> replicas started or
drained, as the operator's closed loop does (operator/autoscaler.py).

The simulation is built with every replica a pool may grow to; a `SimulatedAutoscaler` keeps
only some of them in service. Every `interval_s` it observes what telemetry would show over the
last `window_s` (arrivals per second, mean prompt tokens of the arrivals, mean output tokens of
the requests that finished) and asks `replan` for the plan, with its hysteresis (scale up at
once, down after `scale_down_delay_s` below `scale_down_utilization`). The layout is held (no
re-layout: a simulated pool cannot change class or TP degree mid-run).

- Scale up: replicas that were off start, and take requests `startup_s` later (a pod pulling
  weights); they are paid from the start.
- Scale down: the replicas with the fewest running requests drain: dispatch skips them (the
  `draining` flag of the pool's loads, which every dispatch policy honours), the requests that
  had not started on them go to other replicas, and the running ones either finish in place or,
  with a `SimulatedMigrator` on the same simulation, migrate out (a draining instance has
  infinite virtual usage). A drained replica stops being paid when it holds nothing; one still
  busy after `drain_deadline_s` is counted as an overrun (Kubernetes would kill it there).

Replica-hours are what the pools were paid for: the time each replica spent starting, serving
or draining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from tessera.api.model_deployment import Plan
from tessera.policies.replan import ObservedLoad, ReplanSettings, replan
from tessera.sim.instance import Instance, Request
from tessera.sim.simulation import Simulation


class ReplicaState(StrEnum):
    OFF = "off"
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True)
class AutoscaleSettings:
    interval_s: float = 15.0
    """How often the loop observes and re-plans."""
    window_s: float = 60.0
    """Telemetry window the rate and lengths are measured over."""
    startup_s: float = 30.0
    """From a replica's start to its first request (weights loaded, warmed up)."""
    drain_deadline_s: float = 60.0
    """A draining replica still busy after this overran (terminationGracePeriodSeconds)."""
    retire_check_s: float = 1.0
    """How often draining replicas are checked for being empty."""
    replan: ReplanSettings = field(
        default_factory=lambda: ReplanSettings(
            scale_down_delay_s=120.0, relayout_min_gain=math.inf, relayout_delay_s=math.inf
        )
    )

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s", "drain_deadline_s", "retire_check_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.startup_s) and self.startup_s >= 0):
            raise ValueError(f"startup_s must be a finite number >= 0, got {self.startup_s}")


@dataclass
class _Replica:
    instance: Instance
    pool: str
    state: ReplicaState = ReplicaState.OFF
    since_s: float = 0.0
    paid_s: float = 0.0

    def set(self, state: ReplicaState, now: float) -> None:
        if self.state is not ReplicaState.OFF:
            self.paid_s += now - self.since_s
        self.state = state
        self.since_s = now


@dataclass(frozen=True)
class ScaleDecision:
    time_s: float
    rate_per_s: float
    replicas: dict[str, int]
    changed: bool
    reason: str


class _Later:
    """A replica's start completing, as an event of the loop."""

    __slots__ = ("replica", "scaler", "started_s")

    def __init__(self, scaler: SimulatedAutoscaler, replica: _Replica) -> None:
        self.scaler = scaler
        self.replica = replica
        self.started_s = replica.since_s

    def step_end(self, now: float, version: int) -> None:
        replica = self.replica
        if replica.state is ReplicaState.STARTING and replica.since_s == self.started_s:
            self.replica.set(ReplicaState.SERVING, now)
            self.scaler.set_draining(self.replica, False)


class _RetireCheck:
    __slots__ = ("scaler",)

    def __init__(self, scaler: SimulatedAutoscaler) -> None:
        self.scaler = scaler

    def step_end(self, now: float, version: int) -> None:
        self.scaler.retire(now)
        if self.scaler.work_left(now):
            self.scaler.sim.push_event(now + self.scaler.settings.retire_check_s, self, 0)


class SimulatedAutoscaler:
    """The closed loop over one deployment of a simulation."""

    def __init__(
        self,
        simulation: Simulation,
        initial: dict[str, int],
        settings: AutoscaleSettings | None = None,
        deployment: int = 0,
    ) -> None:
        self.sim = simulation
        self.settings = settings or AutoscaleSettings()
        self.index = deployment
        self.deployment = simulation.deployments[deployment]
        self.offers = simulation.cluster.offers()
        self.replicas: list[_Replica] = []
        self.pools = {p.plan.name: p for p in self.deployment.pools}
        for name, pool in self.pools.items():
            wanted = initial.get(name, pool.plan.replicas)
            if not 1 <= wanted <= len(pool.instances):
                raise ValueError(
                    f"initial replicas of pool {name} must be within 1..{len(pool.instances)} "
                    f"(the replicas it was built with), got {wanted}"
                )
            for k, instance in enumerate(pool.instances):
                replica = _Replica(instance, name)
                self.replicas.append(replica)
                if k < wanted:
                    replica.set(ReplicaState.SERVING, 0.0)
                else:
                    self.set_draining(replica, True)
        self.decisions: list[ScaleDecision] = []
        self.changed_at = 0.0
        self.overruns = 0
        self.drained = 0
        self.drain_s: list[float] = []
        simulation.push_event(self.settings.interval_s, self, 0)
        simulation.push_event(self.settings.retire_check_s, _RetireCheck(self), 0)

    # ---- helpers ------------------------------------------------------------------------
    def set_draining(self, replica: _Replica, draining: bool) -> None:
        instance = replica.instance
        flags = instance.loads.draining
        assert flags is not None, "InstanceLoads.empty always makes the draining flags"
        flags[instance.slot] = draining

    def work_left(self, now: float) -> bool:
        sim = self.sim
        if len(sim.arrival_s) and now < float(sim.arrival_s[-1]):
            return True
        return bool(((sim.finish_count == 0) & ~sim.rejected).any())

    def in_force(self) -> dict[str, int]:
        """Replicas per pool that count in the plan in force (starting or serving)."""
        counts = dict.fromkeys(self.pools, 0)
        for r in self.replicas:
            if r.state in (ReplicaState.STARTING, ReplicaState.SERVING):
                counts[r.pool] += 1
        return counts

    def plan_in_force(self) -> Plan:
        counts = self.in_force()
        plan = self.deployment.setup.plan
        pools = [
            p.model_copy(update={"replicas": counts.get(p.name, p.replicas)}) for p in plan.pools
        ]
        return plan.model_copy(update={"pools": pools})

    def observe(self, now: float) -> ObservedLoad:
        """What the agents' telemetry shows over the last window."""
        sim = self.sim
        start = max(0.0, now - self.settings.window_s)
        span = max(now - start, 1e-9)
        low, high = np.searchsorted(sim.arrival_s, [start, now])
        mine = sim.owner[low:high] == self.index
        prompts = sim.prompt[low:high][mine]
        done = (sim.finish_s >= start) & (sim.finish_s < now) & (sim.owner == self.index)
        outputs = sim.output[done]
        return ObservedLoad(
            request_rate_per_second=len(prompts) / span,
            mean_prompt_tokens=float(prompts.mean()) if len(prompts) else None,
            mean_output_tokens=float(outputs.mean()) if len(outputs) else None,
        )

    # ---- the loop -----------------------------------------------------------------------
    def step_end(self, now: float, version: int) -> None:
        observed = self.observe(now)
        current = self.plan_in_force()
        decision = replan(
            self.deployment.setup.spec,
            current,
            observed,
            self.offers,
            now - self.changed_at,
            self.settings.replan,
        )
        wanted = self.in_force()
        if decision.changed:
            by_role = {p.role: p.replicas for p in decision.plan.pools}
            for name, pool in self.pools.items():
                proposed = next(
                    (p.replicas for p in decision.plan.pools if p.name == name),
                    by_role.get(pool.plan.role, wanted[name]),
                )
                wanted[name] = max(1, min(len(pool.instances), proposed))
        live = self.in_force()
        if now - self.changed_at < self.settings.replan.scale_down_delay_s:
            # replan holds this delay within a layout; a re-layout proposal (which a simulated
            # pool cannot carry out) must not shrink the pool any sooner.
            wanted = {name: max(count, live[name]) for name, count in wanted.items()}
        changed = wanted != live
        if changed:
            self.changed_at = now
            for name, count in wanted.items():
                self._resize(name, count, now)
        self.decisions.append(
            ScaleDecision(now, observed.request_rate_per_second, wanted, changed, decision.reason)
        )
        if self.work_left(now):
            self.sim.push_event(now + self.settings.interval_s, self, 0)

    def _resize(self, pool: str, count: int, now: float) -> None:
        mine = [r for r in self.replicas if r.pool == pool]
        live = [r for r in mine if r.state in (ReplicaState.STARTING, ReplicaState.SERVING)]
        if count > len(live):
            for replica in [r for r in mine if r.state is ReplicaState.OFF][: count - len(live)]:
                replica.set(ReplicaState.STARTING, now)
                self.sim.push_event(now + self.settings.startup_s, _Later(self, replica), 0)
            return
        # Starting replicas go first (nothing runs on them), then the least busy.
        order = sorted(
            live,
            key=lambda r: (
                r.state is ReplicaState.SERVING,
                len(r.instance.running),
                r.instance.slot,
            ),
        )
        for replica in order[: len(live) - count]:
            if replica.state is ReplicaState.STARTING:
                replica.set(ReplicaState.OFF, now)
                continue
            replica.set(ReplicaState.DRAINING, now)
            self.set_draining(replica, True)
            for request in replica.instance.take_unstarted():
                self._redispatch(request, now)

    def _redispatch(self, request: Request, now: float) -> None:
        """A request that had not started on a draining replica goes to another one."""
        sim, deployment = self.sim, self.deployment
        if deployment.decode is not None and request.prefilled >= request.target > 0:
            target = sim._dispatch(deployment.decode, deployment.setup, request.kv)
            target.offer_transfer(request, now)
            return
        sim._dispatch(deployment.entry, deployment.setup, request.target).enqueue(request, now)

    def retire(self, now: float) -> None:
        """Draining replicas that hold nothing any more stop (and stop being paid)."""
        for replica in self.replicas:
            if replica.state is not ReplicaState.DRAINING:
                continue
            instance = replica.instance
            if instance.running or instance.waiting or instance.incoming or instance.used_blocks:
                continue
            took = now - replica.since_s
            self.drain_s.append(took)
            if took > self.settings.drain_deadline_s:
                self.overruns += 1
            self.drained += 1
            replica.set(ReplicaState.OFF, now)

    # ---- results ------------------------------------------------------------------------
    def replica_hours(self, end_s: float) -> float:
        total = 0.0
        for r in self.replicas:
            total += r.paid_s + (end_s - r.since_s if r.state is not ReplicaState.OFF else 0.0)
        return total / 3600.0

    def summary(self, end_s: float) -> dict[str, Any]:
        drains = np.array(self.drain_s)
        peak = max((sum(d.replicas.values()) for d in self.decisions), default=0)
        return {
            "replica_hours": round(self.replica_hours(end_s), 4),
            "decisions": len(self.decisions),
            "changes": sum(1 for d in self.decisions if d.changed),
            "peak_replicas": peak,
            "drained": self.drained,
            "drain_s_p50": round(float(np.percentile(drains, 50)), 3) if len(drains) else None,
            "drain_s_max": round(float(drains.max()), 3) if len(drains) else None,
            "drain_overruns": self.overruns,
            "timeline": [
                {"t_s": round(d.time_s, 1), "rate": round(d.rate_per_s, 3), **d.replicas}
                for d in self.decisions
                if d.changed
            ],
        }
