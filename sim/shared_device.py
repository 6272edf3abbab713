"""Instances that time-share one device: processor sharing of its compute among them.

Two engine processes on one GPU without MPS time-slice it: while both have a kernel to run, each
gets about half the GPU; when one idles, the other gets all of it. The simulator models this as
processor sharing. A `SharedDevice` (a `SimConfig.shared_devices` entry) names pools of one
deployment whose replicas pairwise share devices: replica i of each named pool runs on the same
device(s). At run time each such set of replicas is one `DeviceShare`: while k of its members
have a step (an iteration, or a fast-forwarded run of decode iterations) in flight, each
progresses at speed 1/k, and whenever a member starts or ends a step the others' steps in flight
are re-timed: their remaining work (full-speed seconds) over the new speed. An instance's step is
its work in full-speed seconds, as its performance model prices it alone on the device; the
share turns work into wall time.

With `overlap_host_overhead`, a step's host-side part (the performance model's per-iteration
overhead: scheduling, launches) does not occupy the device: a step of work W holding the device
for a fraction f of it is a fluid demand of f, and the device's capacity is split max-min fairly
among the busy members' demands; a member granted share s <= f progresses at s / f. Two members
with f = 1 each get 1/2 (the default, plain processor sharing); a member whose f is below its
fair share runs at full speed and leaves the rest to the others. A fast-forwarded run of decode
iterations has one f over the run (its iterations' overhead over its work).

Memory is not shared: each member holds its own KV cache, sized by its process's memory share
(`SharedDevice.kv_capacity_tokens`, or an even split of the device's memory by default).

KV transfers between members cost the measured transport (sim/transfer.py) and are not
processor-shared: a same-device copy runs on the copy engines, beside the kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tessera.policies.perfmodel import ReplicaPerformance

if TYPE_CHECKING:
    from tessera.sim.instance import Instance
    from tessera.sim.simulation import Simulation


@dataclass(frozen=True)
class SharedDevice:
    """Pools of one deployment whose replicas time-share devices, replica i with replica i.

    The pools must have the same replica count, accelerator class and tensor parallelism (each
    replica i of them runs on the same `tensor_parallel` devices)."""

    deployment: str
    """The `DeploymentSetup.name` the pools belong to."""
    pools: tuple[str, ...]
    """Names of at least two of its pools (`PoolPlan.name`)."""
    kv_capacity_tokens: Mapping[str, int] = field(default_factory=dict)
    """KV tokens per replica of a pool, from its process's memory share (what the engine
    reports); a pool not named gets an even split of the device memory (`even_split_capacity`).
    Wins over `SimConfig.kv_capacity_tokens`."""
    overlap_host_overhead: bool = False
    """True: the per-iteration overhead of the performance model (host-side work) leaves the
    device to the others (fluid max-min fair sharing); False: a whole step occupies it."""

    def __post_init__(self) -> None:
        if len(self.pools) < 2:
            raise ValueError(
                f"SharedDevice {self.deployment}: pools must name at least 2 pools, got "
                f"{list(self.pools)}"
            )
        if len(set(self.pools)) != len(self.pools):
            raise ValueError(
                f"SharedDevice {self.deployment}: pools names a pool twice: {list(self.pools)}"
            )
        for name, tokens in self.kv_capacity_tokens.items():
            if name not in self.pools:
                raise ValueError(
                    f"SharedDevice {self.deployment}: kv_capacity_tokens names {name}, which is "
                    f"not one of its pools ({', '.join(self.pools)})"
                )
            if tokens <= 0:
                raise ValueError(
                    f"SharedDevice {self.deployment}: kv_capacity_tokens[{name}] must be > 0, "
                    f"got {tokens}"
                )


def host_s_per_iteration(perf: object) -> float:
    """Host-side seconds of each iteration: the calibrated per-iteration overhead."""
    calibration = getattr(perf, "calibration", None)
    if calibration is None:  # an offloaded decode replica: its compute side's
        calibration = getattr(getattr(perf, "compute", None), "calibration", None)
    return float(calibration.iteration_overhead_s) if calibration is not None else 0.0


def even_split_capacity(perf: object, members: int) -> int | None:
    """KV tokens of one of `members` processes that split a device's memory evenly: each holds
    its own weights and activation reserve in 1/members of the usable memory. None for a model
    that is not a plain replica's (an offloaded decode replica): the caller must say."""
    if not isinstance(perf, ReplicaPerformance):
        return None
    usable = perf.accelerator.memory_bytes * perf.calibration.memory_utilization / members
    free = usable - perf.weight_bytes_per_device - perf.calibration.activation_reserve_bytes
    return max(0, int(free // perf.kv_bytes_per_token_per_device))


class DeviceShare:
    """One device (or tensor-parallel group) time-shared by instances: processor sharing.

    Members' progress is kept in full-speed seconds (`Instance.work_done_s` of
    `Instance.work_s`) as of `updated_s`; between two changes of the busy set each busy member
    progresses at its `rates` entry per second (1/k for k members holding the device for their
    whole steps). Each change re-times the busy members' step ends by bumping their event
    version (`Simulation.push_event`), so a superseded end never fires."""

    __slots__ = ("busy", "overlap_host", "rates", "sim", "updated_s")

    def __init__(self, sim: Simulation, overlap_host: bool = False) -> None:
        self.sim = sim
        self.overlap_host = overlap_host
        self.busy: list[Instance] = []
        self.rates: dict[int, float] = {}
        """Progress per second of each busy member (by id), until the busy set changes."""
        self.updated_s = 0.0

    def _advance(self, now: float) -> None:
        elapsed = now - self.updated_s
        if elapsed:
            rates = self.rates
            for member in self.busy:
                member.work_done_s += elapsed * rates[id(member)]
        self.updated_s = now

    def _share_out(self) -> None:
        """Max-min fair device shares of the busy members' demands, as progress rates."""
        rates: dict[int, float] = {}
        capacity = 1.0
        busy = sorted(self.busy, key=lambda m: m.device_fraction)
        for index, member in enumerate(busy):
            demand = member.device_fraction
            granted = min(demand, capacity / (len(busy) - index))
            capacity -= granted
            rates[id(member)] = granted / demand if demand > 0 else 1.0
        self.rates = rates

    def _retime(self, now: float) -> None:
        self._share_out()
        push = self.sim.push_event
        rates = self.rates
        for member in self.busy:
            member.version += 1
            left = member.work_s - member.work_done_s
            push(now + (left / rates[id(member)] if left > 0 else 0.0), member, member.version)

    def _set_work(self, member: Instance, work_s: float, host_s: float) -> None:
        member.work_s = work_s
        if self.overlap_host and work_s > 0:
            member.device_fraction = max(0.0, min(1.0, 1.0 - host_s / work_s))
        else:
            member.device_fraction = 1.0

    def start(self, member: Instance, now: float, work_s: float, host_s: float = 0.0) -> None:
        """`member` starts a step of `work_s` full-speed seconds, `host_s` of them host-side;
        the others slow down."""
        self._advance(now)
        self._set_work(member, work_s, host_s)
        member.work_done_s = 0.0
        self.busy.append(member)
        self._retime(now)

    def resize(self, member: Instance, now: float, work_s: float, host_s: float = 0.0) -> None:
        """`member`'s step in flight now totals `work_s` (a run of decodes was cut)."""
        self._advance(now)
        self._set_work(member, work_s, host_s)
        self._retime(now)

    def done_s(self, member: Instance, now: float) -> float:
        """Full-speed seconds of `member`'s step in flight done by `now`."""
        self._advance(now)
        return member.work_done_s

    def finish(self, member: Instance, now: float) -> None:
        """`member`'s step ended; the others speed up."""
        self._advance(now)
        self.busy.remove(member)
        self._retime(now)
