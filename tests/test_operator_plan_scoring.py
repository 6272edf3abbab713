"""The operator simulates the planner's cheapest candidates when given a PlanScorer: the status
shows the simulated attainment, and reconciles that change nothing reuse the cached scores."""

from __future__ import annotations

from typing import Any

from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    wait_for,
)
from tessera.api.model_deployment import ModelDeploymentSpec
from tessera.operator.plan_scoring import PlanScorer
from tessera.policies.placement import plan_deployment
from tessera.sim.evaluate import SimulatedEvaluator


def test_status_shows_the_simulated_attainment_and_scores_are_reused(
    cluster: Cluster, namespace: Namespace
) -> None:
    scorer = PlanScorer()
    operator = OperatorThread(cluster, namespace.name, scorer).start()
    try:
        namespace.create_classes("l40s", "a100")
        document = namespace.chat_deployment()
        cluster.create_md(namespace.name, document)

        def planned() -> dict[str, Any] | None:
            md = cluster.get_md(namespace.name, "chat")
            plan = ((md or {}).get("status") or {}).get("plan")
            return plan if plan and plan.get("simulatedAttainment") is not None else None

        plan = wait_for(planned, "a plan with a simulated attainment in status")
        spec = ModelDeploymentSpec.model_validate(document["spec"])
        offers = namespace.offers(None)
        expected = plan_deployment(spec, offers, SimulatedEvaluator.for_offers(offers))
        assert plan == expected.to_wire()
        assert "simulated attainment" in plan["rationale"]
        simulations = scorer.simulations
        assert simulations >= 1

        # A reconcile with nothing changed (a child deleted by hand) plans again, from cache.
        cluster.core.delete_namespaced_service("chat", namespace.name, _preload_content=False)

        def recreated() -> bool | None:
            names = {s["metadata"]["name"] for s in cluster.services(namespace.name, None)}
            return True if "chat" in names else None

        wait_for(recreated, "Service/chat re-created by a reconcile")
        assert scorer.simulations == simulations
    finally:
        operator.stop()
