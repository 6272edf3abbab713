"""What a simulation measured: per-request latencies, SLO attainment, goodput, cost, energy and
a power timeline; `assemble_result` collects them from a finished `Simulation`.

Definitions (those of DistServe and Splitwise): TTFT is arrival to first token delivered (for
disaggregated serving, after the KV cache reached the decode instance that streams the answer);
TPOT is (end - first token) / (output tokens - 1); a request attains the SLO when both are within
target; goodput is the highest rate at which the attained fraction stays at or above the target.
A rejected request (prompt longer than the model's context) never attains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from tessera.api.model_deployment import SloSpec

if TYPE_CHECKING:
    from tessera.sim.simulation import Simulation


class PowerTrack:
    """Busy time of one pool's replicas in fixed time bins, split by the roof that bound it.

    Power is linear in utilisation in the performance model (idle + busy x (active - idle)), so
    binned busy seconds give the exact binned energy.
    """

    __slots__ = (
        "active_compute_w",
        "active_memory_w",
        "bin_s",
        "compute",
        "idle_w",
        "memory",
        "replicas",
    )

    def __init__(
        self,
        bin_s: float,
        replicas: int,
        idle_w: float,
        active_compute_w: float,
        active_memory_w: float,
    ) -> None:
        self.bin_s = bin_s
        self.replicas = replicas
        self.idle_w = idle_w
        self.active_compute_w = active_compute_w
        self.active_memory_w = active_memory_w
        self.compute: list[float] = []
        self.memory: list[float] = []

    def add_busy(self, start_s: float, end_s: float, compute_s: float) -> None:
        """[start, end) was busy; `compute_s` of it compute-bound, the rest memory-bound."""
        length = end_s - start_s
        if length <= 0:
            return
        compute_share = min(1.0, compute_s / length)
        bin_s = self.bin_s
        first = int(start_s / bin_s)
        last = int(end_s / bin_s)
        if last >= len(self.compute):
            grow = last + 1 - len(self.compute)
            self.compute.extend([0.0] * grow)
            self.memory.extend([0.0] * grow)
        if first == last:
            self.compute[first] += length * compute_share
            self.memory[first] += length * (1.0 - compute_share)
            return
        for index in range(first, last + 1):
            low = max(start_s, index * bin_s)
            high = min(end_s, (index + 1) * bin_s)
            if high > low:
                self.compute[index] += (high - low) * compute_share
                self.memory[index] += (high - low) * (1.0 - compute_share)

    def power_w(self, bins: int) -> NDArray[np.float64]:
        """Mean draw of the pool in each of the first `bins` bins, watts."""
        compute = np.zeros(bins)
        memory = np.zeros(bins)
        n = min(bins, len(self.compute))
        compute[:n] = self.compute[:n]
        memory[:n] = self.memory[:n]
        idle = self.replicas * self.idle_w
        extra = compute * (self.active_compute_w - self.idle_w)
        extra += memory * (self.active_memory_w - self.idle_w)
        return idle + extra / self.bin_s


@dataclass
class PoolReport:
    """One pool as simulated."""

    deployment: str
    name: str
    role: str
    accelerator_class: str
    tensor_parallel: int
    replicas: int
    devices: int
    cost_per_hour: float
    busy_fraction: float
    iterations: int
    peak_kv_fraction: float
    attention: str | None = None
    """For an attention-offloaded decode pool: its memory devices per replica ('2 a100')."""


@dataclass
class RunResult:
    """Everything one simulation run produced. Arrays are indexed by request id."""

    policy: str
    deployments: list[str]
    slos: list[SloSpec]
    deployment: NDArray[np.int64]
    arrival_s: NDArray[np.float64]
    prompt_tokens: NDArray[np.int64]
    output_tokens: NDArray[np.int64]
    first_token_s: NDArray[np.float64]
    finish_s: NDArray[np.float64]
    finish_count: NDArray[np.int64]
    preemptions: NDArray[np.int64]
    transfer_s: NDArray[np.float64]
    rejected: NDArray[np.bool_]
    pools: list[PoolReport]
    power_time_s: NDArray[np.float64]
    power_w: NDArray[np.float64]
    energy_j: float
    cost_per_hour: float
    makespan_s: float
    wall_s: float
    events: int
    iterations: int
    preemption_count: int
    transfers: int
    plans: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_s(self) -> NDArray[np.float64]:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> NDArray[np.float64]:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> NDArray[np.float64]:
        steps = np.maximum(self.output_tokens - 1, 1)
        tpot = (self.finish_s - self.first_token_s) / steps
        return np.where(self.output_tokens > 1, tpot, 0.0)

    @property
    def finished(self) -> NDArray[np.bool_]:
        return self.finish_count > 0

    def attained(self) -> NDArray[np.bool_]:
        """Per request: finished within both of its deployment's SLO targets."""
        ttft_limit = np.array([slo.ttft_ms / 1e3 for slo in self.slos])[self.deployment]
        tpot_limit = np.array([slo.tpot_ms / 1e3 for slo in self.slos])[self.deployment]
        ok = self.finished & ~self.rejected
        with np.errstate(invalid="ignore"):
            ok &= self.ttft_s <= ttft_limit * (1 + 1e-12)
            ok &= self.tpot_s <= tpot_limit * (1 + 1e-12)
        return ok

    def attainment(self, deployment: int | None = None) -> float:
        attained = self.attained()
        if deployment is not None:
            attained = attained[self.deployment == deployment]
        return float(attained.mean()) if len(attained) else 1.0

    def meets_targets(self) -> bool:
        """Every deployment's attainment is at or above its target."""
        return all(self.attainment(i) >= slo.attainment_target for i, slo in enumerate(self.slos))

    def summary(self) -> dict[str, Any]:
        """Headline numbers (JSON-ready): latency percentiles in ms, attainment, cost, energy."""
        done = self.finished & ~self.rejected
        out_tokens = int(self.output_tokens[done].sum())
        summary: dict[str, Any] = {
            "policy": self.policy,
            "requests": len(self.arrival_s),
            "finished": int(done.sum()),
            "rejected": int(self.rejected.sum()),
            "attainment": round(self.attainment(), 4),
            "meets_targets": self.meets_targets(),
            "accelerators": sum(p.devices for p in self.pools),
            "cost_per_hour": round(self.cost_per_hour, 4),
            "cost_per_million_output_tokens": (
                round(self.cost_per_hour * self.makespan_s / 3600 / out_tokens * 1e6, 4)
                if out_tokens
                else None
            ),
            "energy_j": round(self.energy_j, 1),
            "mean_power_w": round(self.energy_j / self.makespan_s, 1) if self.makespan_s else 0.0,
            "joules_per_output_token": round(self.energy_j / out_tokens, 4) if out_tokens else None,
            "makespan_s": round(self.makespan_s, 3),
            "preemptions": self.preemption_count,
            "kv_transfers": self.transfers,
            "events": self.events,
            "iterations": self.iterations,
            "wall_s": round(self.wall_s, 3),
        }
        for name, values in (
            ("ttft_ms", self.ttft_s),
            ("tpot_ms", self.tpot_s),
            ("e2e_ms", self.e2e_s),
        ):
            chosen = values[done] * 1e3
            for q in (50, 90, 99):
                summary[f"{name}_p{q}"] = (
                    round(float(np.percentile(chosen, q)), 3) if len(chosen) else None
                )
        summary["per_deployment"] = {
            name: {
                "attainment": round(self.attainment(i), 4),
                "target": self.slos[i].attainment_target,
                "ttft_ms_target": self.slos[i].ttft_ms,
                "tpot_ms_target": self.slos[i].tpot_ms,
            }
            for i, name in enumerate(self.deployments)
        }
        return summary


