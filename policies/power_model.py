"""How an accelerator's draw and speed respond to a power limit or an SM clock lock, per phase.

The power policy (`policies/power.py`) predicts with it what a cap saves and costs; the
simulator (`sim/power.py`) slows iterations and books energy with it. It is fitted to the
measured H100 operating points the simulated agent also uses
(agents/calibration/h100_power.json, from bench/nvml_power_bench.py: 8 s loops, power from the
energy counter; ../shared/data/h100_power_probe.json agrees on the slowdowns):

- idle draw (73 W on the H100);
- per phase, the uncapped busy draw and the curve clock -> (slowdown, draw) through the point
  under the lowest power limit and the point with the SM clock locked at 990 MHz. Prefill
  (compute-bound GEMM) runs at 695 W and slows 3.76x at a 200 W limit but only 1.36x at
  990 MHz; decode (weight-read bound) runs at 536 W, slows 1.25x at 200 W and cannot go below
  293 W whatever the limit (the curve's floor), 1.21x at 990 MHz;
- draw versus batch: an iteration's phase is the roof that binds it (the performance model
  decides per iteration: decode turns compute-bound at large batches, a small prefill chunk is
  memory-bound), so a step's busy draw and slowdown mix the two curves by its compute-bound
  share of time, and a device busy a fraction b of the time draws idle + b x (busy - idle).

Another class is the H100 scaled: clocks by its top clock, draw above idle by its TDP above idle
(the simulator already applies H100 curves to other classes at the same fraction of TDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from tessera.agents.sim_backend import OperatingPoint, SimCalibration, WorkloadCurve
from tessera.api.accelerator_class import AcceleratorClassSpec

PREFILL = "prefill"
DECODE = "decode"

ROLE_COMPUTE_SHARE = {"prefill": 1.0, "decode": 0.0, "colocated": 0.5}
"""Compute-bound share of busy time assumed from a pool role when no finer mix is known: a
colocated (chunked-prefill) instance interleaves both phases."""


@dataclass(frozen=True)
class Actuation:
    """What is imposed on one device: a board power limit and/or a top SM clock (None: none)."""

    power_limit_w: float | None = None
    sm_clock_max_mhz: int | None = None

    @property
    def is_free(self) -> bool:
        return self.power_limit_w is None and self.sm_clock_max_mhz is None

    def describe(self) -> str:
        parts = []
        if self.power_limit_w is not None:
            parts.append(f"limit {self.power_limit_w:.0f} W")
        if self.sm_clock_max_mhz is not None:
            parts.append(f"SM clock <= {self.sm_clock_max_mhz} MHz")
        return ", ".join(parts) or "free"


FREE = Actuation()


@dataclass(frozen=True)
class ClassPowerModel:
    """One accelerator class: idle draw, limits, and a measured curve per phase."""

    name: str
    tdp_w: float
    idle_w: float
    power_limit_min_w: float
    sm_clock_max_mhz: int
    sm_clock_min_mhz: int
    phases: dict[str, WorkloadCurve] = field(hash=False)

    @classmethod
    def from_calibration(cls, calibration: SimCalibration) -> ClassPowerModel:
        return cls(
            name=calibration.model,
            tdp_w=calibration.power_limit_max_w,
            idle_w=calibration.idle_power_w,
            power_limit_min_w=calibration.power_limit_min_w,
            sm_clock_max_mhz=calibration.sm_clock_max_mhz,
            sm_clock_min_mhz=calibration.sm_clock_min_mhz,
            phases={PREFILL: calibration.workloads[PREFILL], DECODE: calibration.workloads[DECODE]},
        )

    def scaled(
        self,
        name: str,
        tdp_w: float,
        idle_w: float | None = None,
        power_limit_min_w: float | None = None,
        sm_clock_max_mhz: int | None = None,
    ) -> ClassPowerModel:
        """This model carried to another class at the same fractions of clock and of TDP."""
        idle = idle_w if idle_w is not None else self.idle_w / self.tdp_w * tdp_w
        top = sm_clock_max_mhz or self.sm_clock_max_mhz
        clock_scale = top / self.sm_clock_max_mhz
        power_scale = (tdp_w - idle) / (self.tdp_w - self.idle_w)

        def point(p: OperatingPoint) -> OperatingPoint:
            return OperatingPoint(
                p.sm_clock_mhz * clock_scale,
                p.slowdown,
                idle + (p.power_w - self.idle_w) * power_scale,
            )

        return ClassPowerModel(
            name=name,
            tdp_w=tdp_w,
            idle_w=idle,
            power_limit_min_w=(
                power_limit_min_w
                if power_limit_min_w is not None
                else self.power_limit_min_w / self.tdp_w * tdp_w
            ),
            sm_clock_max_mhz=top,
            sm_clock_min_mhz=max(1, round(self.sm_clock_min_mhz * clock_scale)),
            phases={
                n: WorkloadCurve(n, tuple(point(p) for p in c.points))
                for n, c in self.phases.items()
            },
        )

    def _clock(self, curve: WorkloadCurve, actuation: Actuation) -> float:
        clock = curve.uncapped.sm_clock_mhz
        if actuation.power_limit_w is not None:
            clock = curve.clock_for_power_limit(actuation.power_limit_w)
        if actuation.sm_clock_max_mhz is not None:
            clock = min(clock, float(actuation.sm_clock_max_mhz))
        return clock

    def _phase_point(self, phase: str, actuation: Actuation) -> OperatingPoint:
        curve = self.phases[phase]
        return curve.at_clock(self._clock(curve, actuation))

    def busy_draw_w(self, compute_share: float, actuation: Actuation = FREE) -> float:
        """Draw while busy, for a mix of compute-bound (share) and memory-bound time."""
        share = min(1.0, max(0.0, compute_share))
        prefill = self._phase_point(PREFILL, actuation).power_w
        decode = self._phase_point(DECODE, actuation).power_w
        return share * prefill + (1.0 - share) * decode

    def slowdown(self, compute_share: float, actuation: Actuation = FREE) -> float:
        """Time multiplier of busy work under the actuation, time-weighted over the mix."""
        share = min(1.0, max(0.0, compute_share))
        prefill = self._phase_point(PREFILL, actuation).slowdown
        decode = self._phase_point(DECODE, actuation).slowdown
        return share * prefill + (1.0 - share) * decode

    def phase_slowdown(self, compute_bound: bool, actuation: Actuation) -> float:
        return self._phase_point(PREFILL if compute_bound else DECODE, actuation).slowdown

    def draw_w(
        self, busy_fraction: float, compute_share: float, actuation: Actuation = FREE
    ) -> float:
        """Average draw of a device busy `busy_fraction` of the time."""
        busy = min(1.0, max(0.0, busy_fraction))
        return self.idle_w + busy * max(
            0.0, self.busy_draw_w(compute_share, actuation) - self.idle_w
        )

    def busy_fraction_from_draw(
        self, draw_w: float, compute_share: float, actuation: Actuation
    ) -> float:
        """The utilisation that explains a measured draw under the actuation in force."""
        span = self.busy_draw_w(compute_share, actuation) - self.idle_w
        if span <= 0:
            return 1.0
        return min(1.0, max(0.0, (draw_w - self.idle_w) / span))

    def predict_draw_w(
        self, draw_w: float, compute_share: float, now: Actuation, then: Actuation
    ) -> float:
        """A device drawing `draw_w` under `now`: what it would draw under `then`, same load."""
        busy = self.busy_fraction_from_draw(draw_w, compute_share, now)
        return self.draw_w(busy, compute_share, then)


@cache
def h100_model() -> ClassPowerModel:
    """The measured H100 (the shipped calibration)."""
    return ClassPowerModel.from_calibration(SimCalibration.load())


def model_for_device(
    tdp_w: float | None, power_limit_min_w: float | None = None, name: str = "device"
) -> ClassPowerModel:
    """The H100 model carried to a device known by its limits (what its agent reports)."""
    base = h100_model()
    same_limits = power_limit_min_w in (None, base.power_limit_min_w)
    if tdp_w is None or (tdp_w == base.tdp_w and same_limits):
        return base
    return base.scaled(name, tdp_w, power_limit_min_w=power_limit_min_w)


def class_power_model(name: str, spec: AcceleratorClassSpec) -> ClassPowerModel:
    """The measured H100 model carried to an AcceleratorClass (its TDP, idle and lowest cap):
    what the simulator slows capped iterations by, for `--power-cap` and the PowerBudget
    controller alike."""
    return h100_model().scaled(name, spec.tdp_w, spec.idle_power_w, spec.min_power_cap_w)
