"""Serving policies to compare, by name: each is a plan plus the engines' scheduler settings.

- `vllm`: sarathi's replicas, prefilling whole prompts (vLLM with chunked prefill off).
- `sarathi`: colocated replicas with chunked prefill under a 512-token budget (Sarathi-Serve).
- `disaggregated`: prefill and decode pools (Splitwise, DistServe) with KV transfer.
- `attention-offload`: prefill pool plus decode replicas whose attention runs on a memory pool.
- `tessera`: whatever the planner chooses for the deployment's servingMode (auto: the cheapest
  layout that meets the SLO), colocated replicas chunking or not as the plan says.

Plans come from `tessera.policies.placement.plan_deployment` with the serving mode set, on the
cluster's classes with its free capacity, so the baselines are sized by the same model and
for the same declared traffic as Tessera's own plan. Every pool's engine scheduler is the one
its plan records (`PoolPlan.scheduler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from tessera.api.model_deployment import ModelDeployment, Plan, PoolRole, ServingMode
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.placement import InfeasiblePlanError, plan_deployment
from tessera.sim.cluster import Cluster
from tessera.sim.evaluate import SimulatedEvaluator
from tessera.sim.simulation import DeploymentSetup


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


def with_whole_prompts(plan: Plan) -> Plan:
    """The plan with its colocated pools prefilling whole prompts, on the same replicas.

    Its predicted attainment is dropped: it was predicted for the chunked engine.
    """
    pools = [
        pool.model_copy(update={"prefill_chunk_tokens": None})
        if pool.role is PoolRole.COLOCATED
        else pool
        for pool in plan.pools
    ]
    return plan.model_copy(
        update={
            "pools": pools,
            "predicted_attainment": None,
            "rationale": f"{plan.rationale}; run with whole prompts on these replicas",
        }
    )


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
    if baseline is Baseline.TESSERA:
        evaluator = SimulatedEvaluator(cluster.classes, kv_link_gbps=cluster.kv_link_gbps)
        return plan_deployment(spec, offers, evaluator)
    if baseline in (Baseline.VLLM, Baseline.SARATHI):
        # Both run Sarathi's replicas, so the two differ only in the engine's scheduler.
        plan = plan_deployment(spec, offers, chunked_prefill=True)
        return with_whole_prompts(plan) if baseline is Baseline.VLLM else plan
    return plan_deployment(spec, offers)


def allocate(plan: Plan, allocated: dict[str, int]) -> None:
    """Count a plan's devices as taken (a later deployment plans on what is left)."""
    for name, count in plan.devices_by_class().items():
        allocated[name] = allocated.get(name, 0) + count


def setups_for(
    baseline: Baseline,
    deployments: Sequence[ModelDeployment],
    cluster: Cluster,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
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
        setups.append(
            DeploymentSetup(deployment.metadata.name, deployment.spec, plan, dispatch=dispatch)
        )
    return setups