@dataclass
class SweepPoint:
    rate_scale: float
    rate_per_s: float
    attainment: float
    meets_targets: bool


@dataclass
class SweepResult:
    """The rate sweep of one policy: every point tried, and the goodput it found."""

    policy: str
    points: list[SweepPoint]
    goodput_scale: float
    """Highest rate scale that met the targets (0 if none did)."""
    goodput_rate_per_s: float


def goodput_sweep(
    policy: str,
    run_at: Callable[[float], RunResult],
    base_rate_per_s: float,
    start_scale: float = 1.0,
    bisections: int = 6,
    max_expansions: int = 8,
) -> SweepResult:
    """Goodput by rate sweep: bracket the highest passing scale by doubling/halving, then bisect.

    Attainment falls as the rate rises (more queueing, bigger batches), so the passing scales
    form an interval starting at zero and bisection finds its end; every probe is kept for the
    attainment-vs-rate plot.
    """
    points: list[SweepPoint] = []

    def probe(scale: float) -> bool:
        result = run_at(scale)
        point = SweepPoint(
            scale, base_rate_per_s * scale, result.attainment(), result.meets_targets()
        )
        points.append(point)
        return point.meets_targets

    low: float | None = None
    high: float | None = None
    if probe(start_scale):
        low = start_scale
        scale = start_scale
        for _ in range(max_expansions):
            scale *= 2
            if not probe(scale):
                high = scale
                break
            low = scale
    else:
        high = start_scale
        scale = start_scale
        for _ in range(max_expansions):
            scale /= 2
            if probe(scale):
                low = scale
                break
            high = scale
    if low is not None and high is not None:
        for _ in range(bisections):
            middle = math.sqrt(low * high)
            if probe(middle):
                low = middle
            else:
                high = middle
    points.sort(key=lambda p: p.rate_scale)
    goodput = low or 0.0
    return SweepResult(policy, points, goodput, base_rate_per_s * goodput)


