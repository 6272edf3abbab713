"""The discrete-event loop: time, events and the wiring of deployments to instances.

The simulator owns time and events only. Where requests go is decided by
`tessera.policies.dispatch`, what runs where by the Plan (from `tessera.policies.placement` or
a baseline), and how long an iteration takes by the performance models in `tessera.policies`.
Arrivals are read from sorted arrays rather than queued as events; every other event (an
iteration or a run of decode iterations ending, a KV transfer landing: sim/handoff.py holds a
disaggregated request's way from prefill to decode) sits in one heap ordered
by (time, sequence number), so ties resolve in the order events were pushed and a run is
deterministic.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import ModelDeploymentSpec, Plan, PoolPlan, PoolRole
from tessera.api.scheduler import SchedulerConfig
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.dispatch import (
    DispatchPolicy,
    DispatchRequest,
    InstanceLoads,
    NoEligibleInstanceError,
    choose_instance,
)
from tessera.policies.perfmodel import ReplicaPerformance
from tessera.policies.power_model import class_power_model
from tessera.sim.cluster import Cluster
from tessera.sim.handoff import KvHandoff
from tessera.sim.instance import Instance, Request
from tessera.sim.metrics import PowerTrack, RunResult, assemble_result
from tessera.sim.shared_device import DeviceShare, SharedDevice, even_split_capacity
from tessera.sim.stepcost import PerformanceModel, StepCost
from tessera.sim.transfer import KvLinks
from tessera.sim.workload import Workload


class SimulationSetupError(ValueError):
    """A plan cannot be simulated on the cluster as given (names the pool and the fix)."""


class SimulationStalledError(RuntimeError):
    """Events ran out with requests unfinished: a simulator bug, never a result."""


@dataclass(frozen=True)
class DeploymentSetup:
    """A deployment to simulate: its spec, the plan in force and its engines' settings."""

    name: str
    spec: ModelDeploymentSpec
    plan: Plan
    schedulers: Mapping[PoolRole, SchedulerConfig] = field(default_factory=dict)
    """Engine schedulers by pool role; a role not named runs what its pool records
    (`PoolPlan.scheduler`), as the operator would start it."""
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    power_bin_s: float | None = None
    """Width of the power timeline's bins; default: the workload's span / 200."""
    progress_every: int = 4096
    """Call the progress callback every this many events."""
    fast_forward: bool = True
    """Sum runs of decode iterations in closed form; False steps every iteration (slow, exact)."""
    block_size_tokens: int = 16
    """Tokens per KV block in every instance (the engine's default)."""
    kv_capacity_tokens: int | None = None
    """KV tokens per replica instead of the performance models' (tests force preemption with
    it; the serving bench pins it to the engine's)."""
    shared_devices: tuple[SharedDevice, ...] = ()
    """Pools whose replicas time-share devices (sim/shared_device.py); none by default."""


@dataclass
class _Stage:
    """Instances a request can be dispatched to at one step (entry, or decode)."""

    instances: list[Instance]
    loads: InstanceLoads
    sequence: int = 0


@dataclass
class _Pool:
    deployment: str
    plan: PoolPlan
    instances: list[Instance]
    power: PowerTrack
    devices_per_replica: int
    cost_per_replica_hour: float
    attention: PoolPlan | None = None


@dataclass
class _Deployment:
    name: str
    setup: DeploymentSetup
    entry: _Stage
    decode: _Stage | None
    pools: list[_Pool] = field(default_factory=list)


def _power_levels(
    perf: PerformanceModel, cap_w: float | None, devices: int
) -> tuple[float, float, float]:
    """(idle, compute-bound active, memory-bound active) draw of one replica, capped."""
    levels = (perf.power_w(0.0, False), perf.power_w(1.0, True), perf.power_w(1.0, False))
    if cap_w is None:
        return levels
    if isinstance(perf, OffloadedDecodePerformance):
        compute = perf.compute
        limit = cap_w * compute.tensor_parallel
        return tuple(  # type: ignore[return-value]
            level - compute.power_w(busy, bound) + min(compute.power_w(busy, bound), limit)
            for level, (busy, bound) in zip(
                levels, ((0.0, False), (1.0, True), (1.0, False)), strict=True
            )
        )
    return tuple(min(level, cap_w * devices) for level in levels)  # type: ignore[return-value]


