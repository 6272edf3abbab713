"""Iteration costs for the simulator: the performance model in `policies/`, the slowdown under
a power limit or clock lock from the class power model (`policies/power_model.py`, the one the
PowerBudget policy and `sim/power.py` use), and closed-form sums over runs of decode-only
iterations.

Simulating every decode iteration as an event would cost one Python call per generated token
of every batch; an hour of a production trace on a large cluster is billions of those. Between
two changes of a batch (an arrival, a completion, a KV-cache block running out) every iteration
decodes the same requests, each one token further, so the batch's total context S grows by the
batch size each step. The cost of a decode-only iteration depends on the batch only through its
size and S (true of the roofline models in `policies/`, and checked when a curve is built), and
is a convex, piecewise-linear function of S (a max of rooflines plus constants). A
`DecodeCurve` finds that function's pieces once per batch size by bisection and then sums any
run of iterations, or finds the iteration in progress at a given time, in closed form.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

from tessera.policies.perfmodel import IterationCost, PrefillChunk
from tessera.policies.power_model import Actuation, ClassPowerModel, h100_model

LINEARITY_TOLERANCE = 1e-12
"""Relative deviation from the chord below which a piece of a curve counts as linear."""


class PerformanceModel(Protocol):
    """What the simulator needs of a replica model (ReplicaPerformance and the offloaded one)."""

    @property
    def kv_capacity_tokens(self) -> int: ...

    max_running_requests: int

    def iteration(
        self, prefill: Sequence[PrefillChunk] = (), decode_context_tokens: Sequence[int] = ()
    ) -> IterationCost: ...

    def power_w(self, busy_fraction: float, compute_bound: bool) -> float: ...


class DecodeCostShapeError(ValueError):
    """A performance model's decode cost depends on more than batch size and total context."""


def _contexts(batch: int, total: int) -> list[int]:
    """`batch` contexts that sum to `total`, as even as integers allow."""
    quotient, remainder = divmod(total, batch)
    return [quotient + 1] * remainder + [quotient] * (batch - remainder)


