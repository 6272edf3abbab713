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
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.policies.capacity import ClassOffer
from tessera.policies.dispatch import DispatchPolicy
from tessera.sim.cluster import Cluster
from tessera.sim.metrics import RunResult
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.workload import synthetic_workload

EVALUATION_REQUESTS = 1500
"""Requests one evaluation simulates: enough for a tail percentile, few enough to be quick."""


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
        # Each pool runs the engine scheduler its plan records (`PoolPlan.scheduler`).
        setup = DeploymentSetup("evaluated", spec, plan, dispatch=DispatchPolicy.LEAST_TOKENS)
        cluster = self._cluster_for(plan)
        return Simulation(cluster, [setup], [workload], SimConfig(seed=self.seed)).run()

    def _cluster_for(self, plan: Plan) -> Cluster:
        nodes = {
            name: math.ceil(count / self.classes[name].accelerators_per_node)
            for name, count in plan.devices_by_class().items()
        }
        return Cluster("evaluation", dict(self.classes), nodes, kv_link_gbps=self.kv_link_gbps)
