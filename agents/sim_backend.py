"""A simulated accelerator that honours power limits and clock locks the way a measured H100 does.

Used by CI (the agent, collector and Prometheus tests run on it) and by the cluster simulator.
It is deterministic: every reading is a function of the calls made and of the injected clock.

Model. Each workload (prefill-like compute-bound, decode-like memory-bound) has a measured curve
of operating points (SM clock -> slowdown, power drawn), from agents/calibration/h100_power.json:
the uncapped point, the point under the minimum power limit and the point with the SM clock
locked low. A power limit picks the highest clock at which the curve's power fits under it (the
curve's lowest point is a floor: a memory-bound kernel at the minimum limit still draws more than
the limit, as the real GPU did); a clock lock caps that clock; power is then interpolated
linearly between the measured points and speed (1 / slowdown) linearly in the clock, because
compute-bound time goes as 1 / clock: the H100's prefill GEMM ran 1.36x slower at 990 MHz and
3.76x at 352 MHz, and 1337 MHz (its clock uncapped) / 990 = 1.35, / 352 = 3.80 (interpolating
the slowdown itself overstated it by up to 25% in between: 2.09x against 1.69x at 797 MHz). A
lock's lower bound is not modelled: the power limit wins on real GPUs too. A device busy a
fraction `b` of the time draws idle + b * (busy power - idle). Energy is the integral of that
power over the clock.
Fields the calibration does not cover (temperature, memory utilisation) are not reported.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tessera.agents.backend import (
    ClockLock,
    DeviceBackend,
    DeviceInfo,
    DeviceKind,
    DeviceReading,
    check_clock_lock,
    check_power_limit,
)

IDLE = "idle"


class CalibrationError(ValueError):
    """The calibration file is malformed; the message names the field."""


@dataclass(frozen=True)
class OperatingPoint:
    sm_clock_mhz: float
    slowdown: float
    power_w: float


@dataclass(frozen=True)
class WorkloadCurve:
    """Measured operating points of one workload, highest clock (the uncapped point) first."""

    name: str
    points: tuple[OperatingPoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise CalibrationError(f"workload {self.name}: no operating points")
        for high, low in zip(self.points, self.points[1:], strict=False):
            if not (low.sm_clock_mhz < high.sm_clock_mhz and low.power_w <= high.power_w):
                raise CalibrationError(
                    f"workload {self.name}: points must fall in clock and power from the "
                    f"uncapped one; got {high} then {low}"
                )

    @property
    def uncapped(self) -> OperatingPoint:
        return self.points[0]

    def clock_for_power_limit(self, power_limit_w: float) -> float:
        """The highest SM clock whose power fits under the limit (the lowest point is a floor)."""
        if power_limit_w >= self.points[0].power_w:
            return self.points[0].sm_clock_mhz
        for high, low in zip(self.points, self.points[1:], strict=False):
            if low.power_w <= power_limit_w <= high.power_w:
                share = (power_limit_w - low.power_w) / (high.power_w - low.power_w)
                return low.sm_clock_mhz + share * (high.sm_clock_mhz - low.sm_clock_mhz)
        return self.points[-1].sm_clock_mhz

    def at_clock(self, sm_clock_mhz: float) -> OperatingPoint:
        """Slowdown and power at an SM clock, interpolated; clamped to the measured range."""
        if sm_clock_mhz >= self.points[0].sm_clock_mhz:
            return self.points[0]
        for high, low in zip(self.points, self.points[1:], strict=False):
            if low.sm_clock_mhz <= sm_clock_mhz <= high.sm_clock_mhz:
                share = (sm_clock_mhz - low.sm_clock_mhz) / (high.sm_clock_mhz - low.sm_clock_mhz)
                speed = 1.0 / low.slowdown + share * (1.0 / high.slowdown - 1.0 / low.slowdown)
                return OperatingPoint(
                    sm_clock_mhz=sm_clock_mhz,
                    slowdown=1.0 / speed,
                    power_w=low.power_w + share * (high.power_w - low.power_w),
                )
        return self.points[-1]


@dataclass(frozen=True)
class SimCalibration:
    model: str
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    idle_power_w: float
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    idle_sm_clock_mhz: int
    memory_clock_mhz: int
    memory_total_bytes: int
    idle_memory_used_bytes: int
    workloads: Mapping[str, WorkloadCurve]

    @classmethod
    def load(cls, path: Path | None = None) -> SimCalibration:
        """Read a calibration file; the H100 one shipped with the package by default."""
        if path is None:
            text = (
                resources.files("tessera.agents") / "calibration" / "h100_power.json"
            ).read_text()
            where = "tessera.agents/calibration/h100_power.json"
        else:
            text, where = path.read_text(), str(path)
        try:
            data: dict[str, Any] = json.loads(text)
            device = data["device"]
            workloads = {name: _curve(name, entry) for name, entry in data["workloads"].items()}
            return cls(
                model=str(device["model"]),
                power_limit_min_w=float(device["power_limit_min_w"]),
                power_limit_max_w=float(device["power_limit_max_w"]),
                power_limit_default_w=float(device["power_limit_default_w"]),
                idle_power_w=float(device["idle_power_w"]),
                sm_clock_min_mhz=int(device["sm_clock_min_mhz"]),
                sm_clock_max_mhz=int(device["sm_clock_max_mhz"]),
                idle_sm_clock_mhz=int(device["idle_sm_clock_mhz"]),
                memory_clock_mhz=int(device["memory_clock_mhz"]),
                memory_total_bytes=int(device["memory_total_bytes"]),
                idle_memory_used_bytes=int(device["idle_memory_used_bytes"]),
                workloads=workloads,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(f"{where}: {error!r}") from error


def _curve(name: str, entry: Mapping[str, Any]) -> WorkloadCurve:
    uncapped = entry["uncapped"]
    points = [OperatingPoint(float(uncapped["sm_clock_mhz"]), 1.0, float(uncapped["power_w"]))]
    for point in [*entry.get("power_limit_points", []), *entry.get("sm_clock_points", [])]:
        points.append(
            OperatingPoint(
                float(point["sm_clock_mhz"]), float(point["slowdown"]), float(point["power_w"])
            )
        )
    points.sort(key=lambda p: -p.sm_clock_mhz)
    return WorkloadCurve(name, tuple(points))


@dataclass(frozen=True)
class SimOperatingPoint:
    """Where a simulated device runs now: what a simulator needs to scale step times."""

    workload: str
    busy_ratio: float
    sm_clock_mhz: float
    slowdown: float
    power_w: float
    power_capped: bool


@dataclass
class _DeviceState:
    power_limit_w: float
    workload: str
    busy_ratio: float
    memory_used_bytes: int
    lock: tuple[int, int] | None = None
    energy_j: float = 0.0
    last_s: float = 0.0


class SimBackend(DeviceBackend):
    """`device_count` simulated H100s. Device i runs `workloads[i]` (default: decode on even
    indices, prefill on odd ones, fully busy) until `set_workload` changes it."""

    name = "sim"

    def __init__(
        self,
        device_count: int = 2,
        node_name: str = "sim",
        calibration: SimCalibration | None = None,
        clock: Callable[[], float] = time.time,
        workloads: Sequence[tuple[str, float]] | None = None,
    ) -> None:
        self.calibration = calibration or SimCalibration.load()
        self._clock = clock
        self._lock = threading.RLock()
        cal = self.calibration
        self._infos = tuple(
            DeviceInfo(
                uuid=f"SIM-{node_name}-{index}",
                index=index,
                kind=DeviceKind.GPU,
                vendor="nvidia",
                model=f"{cal.model} (simulated)",
                backend=self.name,
                power_limit_min_w=cal.power_limit_min_w,
                power_limit_max_w=cal.power_limit_max_w,
                power_limit_default_w=cal.power_limit_default_w,
                sm_clock_min_mhz=cal.sm_clock_min_mhz,
                sm_clock_max_mhz=cal.sm_clock_max_mhz,
                memory_total_bytes=cal.memory_total_bytes,
                power_limit_settable=True,
                clocks_lockable=True,
            )
            for index in range(device_count)
        )
        defaults = ("decode", "prefill")
        now = clock()
        self._state: dict[str, _DeviceState] = {}
        for info in self._infos:
            workload, busy = workloads[info.index] if workloads else (defaults[info.index % 2], 1.0)
            self._check_workload(workload, busy)
            self._state[info.uuid] = _DeviceState(
                power_limit_w=cal.power_limit_default_w,
                workload=workload,
                busy_ratio=busy,
                memory_used_bytes=cal.idle_memory_used_bytes,
                last_s=now,
            )

    def _check_workload(self, workload: str, busy_ratio: float) -> None:
        if workload != IDLE and workload not in self.calibration.workloads:
            known = ", ".join([IDLE, *self.calibration.workloads])
            raise ValueError(f"unknown simulated workload {workload!r}; known: {known}")
        if not 0.0 <= busy_ratio <= 1.0:
            raise ValueError(f"busy_ratio must be in [0, 1], got {busy_ratio}")

    def devices(self) -> Sequence[DeviceInfo]:
        return self._infos

    def _point(self, state: _DeviceState) -> SimOperatingPoint:
        cal = self.calibration
        if state.workload == IDLE or state.busy_ratio == 0.0:
            return SimOperatingPoint(
                IDLE, 0.0, cal.idle_sm_clock_mhz, 1.0, cal.idle_power_w, power_capped=False
            )
        curve = cal.workloads[state.workload]
        capped_clock = curve.clock_for_power_limit(state.power_limit_w)
        clock = capped_clock
        if state.lock is not None:
            clock = min(clock, float(state.lock[1]))
        point = curve.at_clock(clock)
        power_w = cal.idle_power_w + state.busy_ratio * (point.power_w - cal.idle_power_w)
        return SimOperatingPoint(
            workload=state.workload,
            busy_ratio=state.busy_ratio,
            sm_clock_mhz=point.sm_clock_mhz,
            slowdown=point.slowdown,
            power_w=power_w,
            power_capped=capped_clock < curve.uncapped.sm_clock_mhz and capped_clock <= clock,
        )

    def _advance(self, state: _DeviceState) -> float:
        """Integrate energy up to now at the power in force since the last change."""
        now = self._clock()
        state.energy_j += self._point(state).power_w * max(0.0, now - state.last_s)
        state.last_s = now
        return now

    def operating_point(self, uuid: str) -> SimOperatingPoint:
        self.info(uuid)
        with self._lock:
            return self._point(self._state[uuid])

    def set_workload(
        self,
        uuid: str,
        workload: str,
        busy_ratio: float = 1.0,
        memory_used_bytes: int | None = None,
    ) -> None:
        """Change what a simulated device runs (the simulator drives this)."""
        self.info(uuid)
        self._check_workload(workload, busy_ratio)
        with self._lock:
            state = self._state[uuid]
            self._advance(state)
            state.workload, state.busy_ratio = workload, busy_ratio
            if memory_used_bytes is not None:
                state.memory_used_bytes = memory_used_bytes

    def read(self, uuid: str) -> DeviceReading:
        info = self.info(uuid)
        with self._lock:
            state = self._state[uuid]
            now = self._advance(state)
            point = self._point(state)
            return DeviceReading(
                uuid=uuid,
                index=info.index,
                timestamp_s=now,
                power_w=point.power_w,
                energy_j=state.energy_j,
                power_limit_w=state.power_limit_w,
                sm_clock_mhz=round(point.sm_clock_mhz),
                memory_clock_mhz=self.calibration.memory_clock_mhz,
                utilization_ratio=point.busy_ratio,
                memory_used_bytes=state.memory_used_bytes,
                memory_total_bytes=self.calibration.memory_total_bytes,
                throttle_reasons=("sw_power_cap",) if point.power_capped else (),
                locked_sm_clock_min_mhz=state.lock[0] if state.lock else None,
                locked_sm_clock_max_mhz=state.lock[1] if state.lock else None,
            )

    def set_power_limit(self, uuid: str, power_limit_w: float) -> float:
        check_power_limit(self.info(uuid), power_limit_w)
        with self._lock:
            state = self._state[uuid]
            self._advance(state)
            state.power_limit_w = float(power_limit_w)
            return state.power_limit_w

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> ClockLock:
        check_clock_lock(self.info(uuid), min_mhz, max_mhz)
        with self._lock:
            state = self._state[uuid]
            self._advance(state)
            state.lock = (min_mhz, max_mhz)
            clock = round(self._point(state).sm_clock_mhz)
        return ClockLock(True, min_mhz, max_mhz, clock)

    def reset_sm_clocks(self, uuid: str) -> ClockLock:
        self.info(uuid)
        with self._lock:
            state = self._state[uuid]
            self._advance(state)
            state.lock = None
            clock = round(self._point(state).sm_clock_mhz)
        return ClockLock(False, None, None, clock)
