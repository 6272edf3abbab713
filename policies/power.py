"""The PowerBudget decision (POLCA-style oversubscription): which devices to slow, and how.

Pure: the operator's controller (`operator/power_controller.py`) and the simulator
(`sim/power.py`) hand in plain `DeviceView`s and get back a `PowerDecision`; neither Kubernetes,
gRPC nor a clock is seen here. The rules, as fractions of `budgetW`:

- above `emergencyAbove`: every device to its floor with a power limit (a limit is a hard bound;
  a clock lock is not);
- above `capAbove`: shed down to the middle of the hysteresis band, slowing devices one rung of
  their ladder at a time in `priorityOrder` (lowest tier first), decode before colocated before
  prefill within a tier (a 200 W limit slowed decode 1.25x but prefill 3.76x on the H100). The
  cut is taken in slowdown bands (`SLOWDOWN_BANDS`): every group (one tier, one role), in that
  order, down to its last rung within 1.1x, then within 1.25x, and so on to its floor (decode
  groups, whose floor costs 1.25x at most, down their whole ladder in their first turn); so in
  every band the lowest tier is slowed first, but a low tier's prefill is not taken to 1.7x
  while a higher tier's decode would give the same watts at 1.1x. Within a group each rung
  goes to the device whose next rung costs the least slowdown per watt saved, so a cut is
  spread where spreading slows the group less;
- below `uncapBelow`: lift caps in the reverse order, the most slowed device of a group first,
  one rung at a time, only while the predicted
  draw stays at or below the middle of the band, so a lifted cap cannot push the group back over
  `capAbove` under the same load (no oscillation: tests/test_power_policy.py has the property);
- in between: hold whatever is in force.

A device's ladder holds the Pareto-best actuations (power limits and SM clock locks, as
`actions` allows) by predicted draw and slowdown from the class power model, so the policy locks
clocks where a lock costs less speed per watt saved than a limit (prefill: 1.36x at 990 MHz
against 3.76x at 200 W), and never goes below `minPowerFraction` of TDP.

Missing or stale telemetry: such a device is taken to draw what its limit allows (TDP when
uncapped), is capped to its fair share of the budget when that is lower than what is in force,
and is never released until it reports again.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tessera.api.power_budget import PowerBudgetSpec
from tessera.policies.power_model import (
    FREE,
    ROLE_COMPUTE_SHARE,
    Actuation,
    ClassPowerModel,
    model_for_device,
)

ROLE_ORDER = {"idle": 0, "decode": 1, "colocated": 2, "prefill": 3}
"""Who is slowed first within a priority tier: the cheapest watts first."""

LIMIT_TOLERANCE_W = 0.5
"""A reported power limit within this of the device's maximum counts as no limit."""

SLOWDOWN_BANDS = (1.1, 1.25, 1.5, math.inf)
"""A cut is shed in passes: every tier, lowest first, its decode devices down their whole
ladder (at most 1.25x at the floor on the H100) and its other devices down to rungs that slow
them by at most 1.1x, then 1.25x, ... So a low tier's prefill is not taken to 1.7x while a
higher tier's decode could give the same watts at 1.1x (on the H100 decode saves 120 W per
device at 1.1x, prefill 96 W), and decode still goes before prefill within a tier."""

LADDER_STEP_FRACTION = 0.05
"""Rungs of the power-limit and clock ladders, as fractions of TDP and of the top clock: fine
enough that a rung rarely sheds much more than asked."""


class Mode(enum.StrEnum):
    NORMAL = "Normal"  # below uncapBelow, nothing capped
    RELEASING = "Releasing"
    HOLDING = "Holding"  # inside the hysteresis band
    CAPPING = "Capping"
    EMERGENCY = "Emergency"


@dataclass(frozen=True)
class DeviceView:
    """One device the budget covers, as the controller sees it now.

    `power_w` None (or `fresh` False) means the controller cannot trust a reading of it.
    `in_force` is what is imposed on it now (from its agent, or the controller's own record).
    """

    uuid: str
    node: str
    power_w: float | None
    fresh: bool
    role: str = "idle"
    priority: str = "normal"
    in_force: Actuation = FREE
    tdp_w: float | None = None
    power_limit_min_w: float | None = None
    compute_share: float | None = None  # None: from the role
    model: ClassPowerModel | None = None  # None: the H100 model carried to tdp_w

    @property
    def power_model(self) -> ClassPowerModel:
        return self.model or model_for_device(self.tdp_w, self.power_limit_min_w, self.uuid)

    @property
    def share(self) -> float:
        if self.compute_share is not None:
            return self.compute_share
        return ROLE_COMPUTE_SHARE.get(self.role, 0.5)

    @property
    def trusted(self) -> bool:
        return self.fresh and self.power_w is not None