def assemble_result(simulation: Simulation, events: int, wall_s: float) -> RunResult:
    """The RunResult of a finished simulation: per-request arrays, pool reports, the power
    timeline, energy and cost."""
    finished = simulation.finish_s[~np.isnan(simulation.finish_s)]
    makespan = float(finished.max()) if len(finished) else 0.0
    makespan = max(makespan, float(simulation.arrival_s[-1]) if len(simulation.arrival_s) else 0.0)
    bins = max(1, math.ceil(makespan / simulation.bin_s))
    power = np.zeros(bins)
    pools: list[PoolReport] = []
    iterations = 0
    cost = 0.0
    for deployment in simulation.deployments:
        for pool in deployment.pools:
            power += pool.power.power_w(bins)
            busy = sum(pool.power.compute) + sum(pool.power.memory)
            replicas = len(pool.instances)
            pool_iterations = sum(i.iterations for i in pool.instances)
            iterations += pool_iterations
            peak = max((i.peak_used_blocks / i.total_blocks for i in pool.instances), default=0.0)
            cost += pool.cost_per_replica_hour * replicas
            pools.append(
                PoolReport(
                    deployment.name,
                    pool.plan.name,
                    pool.plan.role.value,
                    pool.plan.accelerator_class,
                    pool.plan.tensor_parallel,
                    replicas,
                    pool.devices_per_replica * replicas,
                    round(pool.cost_per_replica_hour * replicas, 4),
                    round(busy / (replicas * makespan), 4) if makespan else 0.0,
                    pool_iterations,
                    round(peak, 4),
                    (
                        f"{pool.attention.tensor_parallel} {pool.attention.accelerator_class}"
                        if pool.attention
                        else None
                    ),
                )
            )
    # The last bin is partial: weight it by the time it covers.
    widths = np.full(bins, simulation.bin_s)
    widths[-1] = makespan - simulation.bin_s * (bins - 1) if makespan > 0 else simulation.bin_s
    energy = float((power * widths).sum())
    return RunResult(
        policy=simulation.policy_name,
        deployments=[d.name for d in simulation.deployments],
        slos=[d.setup.spec.slo for d in simulation.deployments],
        deployment=simulation.owner,
        arrival_s=simulation.arrival_s,
        prompt_tokens=simulation.prompt,
        output_tokens=simulation.output,
        first_token_s=simulation.first_token_s,
        finish_s=simulation.finish_s,
        finish_count=simulation.finish_count,
        preemptions=simulation.preempted,
        transfer_s=simulation.transfer_s,
        rejected=simulation.rejected,
        pools=pools,
        power_time_s=(np.arange(bins, dtype=np.float64) + 0.5) * simulation.bin_s,
        power_w=power,
        energy_j=energy,
        cost_per_hour=cost,
        makespan_s=makespan,
        wall_s=wall_s,
        events=events,
        iterations=iterations,
        preemption_count=simulation.preemptions,
        transfers=simulation.links.transfers,
        plans={d.name: d.setup.plan.to_wire() for d in simulation.deployments},
    )
