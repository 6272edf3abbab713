"""Score a candidate plan with a short simulation: the planner's `PlanEvaluator`.

DistServe picks its placement by simulating candidates; Tessera's planner sizes candidates
analytically and then, given this evaluator, simulates the cheapest few at the deployment's
declared traffic and keeps the cheapest one that meets the attainment target. The run is
seeded, so planning stays deterministic, and bounded by a request budget, so it stays short.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import ModelDeploymentSpec, Plan, PoolPlan, PoolRole
from tessera.policies.capacity import ClassOffer
from tessera.policies.dispatch import DispatchPolicy
from tessera.sim.cluster import Cluster
from tessera.sim.engine import DeploymentSetup, SimConfig, Simulation
from tessera.sim.instance import SchedulerConfig
from tessera.sim.metrics import RunResult
from tessera.sim.workload import synthetic_workload

EVALUATION_REQUESTS = 1500
"""Requests one evaluation simulates: enough for a tail percentile, few enough to be quick."""


class SchedulerConflictError(ValueError):
    """Two pools of one role ask for different engine schedulers (the simulator keys by role)."""


def pool_scheduler(
    pool: PoolPlan, max_context_tokens: int, fast_forward: bool = True
) -> SchedulerConfig:
    """The engine scheduler a pool's plan records: chunked prefill or whole prompts, the
    iteration token budget and the batch cap, as the operator passes them to the engine."""
    return SchedulerConfig(
        chunked_prefill=pool.prefill_chunk_tokens is not None,
        token_budget=pool.batched_tokens(max_context_tokens),
        max_num_seqs=pool.max_running_requests,
        fast_forward=fast_forward,
    )


def plan_schedulers(
    plan: Plan, max_context_tokens: int, fast_forward: bool = True
) -> dict[PoolRole, SchedulerConfig]:
    """Each pool role's scheduler, from the plan's pools (attention pools run no scheduler), so
    a simulation runs the plan the way the planner scored it."""
    settings: dict[PoolRole, SchedulerConfig] = {}
    for pool in plan.pools:
        if pool.role is PoolRole.ATTENTION:
            continue
        config = pool_scheduler(pool, max_context_tokens, fast_forward)
        if settings.setdefault(pool.role, config) != config:
            raise SchedulerConflictError(
                f"pools of role {pool.role.value} record different engine schedulers "
                f"(pool {pool.name}: prefillChunkTokens {pool.prefill_chunk_tokens}, "
                f"maxRunningRequests {pool.max_running_requests}); give them the same settings"
            )
    return settings


@dataclass(frozen=True)
class SimulatedEvaluator:
    """Measures a plan's attainment at the declared rate with Poisson arrivals."""

    classes: Mapping[str, AcceleratorClassSpec]
    seed: int = 0
    requests: int = EVALUATION_REQUESTS
    min_duration_s: float = 30.0
    max_duration_s: float = 900.0
    kv_link_gbps: float | None = None

    @classmethod
    def for_offers(cls, offers: Sequence[ClassOffer], seed: int = 0) -> SimulatedEvaluator:
        return cls({offer.name: offer.spec for offer in offers}, seed)

    def __call__(self, spec: ModelDeploymentSpec, plan: Plan) -> float:
        return self.run(spec, plan).attainment()

    def run(self, spec: ModelDeploymentSpec, plan: Plan) -> RunResult:
        """The simulation behind the score (for reports and tests)."""
        rate = spec.traffic.request_rate_per_second
        duration_s = min(self.max_duration_s, max(self.min_duration_s, self.requests / rate))
        rng = np.random.default_rng([self.seed, 23])
        workload = synthetic_workload(spec.traffic, duration_s, rng)
        setup = DeploymentSetup(
            "evaluated",
            spec,
            plan,
            plan_schedulers(plan, spec.model.architecture.max_context_tokens),
            DispatchPolicy.LEAST_TOKENS,
        )
        cluster = self._cluster_for(plan)
        return Simulation(cluster, [setup], [workload], SimConfig(seed=self.seed)).run()

    def _cluster_for(self, plan: Plan) -> Cluster:
        nodes = {
            name: math.ceil(count / self.classes[name].accelerators_per_node)
            for name, count in plan.devices_by_class().items()
        }
        return Cluster("evaluation", dict(self.classes), nodes, kv_link_gbps=self.kv_link_gbps)