@dataclass(frozen=True)
class PowerDecision:
    """What every covered device should have in force, and why."""

    actuations: Mapping[str, Actuation]
    mode: Mode
    draw_w: float  # measured, with untrusted devices at their limits
    predicted_draw_w: float  # the same load under `actuations`
    budget_w: float
    untrusted: tuple[str, ...]
    reason: str

    @property
    def headroom_w(self) -> float:
        return self.budget_w - self.draw_w

    @property
    def capped(self) -> dict[str, Actuation]:
        return {uuid: a for uuid, a in self.actuations.items() if not a.is_free}

    def changes(self, in_force: Mapping[str, Actuation]) -> dict[str, Actuation]:
        """The devices whose actuation differs from what is in force."""
        return {u: a for u, a in self.actuations.items() if in_force.get(u, FREE) != a}


def floor_w(device: DeviceView, spec: PowerBudgetSpec) -> float:
    """The lowest power limit the budget lets the controller set on this device."""
    model = device.power_model
    return max(model.power_limit_min_w, spec.min_power_fraction * model.tdp_w)


def ladder(device: DeviceView, spec: PowerBudgetSpec) -> list[Actuation]:
    """FREE, then ever lower predicted busy draw at the least slowdown for it (Pareto front)."""
    model = device.power_model
    share = device.share
    lowest = floor_w(device, spec)
    candidates: list[Actuation] = [FREE]
    if "lower-power-limit" in spec.actions:
        limit = model.tdp_w * (1.0 - LADDER_STEP_FRACTION)
        while limit > lowest:
            candidates.append(Actuation(power_limit_w=round(limit, 1)))
            limit -= model.tdp_w * LADDER_STEP_FRACTION
        candidates.append(Actuation(power_limit_w=round(lowest, 1)))
    if "lock-clocks" in spec.actions:
        # A lock is not a bound: only locks whose busy draw stays above the floor of limits.
        step = model.sm_clock_max_mhz * LADDER_STEP_FRACTION
        clock = model.sm_clock_max_mhz - step
        while clock >= model.sm_clock_min_mhz:
            lock = Actuation(sm_clock_max_mhz=round(clock))
            if model.busy_draw_w(share, lock) < lowest:
                break
            candidates.append(lock)
            clock -= step
    scored = [
        (model.busy_draw_w(share, a), model.slowdown(share, a), i, a)
        for i, a in enumerate(candidates)
    ]
    front: list[tuple[float, float, int, Actuation]] = []
    for draw, slow, i, a in scored:
        dominated = any(
            (d2 <= draw and s2 <= slow) and (d2 < draw or s2 < slow or i2 < i)
            for d2, s2, i2, _ in scored
            if i2 != i
        )
        if not dominated or a.is_free:
            front.append((draw, slow, i, a))
    front.sort(key=lambda t: (-t[0], t[1]))
    return [a for *_, a in front]


def _rung(device: DeviceView, rungs: list[Actuation], current: Actuation) -> int:
    """Where `current` (what is in force, or what an earlier pass of this decision chose) sits
    on the ladder (the nearest rung by busy draw)."""
    if current in rungs:
        return rungs.index(current)
    model, share = device.power_model, device.share
    target = model.busy_draw_w(share, current)
    draws = [model.busy_draw_w(share, a) for a in rungs]
    return min(range(len(rungs)), key=lambda i: (abs(draws[i] - target), i))


def _order_key(device: DeviceView, spec: PowerBudgetSpec) -> tuple[int, int, str, str]:
    tiers: Sequence[str] = spec.priority_order
    tier = tiers.index(device.priority) if device.priority in tiers else len(tiers)
    return (tier, ROLE_ORDER.get(device.role, 2), device.node, device.uuid)