class Simulation:
    """One run: deployments (plans) on a cluster, fed a workload per deployment."""

    def __init__(
        self,
        cluster: Cluster,
        setups: Sequence[DeploymentSetup],
        workloads: Sequence[Workload],
        config: SimConfig | None = None,
        policy_name: str = "custom",
    ) -> None:
        if len(setups) != len(workloads):
            raise ValueError(f"{len(setups)} deployments but {len(workloads)} workloads")
        if not setups:
            raise ValueError("nothing to simulate: no deployments")
        self.cluster = cluster
        self.config = config or SimConfig()
        self.policy_name = policy_name
        self.rng = np.random.default_rng(self.config.seed)
        self.heap: list[tuple[float, int, Any, int]] = []
        self.sequence = 0
        self.now = 0.0
        self.preemptions = 0
        self.links = KvLinks(cluster.kv_link_gbps, measured=cluster.kv_transport)
        self.handoff = KvHandoff(self)
        """Prefill -> decode: dispatch, KV transfer, arrival (sim/handoff.py)."""
        self._merge(workloads)
        span = max((w.duration_s for w in workloads), default=1.0)
        self.bin_s = self.config.power_bin_s or max(1e-3, span / 200)
        known = {setup.name for setup in setups}
        for shared in self.config.shared_devices:
            if shared.deployment not in known:
                raise SimulationSetupError(
                    f"SharedDevice names deployment {shared.deployment}, which is not simulated "
                    f"({', '.join(sorted(known))})"
                )
        self.deployments = [self._build(i, setup) for i, setup in enumerate(setups)]

    # ---- setup ------------------------------------------------------------------------
    def _merge(self, workloads: Sequence[Workload]) -> None:
        arrival = np.concatenate([w.arrival_s for w in workloads])
        owner = np.concatenate(
            [np.full(len(w), i, dtype=np.int64) for i, w in enumerate(workloads)]
        )
        order = np.lexsort((owner, arrival))
        self.arrival_s = arrival[order]
        self.owner = owner[order]
        self.prompt = np.concatenate([w.prompt_tokens for w in workloads])[order]
        self.output = np.concatenate([w.output_tokens for w in workloads])[order]
        n = len(self.arrival_s)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.finish_count = np.zeros(n, dtype=np.int64)
        self.preempted = np.zeros(n, dtype=np.int64)
        self.transfer_s = np.zeros(n)
        self.rejected = np.zeros(n, dtype=bool)

    def _performance(
        self, setup: DeploymentSetup, pool: PoolPlan, attention: PoolPlan | None
    ) -> PerformanceModel:
        arch = setup.spec.model.architecture
        spec = self._class(pool)
        calibration = self.cluster.calibrations.get(pool.accelerator_class)
        if attention is None:
            return ReplicaPerformance(arch, spec, pool.tensor_parallel, calibration)
        return OffloadedDecodePerformance(
            arch,
            spec,
            pool.tensor_parallel,
            self._class(attention),
            attention.tensor_parallel,
            calibration,
            self.cluster.calibrations.get(attention.accelerator_class),
        )

    def _class(self, pool: PoolPlan) -> AcceleratorClassSpec:
        spec = self.cluster.classes.get(pool.accelerator_class)
        if spec is None:
            raise SimulationSetupError(
                f"pool {pool.name} runs on AcceleratorClass {pool.accelerator_class}, which the "
                f"cluster does not define ({', '.join(sorted(self.cluster.classes))})"
            )
        return spec

    def _build(self, index: int, setup: DeploymentSetup) -> _Deployment:
        arch = setup.spec.model.architecture
        pools = setup.plan.pools
        # The plan names the decode pool each attention pool serves (`attentionFor`).
        attention_for = {
            i: attention
            for i, pool in enumerate(pools)
            if (attention := setup.plan.attention_pool_for(pool.name)) is not None
        }
        entry: list[tuple[_Pool, StepCost, PoolRole]] = []
        decode_pools: list[tuple[_Pool, StepCost, PoolRole]] = []
        built: list[_Pool] = []
        for i, pool in enumerate(pools):
            if pool.role is PoolRole.ATTENTION or pool.replicas == 0:
                continue
            attention = attention_for.get(i)
            perf = self._performance(setup, pool, attention)
            spec = self._class(pool)
            cap_w = self.cluster.power_cap_w.get(pool.accelerator_class)
            cost = StepCost(
                perf,
                arch.max_context_tokens,
                cap_w / spec.tdp_w if cap_w is not None else None,
                class_power_model(pool.accelerator_class, spec) if cap_w is not None else None,
            )
            devices = pool.tensor_parallel + (attention.tensor_parallel if attention else 0)
            hourly = spec.cost_per_hour * pool.tensor_parallel
            if attention is not None:
                hourly += self._class(attention).cost_per_hour * attention.tensor_parallel
            idle_w, compute_w, memory_w = _power_levels(perf, cap_w, pool.tensor_parallel)
            power = PowerTrack(self.bin_s, pool.replicas, idle_w, compute_w, memory_w)
            runtime = _Pool(setup.name, pool, [], power, devices, hourly, attention)
            built.append(runtime)
            (decode_pools if pool.role is PoolRole.DECODE else entry).append(
                (runtime, cost, pool.role)
            )
        if not entry:
            raise SimulationSetupError(
                f"{setup.name}: the plan has no colocated or prefill pool with replicas"
            )
        has_prefill = any(role is PoolRole.PREFILL for _, _, role in entry)
        if has_prefill and not decode_pools:
            raise SimulationSetupError(f"{setup.name}: the plan has prefill but no decode pool")
        placement = self._shared(setup, entry + decode_pools)
        entry_stage = self._stage(setup, entry, placement)
        decode_stage = self._stage(setup, decode_pools, placement) if decode_pools else None
        deployment = _Deployment(setup.name, setup, entry_stage, decode_stage, built)
        return deployment

    def _shared(
        self, setup: DeploymentSetup, pools: list[tuple[_Pool, StepCost, PoolRole]]
    ) -> dict[str, tuple[int, list[DeviceShare]]]:
        """Per shared pool name: its replicas' KV capacity and the device share of each
        replica (`SimConfig.shared_devices`); pools on devices of their own are absent."""
        by_name = {pool.plan.name: (pool, cost) for pool, cost, _ in pools}
        placement: dict[str, tuple[int, list[DeviceShare]]] = {}
        for shared in self.config.shared_devices:
            if shared.deployment != setup.name:
                continue
            where = f"{setup.name}: SharedDevice"
            members = []
            for name in shared.pools:
                if name not in by_name:
                    raise SimulationSetupError(
                        f"{where} names pool {name}, which is not a pool with replicas of the "
                        f"plan ({', '.join(sorted(by_name))})"
                    )
                if name in placement:
                    raise SimulationSetupError(f"{where}: pool {name} is in two SharedDevices")
                members.append(by_name[name])
            first = members[0][0].plan
            for pool, _ in members[1:]:
                plan = pool.plan
                if (plan.replicas, plan.accelerator_class, plan.tensor_parallel) != (
                    first.replicas,
                    first.accelerator_class,
                    first.tensor_parallel,
                ):
                    raise SimulationSetupError(
                        f"{where}: pools {first.name} and {plan.name} must have the same "
                        f"replicas, acceleratorClass and tensorParallel to share devices "
                        f"(got {first.replicas}/{first.accelerator_class}/"
                        f"{first.tensor_parallel} and {plan.replicas}/{plan.accelerator_class}/"
                        f"{plan.tensor_parallel})"
                    )
            overlap = shared.overlap_host_overhead
            shares = [DeviceShare(self, overlap) for _ in range(first.replicas)]
            for name, (_, cost) in zip(shared.pools, members, strict=True):
                capacity = shared.kv_capacity_tokens.get(name)
                if capacity is None:
                    capacity = even_split_capacity(cost.perf, len(shared.pools))
                    if capacity is None:
                        raise SimulationSetupError(
                            f"{where}: pool {name} needs kv_capacity_tokens (its memory share "
                            "cannot be derived for an attention-offloaded replica)"
                        )
                placement[name] = (capacity, shares)
        return placement

    def _stage(
        self,
        setup: DeploymentSetup,
        pools: list[tuple[_Pool, StepCost, PoolRole]],
        placement: Mapping[str, tuple[int, list[DeviceShare]]],
    ) -> _Stage:
        count = sum(p.plan.replicas for p, _, _ in pools)
        loads = InstanceLoads.empty(np.zeros(count), np.ones(count))
        stage = _Stage([], loads)
        arch = setup.spec.model.architecture
        for pool, cost, role in pools:
            scheduler = setup.schedulers.get(role) or pool.plan.scheduler(arch.max_context_tokens)
            speed = (
                cost.decode_tokens_per_s()
                if role is PoolRole.DECODE
                else cost.prefill_tokens_per_s()
            )
            perf = cost.perf
            if isinstance(perf, OffloadedDecodePerformance):
                network = perf.memory.network_bandwidth_gbps
            else:
                network = self._class(pool.plan).network_bandwidth_gbps
            capacity: int | None = None
            shares: list[DeviceShare] | None = None
            if (found := placement.get(pool.plan.name)) is not None:
                capacity, shares = found
            for replica in range(pool.plan.replicas):
                slot = len(stage.instances)
                instance = Instance(
                    self,
                    f"{setup.name}/{pool.plan.name}/{replica}",
                    role,
                    cost,
                    scheduler,
                    loads,
                    slot,
                    pool.power,
                    network,
                    capacity,
                    shares[replica] if shares is not None else None,
                )
                if instance.capacity_tokens < arch.max_context_tokens:
                    raise SimulationSetupError(
                        f"{setup.name}: pool {pool.plan.name} holds {instance.capacity_tokens} "
                        f"KV tokens per replica, fewer than maxContextTokens "
                        f"({arch.max_context_tokens}); raise its tensor parallelism or lower "
                        "maxContextTokens"
                    )
                loads.kv_capacity_tokens[slot] = instance.capacity_tokens
                loads.speed[slot] = speed
                pool.instances.append(instance)
                stage.instances.append(instance)
        return stage

    # ---- events -----------------------------------------------------------------------
    def push_event(self, at_s: float, target: Any, version: int) -> None:
        """An event at `at_s` calling `target.step_end(at_s, version)`."""
        self.sequence += 1
        heapq.heappush(self.heap, (at_s, self.sequence, target, version))

    def _dispatch(self, stage: _Stage, setup: DeploymentSetup, prompt: int) -> Instance:
        request = DispatchRequest(prompt, stage.sequence)
        stage.sequence += 1
        index = choose_instance(setup.dispatch, request, stage.loads, self.rng)
        return stage.instances[index]

    def _arrive(self, rid: int, now: float) -> None:
        owner = int(self.owner[rid])
        deployment = self.deployments[owner]
        arch = deployment.setup.spec.model.architecture
        prompt = int(self.prompt[rid])
        if prompt >= arch.max_context_tokens:
            self.rejected[rid] = True
            return
        # An engine stops a request at the model's context length, as vLLM does.
        output = max(1, min(int(self.output[rid]), arch.max_context_tokens - prompt))
        self.output[rid] = output
        request = Request(rid, owner, now, prompt, output)
        try:
            instance = self._dispatch(deployment.entry, deployment.setup, prompt)
        except NoEligibleInstanceError:
            self.rejected[rid] = True
            return
        instance.enqueue(request, now)

    def finish(self, request: Request, now: float) -> None:
        rid = request.rid
        self.finish_count[rid] += 1
        self.finish_s[rid] = now
        self.first_token_s[rid] = request.first_token_s
        self.preempted[rid] = request.preemptions

    # ---- the loop ---------------------------------------------------------------------
    def run(self, progress: Callable[[int, int], None] | None = None) -> RunResult:
        """Simulate until every request has finished (or was rejected)."""
        started = time.perf_counter()
        heap = self.heap
        arrivals = self.arrival_s.tolist()
        total = len(arrivals)
        next_index = 0
        events = 0
        every = self.config.progress_every
        pop = heapq.heappop
        inf = math.inf
        while True:
            next_arrival = arrivals[next_index] if next_index < total else inf
            if heap and heap[0][0] <= next_arrival:
                at_s, _, target, version = pop(heap)
                self.now = at_s
                target.step_end(at_s, version)
            elif next_index < total:
                self.now = next_arrival
                self._arrive(next_index, next_arrival)
                next_index += 1
            else:
                break
            events += 1
            if progress is not None and events % every == 0:
                progress(next_index, total)
        if progress is not None:
            progress(total, total)
        unfinished = int(((self.finish_count == 0) & ~self.rejected).sum())
        if unfinished:
            raise SimulationStalledError(
                f"{unfinished} requests never finished and no events remain"
            )
        return assemble_result(self, events, time.perf_counter() - started)