class DecodeCurve:
    """Time of one decode-only iteration of `batch` requests, as a function of total context.

    Nodes are integer totals; between consecutive nodes the time is linear and the binding
    roof does not change, except on pieces one token wide (which hold no integer inside).
    """

    __slots__ = ("batch", "bound", "nodes", "slopes", "values")

    def __init__(
        self,
        perf: PerformanceModel,
        batch: int,
        max_total: int,
        slowdown_compute: float = 1.0,
        slowdown_memory: float = 1.0,
    ) -> None:
        self.batch = batch
        probes: dict[int, tuple[float, bool]] = {}

        def probe(total: int) -> tuple[float, bool]:
            if total not in probes:
                cost = perf.iteration(decode_context_tokens=_contexts(batch, total))
                probes[total] = (cost.time_s, cost.compute_bound)
            return probes[total]

        upper = max(1, max_total)
        self._check_shape(perf, batch, upper)
        stack = [(0, upper)]
        probe(0)
        probe(upper)
        while stack:
            low, high = stack.pop()
            if high - low <= 1:
                continue
            (f_low, b_low), (f_high, b_high) = probe(low), probe(high)
            split = b_low != b_high
            if not split:
                scale = LINEARITY_TOLERANCE * max(abs(f_low), abs(f_high))
                for point in ((low + high) // 2, (3 * low + high) // 4, (low + 3 * high) // 4):
                    if low < point < high:
                        chord = f_low + (f_high - f_low) * (point - low) / (high - low)
                        if abs(probe(point)[0] - chord) > scale:
                            split = True
                            break
            if split:
                middle = (low + high) // 2
                probe(middle)
                stack.append((middle, high))
                stack.append((low, middle))
        # Keep only the nodes where the slope or the bound changes.
        ordered = sorted(probes)
        nodes = [ordered[0]]
        for i in range(1, len(ordered) - 1):
            previous, here, following = nodes[-1], ordered[i], ordered[i + 1]
            (f0, b0), (f1, b1), (f2, b2) = probes[previous], probes[here], probes[following]
            chord = f0 + (f2 - f0) * (here - previous) / (following - previous)
            scale = LINEARITY_TOLERANCE * max(abs(f0), abs(f2))
            if b0 != b1 or b1 != b2 or abs(f1 - chord) > scale:
                nodes.append(here)
        nodes.append(ordered[-1])
        self.nodes = nodes
        self.bound = [probes[n][1] for n in nodes]
        self.values = [
            probes[n][0] * (slowdown_compute if probes[n][1] else slowdown_memory) for n in nodes
        ]
        self.slopes = [
            (self.values[i + 1] - self.values[i]) / (nodes[i + 1] - nodes[i])
            for i in range(len(nodes) - 1)
        ]
        self.slopes.append(self.slopes[-1] if self.slopes else 0.0)

    @staticmethod
    def _check_shape(perf: PerformanceModel, batch: int, upper: int) -> None:
        if batch < 2:
            return
        total = upper // 2
        even = perf.iteration(decode_context_tokens=_contexts(batch, total)).time_s
        skewed = perf.iteration(decode_context_tokens=[total] + [0] * (batch - 1)).time_s
        if abs(even - skewed) > 1e-9 * max(even, skewed):
            raise DecodeCostShapeError(
                f"{type(perf).__name__}: a decode iteration's cost depends on how context is "
                f"spread over the batch, not only on its total ({even} s vs {skewed} s); "
                "run the simulator with fast_forward=False"
            )

    def time_at(self, total: int) -> float:
        """Time of one iteration at this total context."""
        i = max(0, bisect.bisect_right(self.nodes, total) - 1)
        return self.values[i] + self.slopes[i] * (total - self.nodes[i])

    def _pieces(
        self, start_total: int, steps: int
    ) -> Iterator[tuple[int, int, float, float, bool]]:
        """The linear pieces a run of `steps` iterations from `start_total` crosses, each as
        (iterations before it, its iterations, time of its first, increase per iteration,
        compute-bound)."""
        batch = self.batch
        nodes, values, slopes, bound = self.nodes, self.values, self.slopes, self.bound
        i = max(0, bisect.bisect_right(nodes, start_total) - 1)
        j = 0
        last = len(nodes) - 1
        while j < steps:
            end = steps if i >= last else min(steps, -((start_total - nodes[i + 1]) // batch))
            count = end - j
            if count > 0:
                first = values[i] + slopes[i] * (start_total + j * batch - nodes[i])
                yield j, count, first, slopes[i] * batch, bound[i]
                j = end
            i += 1

    def run(self, start_total: int, steps: int) -> tuple[float, float]:
        """(time, compute-bound time) of `steps` iterations from `start_total`, +batch each."""
        total_s = 0.0
        compute_s = 0.0
        for _, count, first, slope, compute_bound in self._pieces(start_total, steps):
            piece = count * first + slope * count * (count - 1) / 2
            total_s += piece
            if compute_bound:
                compute_s += piece
        return total_s, compute_s

    def steps_until(self, start_total: int, steps: int, elapsed_s: float) -> int:
        """Iterations that will have finished once the one in progress at `elapsed_s` ends.

        The smallest j in [1, steps] whose cumulative time exceeds `elapsed_s` (or `steps`).
        """
        done_s = 0.0
        for before, count, first, slope, _ in self._pieces(start_total, steps):
            piece = count * first + slope * count * (count - 1) / 2
            if done_s + piece > elapsed_s:
                low, high = 1, count  # smallest n with done + sum(n) > elapsed
                while low < high:
                    n = (low + high) // 2
                    if done_s + n * first + slope * n * (n - 1) / 2 > elapsed_s:
                        high = n
                    else:
                        low = n + 1
                return before + low
            done_s += piece
        return steps


class StepCost:
    """Iteration costs of one kind of replica, under an optional power cap.

    A cap (`cap_fraction` of the class's TDP, `tessera simulate --power-cap`) slows compute- and
    memory-bound iterations by the class power model's phase slowdowns under that power limit;
    `model` is the class's (`policies.power_model.class_power_model`), the measured H100 by
    default.
    """

    def __init__(
        self,
        perf: PerformanceModel,
        max_context_tokens: int,
        cap_fraction: float | None = None,
        model: ClassPowerModel | None = None,
    ) -> None:
        self.perf = perf
        self.max_context_tokens = max_context_tokens
        self.cap_fraction = cap_fraction
        self.slowdown_compute = self.slowdown_memory = 1.0
        if cap_fraction is not None and cap_fraction < 1.0:
            model = model or h100_model()
            limit = Actuation(power_limit_w=cap_fraction * model.tdp_w)
            self.slowdown_compute = model.phase_slowdown(True, limit)
            self.slowdown_memory = model.phase_slowdown(False, limit)
        self._curves: dict[int, DecodeCurve] = {}

    @classmethod
    def under(cls, base: StepCost, model: ClassPowerModel, actuation: Actuation) -> StepCost:
        """`base`'s costs with `actuation` (a power limit and/or clock lock) in force: the
        model's slowdown of compute-bound and of memory-bound iterations (the PowerBudget
        controller's caps in `sim/power.py`)."""
        cost = cls(base.perf, base.max_context_tokens)
        cost.slowdown_compute = model.phase_slowdown(True, actuation)
        cost.slowdown_memory = model.phase_slowdown(False, actuation)
        return cost

    def iteration(
        self, prefill: Sequence[PrefillChunk], decode_context_tokens: Sequence[int]
    ) -> tuple[float, bool]:
        """(time, compute bound) of one iteration, slowed by the cap."""
        cost = self.perf.iteration(prefill, decode_context_tokens)
        bound = cost.compute_bound
        return cost.time_s * (self.slowdown_compute if bound else self.slowdown_memory), bound

    def decode_curve(self, batch: int) -> DecodeCurve:
        curve = self._curves.get(batch)
        if curve is None:
            curve = DecodeCurve(
                self.perf,
                batch,
                batch * self.max_context_tokens,
                self.slowdown_compute,
                self.slowdown_memory,
            )
            self._curves[batch] = curve
        return curve

    def decode_tokens_per_s(self, batch: int = 32, context_tokens: int = 1024) -> float:
        """Decode throughput at a typical batch: the speed dispatch weighs load by."""
        time_s, _ = self.iteration((), [context_tokens] * batch)
        return batch / time_s if time_s > 0 else math.inf

    def prefill_tokens_per_s(self, tokens: int = 2048) -> float:
        time_s, _ = self.iteration([PrefillChunk(tokens)], ())
        return tokens / time_s if time_s > 0 else math.inf