def _estimate_w(device: DeviceView, actuation: Actuation) -> float:
    """The draw a device is booked at: measured for trusted ones, predicted under `actuation`;
    for untrusted ones what their limit (or lock, busy) allows."""
    model = device.power_model
    if device.trusted:
        assert device.power_w is not None
        if actuation == device.in_force:
            return device.power_w
        return model.predict_draw_w(device.power_w, device.share, device.in_force, actuation)
    if actuation.power_limit_w is not None:
        return min(actuation.power_limit_w, model.tdp_w)
    if actuation.sm_clock_max_mhz is not None:
        return model.busy_draw_w(1.0, actuation)  # the most a lock lets through (compute-bound)
    return model.tdp_w


def decide(spec: PowerBudgetSpec, devices: Sequence[DeviceView]) -> PowerDecision:
    """The actuation every device should have, given the readings and what is in force."""
    budget_w = spec.budget_w
    thresholds = spec.thresholds
    target_w = budget_w * (thresholds.cap_above + thresholds.uncap_below) / 2.0
    actuation: dict[str, Actuation] = {d.uuid: d.in_force for d in devices}
    untrusted = tuple(sorted(d.uuid for d in devices if not d.trusted))

    # Untrusted devices: at most their fair share of the budget, never released.
    total_tdp = sum(d.power_model.tdp_w for d in devices) or 1.0
    for d in devices:
        if d.trusted:
            continue
        model = d.power_model
        share_w = max(floor_w(d, spec), budget_w * model.tdp_w / total_tdp)
        limit = d.in_force.power_limit_w
        if share_w < model.tdp_w and (limit is None or limit > share_w):
            actuation[d.uuid] = Actuation(round(share_w, 1), d.in_force.sm_clock_max_mhz)

    draw_w = sum(_estimate_w(d, d.in_force) for d in devices)
    fraction = draw_w / budget_w
    by_uuid = {d.uuid: d for d in devices}
    trusted = sorted((d for d in devices if d.trusted), key=lambda d: _order_key(d, spec))

    def predicted() -> float:
        return sum(_estimate_w(by_uuid[u], a) for u, a in actuation.items())

    if fraction > thresholds.emergency_above:
        mode = Mode.EMERGENCY
        for d in devices:
            actuation[d.uuid] = strongest(d, spec)
        reason = f"draw {draw_w:.0f} W is above emergencyAbove ({fraction:.2f} of budget)"
    elif fraction > thresholds.cap_above:
        mode = Mode.CAPPING
        now_w = predicted()
        slowed: set[str] = set()
        groups = _groups(trusted, spec)
        for band in SLOWDOWN_BANDS:
            for group in groups:
                if now_w <= target_w:
                    break
                limit = math.inf if group[0].role == "decode" else band
                now_w = _shed(group, spec, actuation, now_w, target_w, slowed, limit)
        reason = (
            f"draw {draw_w:.0f} W is above capAbove ({fraction:.2f} of budget): "
            f"slowed {len(slowed)} device(s) toward {target_w:.0f} W"
        )
    elif fraction < thresholds.uncap_below:
        now_w = predicted()
        lifted: set[str] = set()
        for group in reversed(_groups(trusted, spec)):
            now_w = _lift(group, spec, actuation, now_w, target_w, lifted)
        capped = sum(1 for a in actuation.values() if not a.is_free)
        mode = Mode.RELEASING if capped else Mode.NORMAL
        reason = (
            f"draw {draw_w:.0f} W is below uncapBelow ({fraction:.2f} of budget): "
            f"lifted {len(lifted)} device(s); {capped} still capped"
        )
    else:
        mode = Mode.HOLDING
        reason = f"draw {draw_w:.0f} W is inside the hysteresis band ({fraction:.2f} of budget)"
    if untrusted:
        reason += f"; {len(untrusted)} device(s) without fresh telemetry held at a safe share"
    return PowerDecision(
        actuations=actuation,
        mode=mode,
        draw_w=draw_w,
        predicted_draw_w=predicted(),
        budget_w=budget_w,
        untrusted=untrusted,
        reason=reason,
    )


def _groups(ordered: Sequence[DeviceView], spec: PowerBudgetSpec) -> list[list[DeviceView]]:
    """Devices of one tier and role together, in the order they are slowed."""
    groups: list[list[DeviceView]] = []
    for _, members in itertools.groupby(ordered, key=lambda d: _order_key(d, spec)[:2]):
        groups.append(list(members))
    return groups


