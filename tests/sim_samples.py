"""Shared builders for the simulator tests: the example model and classes, small plans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from api_samples import chat_deployment, example_documents
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.model_deployment import (
    ModelDeployment,
    Plan,
    PoolPlan,
    PoolRole,
    ServingMode,
)
from tessera.api.scheduler import SchedulerConfig
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.efficiency import Calibration
from tessera.sim.cluster import Cluster
from tessera.sim.metrics import RunResult
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.workload import Workload

CLASSES: dict[str, AcceleratorClassSpec] = {
    doc["metadata"]["name"]: AcceleratorClass.model_validate(doc).spec
    for doc in example_documents("accelerator-classes.yaml")
}
NO_OVERHEAD = Calibration(iteration_overhead_s=0.0, allreduce_latency_s=0.0)


def deployment(max_context_tokens: int | None = None) -> ModelDeployment:
    document = chat_deployment()
    if max_context_tokens is not None:
        document["spec"]["model"]["architecture"]["maxContextTokens"] = max_context_tokens
    return ModelDeployment.model_validate(document)


def cluster(
    nodes: Mapping[str, int] | None = None,
    calibrations: Mapping[str, Calibration] | None = None,
    classes: Mapping[str, AcceleratorClassSpec] | None = None,
    power_cap_w: Mapping[str, float] | None = None,
) -> Cluster:
    return Cluster(
        "test",
        dict(classes or CLASSES),
        dict(nodes or {"h100": 1, "a100": 1}),
        dict(power_cap_w or {}),
        calibrations=dict(calibrations or {}),
    )


def scaled_class(spec: AcceleratorClassSpec, factor: float) -> AcceleratorClassSpec:
    """Every speed of a class (compute, memory, interconnect, network) times `factor`."""
    peak = spec.peak_tflops
    return spec.model_copy(
        update={
            "memory_bandwidth_gbps": spec.memory_bandwidth_gbps * factor,
            "peak_tflops": peak.model_copy(
                update={
                    name: getattr(peak, name) * factor
                    for name in ("bf16", "fp16", "fp8", "fp32")
                    if getattr(peak, name) is not None
                }
            ),
            "interconnect_bandwidth_gbps": spec.interconnect_bandwidth_gbps * factor,
            "network_bandwidth_gbps": spec.network_bandwidth_gbps * factor,
        }
    )


def pool(role: PoolRole, accelerator: str, replicas: int, tp: int = 1) -> PoolPlan:
    return PoolPlan(
        name=f"{role.value}-{accelerator}",
        role=role,
        accelerator_class=accelerator,
        tensor_parallel=tp,
        replicas=replicas,
    )


def plan(*pools: PoolPlan) -> Plan:
    """A plan of `pools`; an attention pool serves the decode pool before it unless it names
    one (`attentionFor`)."""
    linked: list[PoolPlan] = []
    for each in pools:
        decode = [p.name for p in linked if p.role is PoolRole.DECODE]
        if each.role is PoolRole.ATTENTION and each.attention_for is None and decode:
            each = each.model_copy(update={"attention_for": decode[-1]})
        linked.append(each)
    pools = tuple(linked)
    roles = {p.role for p in pools}
    mode = (
        ServingMode.ATTENTION_OFFLOAD
        if PoolRole.ATTENTION in roles
        else ServingMode.DISAGGREGATED
        if PoolRole.PREFILL in roles
        else ServingMode.COLOCATED
    )
    return Plan(mode=mode, pools=list(pools), cost_per_hour=0, power_w=0, rationale="test")


def schedulers(
    chunked: bool = False, budget: int = 8192, max_num_seqs: int = 256
) -> dict[PoolRole, SchedulerConfig]:
    """Colocated pools chunk (or not) under `budget`; prefill and decode pools take whole
    prompts under 8192 tokens."""
    colocated = SchedulerConfig(max_num_seqs, budget if chunked else max(budget, 8192), chunked)
    whole = SchedulerConfig(max_num_seqs, 8192, False)
    return {PoolRole.COLOCATED: colocated, PoolRole.PREFILL: whole, PoolRole.DECODE: whole}


def workload(arrival_s: Sequence[float], prompt: Sequence[int], output: Sequence[int]) -> Workload:
    arrival = np.asarray(arrival_s, dtype=np.float64)
    return Workload(
        arrival,
        np.asarray(prompt, dtype=np.int64),
        np.asarray(output, dtype=np.int64),
        float(arrival.max()) + 1.0 if len(arrival) else 1.0,
        "test",
    )


def random_workload(
    count: int, rate_per_s: float, seed: int = 1, max_prompt: int = 3000, max_output: int = 400
) -> Workload:
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, count))
    return workload(
        arrival.tolist(),
        rng.integers(16, max_prompt, count).tolist(),
        rng.integers(2, max_output, count).tolist(),
    )


def simulate(
    the_plan: Plan,
    the_workload: Workload,
    the_cluster: Cluster | None = None,
    scheduler: Mapping[PoolRole, SchedulerConfig] | None = None,
    the_deployment: ModelDeployment | None = None,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
    seed: int = 0,
    kv_capacity_tokens: int | None = None,
    fast_forward: bool = True,
) -> tuple[Simulation, RunResult]:
    dep = the_deployment or deployment()
    setup = DeploymentSetup("chat", dep.spec, the_plan, scheduler or schedulers(), dispatch)
    config = SimConfig(seed=seed, fast_forward=fast_forward, kv_capacity_tokens=kv_capacity_tokens)
    simulation = Simulation(the_cluster or cluster(), [setup], [the_workload], config)
    return simulation, simulation.run()
