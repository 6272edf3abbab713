"""Serving policies to compare, by name: each is a plan plus the engines' scheduler settings.

- `vllm`: colocated replicas, continuous batching, prefills whole and first (vLLM v0 default).
- `sarathi`: the same replicas with chunked prefill under a 512-token budget (Sarathi-Serve).
- `disaggregated`: prefill and decode pools (Splitwise, DistServe) with KV transfer.
- `attention-offload`: prefill pool plus decode replicas whose attention runs on a memory pool.
- `tessera`: whatever the planner chooses for the deployment's servingMode (auto: the cheapest
  layout that meets the SLO), chunked prefill on colocated replicas.

Plans come from `tessera.policies.placement.plan_deployment` with the serving mode set, on the
cluster's classes with its free capacity, so the baselines are sized by the same model and
for the same declared traffic as Tessera's own plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from tessera.api.model_deployment import ModelDeployment, Plan, PoolRole, ServingMode
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.placement import InfeasiblePlanError, plan_deployment
from tessera.sim.cluster import Cluster
from tessera.sim.engine import DeploymentSetup
from tessera.sim.evaluate import SimulatedEvaluator, tessera_schedulers
from tessera.sim.instance import SchedulerConfig


class Baseline(StrEnum):
    VLLM = "vllm"
    SARATHI = "sarathi"
    DISAGGREGATED = "disaggregated"
    ATTENTION_OFFLOAD = "attention-offload"
    TESSERA = "tessera"


SERVING_MODE: dict[Baseline, ServingMode | None] = {
    Baseline.VLLM: ServingMode.COLOCATED,
    Baseline.SARATHI: ServingMode.COLOCATED,
    Baseline.DISAGGREGATED: ServingMode.DISAGGREGATED,
    Baseline.ATTENTION_OFFLOAD: ServingMode.ATTENTION_OFFLOAD,
    Baseline.TESSERA: None,
}


def schedulers(
    baseline: Baseline, max_context_tokens: int, fast_forward: bool = True
) -> dict[PoolRole, SchedulerConfig]:
    """Scheduler settings per pool role for a baseline: Tessera's, with whole prefills on
    colocated replicas for the vLLM-like baseline."""
    settings = tessera_schedulers(max_context_tokens, fast_forward)
    if baseline is Baseline.VLLM:
        settings[PoolRole.COLOCATED] = settings[PoolRole.PREFILL]
    return settings


def plan_for(
    baseline: Baseline, deployment: ModelDeployment, cluster: Cluster, allocated: dict[str, int]
) -> Plan:
    """The baseline's plan for a deployment on the cluster's free capacity.

    Tessera's planner also simulates its cheapest candidates (sim.evaluate); the baselines
    take the analytical planner's cheapest plan of their fixed layout.
    """
    mode = SERVING_MODE[baseline]
    spec = deployment.spec
    if mode is not None:
        spec = spec.model_copy(update={"serving_mode": mode})
    offers = cluster.offers(allocated)
    if baseline is not Baseline.TESSERA:
        return plan_deployment(spec, offers)
    evaluator = SimulatedEvaluator(cluster.classes, kv_link_gbps=cluster.kv_link_gbps)
    return plan_deployment(spec, offers, evaluator)


def allocate(plan: Plan, allocated: dict[str, int]) -> None:
    """Count a plan's devices as taken (a later deployment plans on what is left)."""
    for name, count in plan.devices_by_class().items():
        allocated[name] = allocated.get(name, 0) + count


def setups_for(
    baseline: Baseline,
    deployments: Sequence[ModelDeployment],
    cluster: Cluster,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
    fast_forward: bool = True,
) -> list[DeploymentSetup]:
    """Plans and scheduler settings for every deployment under a baseline, planned in order.

    Raises InfeasiblePlanError naming the deployment when one cannot be planned.
    """
    allocated: dict[str, int] = {}
    setups: list[DeploymentSetup] = []
    for deployment in deployments:
        try:
            plan = plan_for(baseline, deployment, cluster, allocated)
        except InfeasiblePlanError as error:
            raise InfeasiblePlanError(
                f"{baseline.value}: {deployment.metadata.name}: {error}"
            ) from error
        allocate(plan, allocated)
        arch = deployment.spec.model.architecture
        setups.append(
            DeploymentSetup(
                deployment.metadata.name,
                deployment.spec,
                plan,
                schedulers(baseline, arch.max_context_tokens, fast_forward),
                dispatch,
            )
        )
    return setups