def _shed(
    group: Sequence[DeviceView],
    spec: PowerBudgetSpec,
    actuation: dict[str, Actuation],
    now_w: float,
    target_w: float,
    slowed: set[str],
    max_slowdown: float = math.inf,
) -> float:
    """Step the group's devices down their ladders until the draw is at the target or every
    one is at its floor (or at the last rung within `max_slowdown`): each step on the device
    whose next rung costs the least slowdown per watt saved (slowdown grows faster than savings,
    so a cut spread over a group slows it less than one device at its floor)."""
    rungs = {d.uuid: ladder(d, spec) for d in group}
    at = {d.uuid: _rung(d, rungs[d.uuid], actuation[d.uuid]) for d in group}
    while now_w > target_w:
        best: tuple[float, DeviceView, float] | None = None
        for d in group:
            here = at[d.uuid]
            if here + 1 >= len(rungs[d.uuid]):
                continue
            now, then = rungs[d.uuid][here], rungs[d.uuid][here + 1]
            saved_w = _estimate_w(d, now) - _estimate_w(d, then)
            if saved_w <= 1e-9:
                continue
            model = d.power_model
            if model.slowdown(d.share, then) > max_slowdown:
                continue
            cost = (model.slowdown(d.share, then) - model.slowdown(d.share, now)) / saved_w
            if best is None or cost < best[0]:
                best = (cost, d, saved_w)
        if best is None:
            break
        _, d, saved_w = best
        at[d.uuid] += 1
        actuation[d.uuid] = rungs[d.uuid][at[d.uuid]]
        slowed.add(d.uuid)
        now_w -= saved_w
    return now_w


def _lift(
    group: Sequence[DeviceView],
    spec: PowerBudgetSpec,
    actuation: dict[str, Actuation],
    now_w: float,
    target_w: float,
    lifted: set[str],
) -> float:
    """Step the group's devices up their ladders, the most slowed first, while the predicted
    draw stays at or below the target."""
    rungs = {d.uuid: ladder(d, spec) for d in group}
    at = {d.uuid: _rung(d, rungs[d.uuid], actuation[d.uuid]) for d in group}
    blocked: set[str] = set()
    while True:
        candidates = [d for d in group if at[d.uuid] > 0 and d.uuid not in blocked]
        if not candidates:
            return now_w
        d = max(
            candidates,
            key=lambda v: (v.power_model.slowdown(v.share, rungs[v.uuid][at[v.uuid]]), v.uuid),
        )
        now, then = rungs[d.uuid][at[d.uuid]], rungs[d.uuid][at[d.uuid] - 1]
        trial_w = now_w + _estimate_w(d, then) - _estimate_w(d, now)
        if trial_w > target_w:
            blocked.add(d.uuid)
            continue
        at[d.uuid] -= 1
        actuation[d.uuid] = then
        lifted.add(d.uuid)
        now_w = trial_w


def strongest(device: DeviceView, spec: PowerBudgetSpec) -> Actuation:
    """The emergency actuation: a power limit at the floor (a hard bound), or, where the spec
    allows no limits, the lowest clock lock of the ladder."""
    if "lower-power-limit" in spec.actions:
        return Actuation(power_limit_w=round(floor_w(device, spec), 1))
    return ladder(device, spec)[-1]


def reported_actuation(
    power_limit_w: float | None,
    power_limit_max_w: float | None,
    locked_sm_clock_max_mhz: int | None,
) -> Actuation:
    """What an agent's telemetry says is in force on a device (a limit at the maximum is no
    limit): the operator's controller and bench/power_gpu_run.py read devices this way."""
    capped = power_limit_w is not None and (
        power_limit_max_w is None or power_limit_w < power_limit_max_w - LIMIT_TOLERANCE_W
    )
    return Actuation(power_limit_w if capped else None, locked_sm_clock_max_mhz)


def actuation_steps(before: Actuation, after: Actuation) -> list[tuple[str, float | None]]:
    """The Control RPCs (set-power-limit, reset-power-limit, lock-clocks, reset-clocks) and
    their values that take a device from `before` to `after`, the limit first."""
    steps: list[tuple[str, float | None]] = []
    if before.power_limit_w != after.power_limit_w:
        if after.power_limit_w is None:
            steps.append(("reset-power-limit", None))
        else:
            steps.append(("set-power-limit", after.power_limit_w))
    if before.sm_clock_max_mhz != after.sm_clock_max_mhz:
        if after.sm_clock_max_mhz is None:
            steps.append(("reset-clocks", None))
        else:
            steps.append(("lock-clocks", float(after.sm_clock_max_mhz)))
    return steps
