"""Simulated scoring of candidate plans for the operator's planner, remembered across reconciles.

The planner simulates its cheapest candidates (`tessera.sim.evaluate.SimulatedEvaluator`)
before choosing. A reconcile re-plans every time it runs (child deleted, status written,
resume), and the same classes, spec and candidate always simulate to the same attainment (the
run is seeded), so the operator keeps the scores: only a change of spec, classes or free
capacity costs a simulation.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from threading import Lock

from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.policies.placement import PlanEvaluator
from tessera.sim.evaluate import SimulatedEvaluator

MAX_SCORES = 1024
"""Scores kept (least recently used dropped): a few per deployment and class set."""


class PlanScorer:
    """Hands the planner an evaluator for a set of classes; caches what it measured."""

    def __init__(self, max_scores: int = MAX_SCORES) -> None:
        self._scores: OrderedDict[str, float] = OrderedDict()
        self._max_scores = max_scores
        self._lock = Lock()
        self.simulations = 0
        """Simulations run (the rest were answered from the cache)."""

    def evaluator(self, classes: Mapping[str, AcceleratorClassSpec]) -> PlanEvaluator:
        simulated = SimulatedEvaluator(dict(classes))

        def evaluate(spec: ModelDeploymentSpec, plan: Plan) -> float:
            key = _key(classes, spec, plan)
            with self._lock:
                if key in self._scores:
                    self._scores.move_to_end(key)
                    return self._scores[key]
            score = simulated(spec, plan)
            with self._lock:
                self.simulations += 1
                self._scores[key] = score
                while len(self._scores) > self._max_scores:
                    self._scores.popitem(last=False)
            return score

        return evaluate


def _key(classes: Mapping[str, AcceleratorClassSpec], spec: ModelDeploymentSpec, plan: Plan) -> str:
    used = sorted(plan.devices_by_class())
    return json.dumps(
        {
            "classes": {name: classes[name].model_dump(mode="json") for name in used},
            "spec": spec.model_dump(mode="json"),
            "pools": [pool.model_dump(mode="json") for pool in plan.pools],
        },
        sort_keys=True,
    )
