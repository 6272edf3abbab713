"""A PowerBudget controller inside the simulator: measured draw in, `policies.power.decide`,
slowed iterations out, at the budget's control interval.

It plugs into a built `Simulation` through the event loop's one public hook, `push_event`: the
controller is an event target that reschedules itself every `controlIntervalSeconds` until the
workload is done. Each replica's busy time is metered on its own (`InstanceMeter`, which also
feeds the pool's own track unchanged), and its draw is the class power model
(`policies/power_model.py`) under the actuation in force: idle + compute-bound busy share x
(prefill-curve draw - idle) + memory-bound share x (decode-curve draw - idle). A decision
changes the replica's iteration costs (`StepCost.under`: the phase slowdowns of the model) from
its next iteration or run of decode iterations on, as a real engine's next kernel runs at the new
clock; dispatch keeps weighing replicas by their uncapped speed, as the router would.

The controlled draw timeline (`PowerOutcome`) replaces the pool tracks' power for power
questions: those book busy time at the uncapped levels of the performance model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import PoolRole
from tessera.api.power_budget import PowerBudgetSpec
from tessera.policies.power import DeviceView, Mode, decide
from tessera.policies.power_model import FREE, Actuation, ClassPowerModel, class_power_model
from tessera.sim.instance import Instance
from tessera.sim.metrics import PowerTrack
from tessera.sim.simulation import Simulation
from tessera.sim.stepcost import StepCost

IDLE_STATE = 0
"""`Instance.state` of a replica with no iteration in progress."""

METER_BINS_PER_INTERVAL = 4
"""Power timeline bins per control interval: breaches are measured finer than the controller
sees them."""


class InstanceMeter(PowerTrack):
    """One replica's busy time in fine bins, also booked on its pool's track."""

    def __init__(self, bin_s: float, pool_track: PowerTrack) -> None:
        super().__init__(bin_s, 1, 0.0, 0.0, 0.0)
        self.pool_track = pool_track

    def add_busy(self, start_s: float, end_s: float, compute_s: float) -> None:
        self.pool_track.add_busy(start_s, end_s, compute_s)
        super().add_busy(start_s, end_s, compute_s)

    def busy(self, first_bin: int, last_bin: int) -> tuple[float, float]:
        """(compute-bound, memory-bound) busy seconds in bins [first, last)."""
        high = min(last_bin, len(self.compute))
        if high <= first_bin:
            return 0.0, 0.0
        return sum(self.compute[first_bin:high]), sum(self.memory[first_bin:high])


ROLE_NAMES = {
    PoolRole.PREFILL: "prefill",
    PoolRole.DECODE: "decode",
    PoolRole.COLOCATED: "colocated",
}


@dataclass
class _Replica:
    instance: Instance
    deployment: str
    role: str
    priority: str
    devices: int
    model: ClassPowerModel
    base_cost: StepCost
    meter: InstanceMeter
    actuation: Actuation = FREE  # of the replica as a whole (limits summed over its devices)
    history: list[Actuation] = field(default_factory=list)  # per device, per control interval

    @property
    def per_device(self) -> Actuation:
        return _per_device(self.actuation, self.devices)


@dataclass(frozen=True)
class PowerOutcome:
    """What the controller saw and did over a run."""

    bin_s: float
    interval_s: float
    budget_w: float
    draw_w: NDArray[np.float64]  # controlled draw per bin, all covered devices
    uncapped_w: NDArray[np.float64]  # the same busy time at uncapped draw
    modes: list[str]
    capped_share_by_priority: dict[str, float]  # device-time under a cap, by tier
    decisions: int

    def breaches_s(self) -> list[float]:
        """Durations of the stretches during which the draw was above the budget."""
        over = self.draw_w > self.budget_w * (1 + 1e-9)
        runs: list[float] = []
        length = 0
        for flag in over:
            if flag:
                length += 1
            elif length:
                runs.append(length * self.bin_s)
                length = 0
        if length:
            runs.append(length * self.bin_s)
        return runs

    def longest_breach_s(self) -> float:
        return max(self.breaches_s(), default=0.0)

    def summary(self) -> dict[str, float | int | dict[str, float]]:
        return {
            "budget_w": round(self.budget_w, 1),
            "peak_draw_w": round(float(self.draw_w.max(initial=0.0)), 1),
            "mean_draw_w": round(float(self.draw_w.mean()) if len(self.draw_w) else 0.0, 1),
            "peak_uncapped_w": round(float(self.uncapped_w.max(initial=0.0)), 1),
            "longest_breach_s": round(self.longest_breach_s(), 3),
            "breach_time_s": round(sum(self.breaches_s()), 3),
            "capping_rounds": sum(1 for m in self.modes if m in (Mode.CAPPING, Mode.EMERGENCY)),
            "emergency_rounds": sum(1 for m in self.modes if m == Mode.EMERGENCY),
            "decisions": self.decisions,
            "capped_share_by_priority": {
                k: round(v, 4) for k, v in sorted(self.capped_share_by_priority.items())
            },
        }


class SimulatedPowerController:
    """The PowerBudget control loop over every replica of a simulation (all are covered)."""

    def __init__(
        self,
        simulation: Simulation,
        spec: PowerBudgetSpec,
        priorities: Mapping[str, str],
        model_for: Callable[[str, AcceleratorClassSpec], ClassPowerModel] = class_power_model,
    ) -> None:
        self.sim = simulation
        self.spec = spec
        self.interval_s = spec.control_interval_seconds
        self.bin_s = self.interval_s / METER_BINS_PER_INTERVAL
        self.replicas: list[_Replica] = []
        self.modes: list[str] = []
        self._costs: dict[tuple[int, Actuation], StepCost] = {}
        models: dict[str, ClassPowerModel] = {}
        for deployment in simulation.deployments:
            for pool in deployment.pools:
                name = pool.plan.accelerator_class
                if name not in models:
                    models[name] = model_for(name, simulation.cluster.classes[name])
                for instance in pool.instances:
                    meter = InstanceMeter(self.bin_s, instance.power)
                    instance.power = meter
                    self.replicas.append(
                        _Replica(
                            instance,
                            deployment.name,
                            ROLE_NAMES.get(pool.plan.role, "colocated"),
                            priorities.get(deployment.name, "normal"),
                            pool.plan.tensor_parallel,
                            models[name],
                            instance.cost,
                            meter,
                        )
                    )
        self.ticks = 0
        simulation.push_event(self.interval_s, self, 0)

    # ---- the event ----------------------------------------------------------------------
    def step_end(self, now: float, version: int) -> None:
        """A control round: measure the last interval, decide, slow or release replicas."""
        self.ticks += 1
        first = round((now - self.interval_s) / self.bin_s)
        last = round(now / self.bin_s)
        views = []
        for index, replica in enumerate(self.replicas):
            compute_s, memory_s = replica.meter.busy(first, last)
            compute_s, memory_s = self._in_progress(replica, now, compute_s, memory_s)
            busy = min(1.0, (compute_s + memory_s) / self.interval_s)
            share = compute_s / (compute_s + memory_s) if compute_s + memory_s > 0 else 0.0
            per_device_w = replica.model.draw_w(busy, share, replica.per_device)
            views.append(
                DeviceView(
                    uuid=str(index),
                    node=replica.deployment,
                    power_w=per_device_w * replica.devices,
                    fresh=True,
                    role=replica.role,
                    priority=replica.priority,
                    in_force=replica.actuation,
                    compute_share=share,
                    model=_times(replica.model, replica.devices),
                )
            )
            replica.history.append(replica.per_device)
        decision = decide(self.spec, views)
        self.modes.append(decision.mode.value)
        for index, replica in enumerate(self.replicas):
            wanted = decision.actuations.get(str(index), FREE)
            if wanted != replica.actuation:
                replica.actuation = wanted
                replica.instance.cost = self._cost(replica, replica.per_device)
        if self.sim.heap or now < float(self.sim.arrival_s[-1]):
            self.sim.push_event(now + self.interval_s, self, 0)

    @staticmethod
    def _in_progress(
        replica: _Replica, now: float, compute_s: float, memory_s: float
    ) -> tuple[float, float]:
        """Add the part of the iteration in progress that falls in the last interval (booked
        only when it ends)."""
        instance = replica.instance
        if instance.state == IDLE_STATE or instance.started_s >= now:
            return compute_s, memory_s
        overlap = now - max(instance.started_s, now - replica.meter.bin_s * METER_BINS_PER_INTERVAL)
        if overlap <= 0:
            return compute_s, memory_s
        if instance.busy_compute_s > 0:
            return compute_s + overlap, memory_s
        return compute_s, memory_s + overlap

    def _cost(self, replica: _Replica, actuation: Actuation) -> StepCost:
        if actuation.is_free:
            return replica.base_cost
        key = (id(replica.base_cost), actuation)
        cost = self._costs.get(key)
        if cost is None:
            cost = StepCost.under(replica.base_cost, replica.model, actuation)
            self._costs[key] = cost
        return cost

    # ---- results ------------------------------------------------------------------------
    def outcome(self, makespan_s: float) -> PowerOutcome:
        bins = max(1, math.ceil(makespan_s / self.bin_s))
        draw = np.zeros(bins)
        uncapped = np.zeros(bins)
        device_s: dict[str, float] = {}
        capped_s: dict[str, float] = {}
        per_tick = METER_BINS_PER_INTERVAL
        for replica in self.replicas:
            model = replica.model
            compute = np.zeros(bins)
            memory = np.zeros(bins)
            n = min(bins, len(replica.meter.compute))
            compute[:n] = replica.meter.compute[:n]
            memory[:n] = replica.meter.memory[:n]
            compute /= self.bin_s
            memory /= self.bin_s
            levels = np.empty((bins, 2))
            for b in range(bins):
                tick = b // per_tick
                actuation = (
                    replica.history[tick] if tick < len(replica.history) else replica.per_device
                )
                levels[b] = (model.busy_draw_w(1.0, actuation), model.busy_draw_w(0.0, actuation))
            idle = model.idle_w
            draw += replica.devices * (
                idle + compute * (levels[:, 0] - idle) + memory * (levels[:, 1] - idle)
            )
            uncapped += replica.devices * (
                idle
                + compute * (model.busy_draw_w(1.0) - idle)
                + memory * (model.busy_draw_w(0.0) - idle)
            )
            ticks = len(replica.history)
            device_s[replica.priority] = (
                device_s.get(replica.priority, 0.0) + ticks * replica.devices
            )
            capped_s[replica.priority] = capped_s.get(
                replica.priority, 0.0
            ) + replica.devices * sum(1 for a in replica.history if not a.is_free)
        return PowerOutcome(
            bin_s=self.bin_s,
            interval_s=self.interval_s,
            budget_w=self.spec.budget_w,
            draw_w=draw,
            uncapped_w=uncapped,
            modes=list(self.modes),
            capped_share_by_priority={
                k: capped_s[k] / device_s[k] if device_s[k] else 0.0 for k in device_s
            },
            decisions=self.ticks,
        )


def _times(model: ClassPowerModel, devices: int) -> ClassPowerModel:
    """A replica of `devices` identical devices, as one device of `devices` times the draw."""
    if devices == 1:
        return model
    return model.scaled(
        f"{model.name} x{devices}",
        model.tdp_w * devices,
        model.idle_w * devices,
        model.power_limit_min_w * devices,
        model.sm_clock_max_mhz,
    )


def _per_device(actuation: Actuation, devices: int) -> Actuation:
    """A replica-level decision as what each of its devices gets (limits split evenly)."""
    if devices == 1 or actuation.power_limit_w is None:
        return actuation
    return Actuation(round(actuation.power_limit_w / devices, 1), actuation.sm_clock_max_mhz)
