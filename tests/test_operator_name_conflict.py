"""Two ModelDeployments whose children would share a name, with the real operator and server.

`x` (disaggregated) has the headless prefill Service `x-prefill`, which is also the entry
Service of a ModelDeployment named `x-prefill`. Whoever holds the name keeps it; the other
reports Degraded/NameConflict naming both and applies nothing, and takes the name once its
holder lets it go (here: `x` is deleted and the garbage collector removes its children).
"""

from __future__ import annotations

from typing import Any

from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    operator_fixture,
    wait_for,
)

CHILDREN = "app.kubernetes.io/managed-by=tessera,tessera.dev/deployment={}"


GARBAGE_COLLECTED_S = 60.0
"""The real garbage collector may notice an owner's deletion only at its next resource sync."""


def degraded(
    cluster: Cluster, namespace: str, name: str, reason: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    """The ModelDeployment once its Degraded condition has `reason` for its generation."""

    def probe() -> dict[str, Any] | None:
        md = cluster.get_md(namespace, name) or {}
        status = md.get("status") or {}
        found = {c["type"]: c for c in status.get("conditions") or []}
        generation = md.get("metadata", {}).get("generation")
        if status.get("observedGeneration") != generation:
            return None
        return md if found.get("Degraded", {}).get("reason") == reason else None

    return wait_for(probe, f"{namespace}/{name} Degraded reason {reason}", timeout_s)


def service_owner(cluster: Cluster, namespace: str, name: str) -> str | None:
    for service in cluster.services(namespace):
        if service["metadata"]["name"] == name:
            refs = service["metadata"].get("ownerReferences") or []
            return next((ref["uid"] for ref in refs if ref.get("controller")), None)
    return None


def test_x_and_x_prefill_never_take_each_others_service(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    ns = namespace.name
    namespace.create_classes()
    x = cluster.create_md(ns, namespace.chat_deployment("x", servingMode="disaggregated"))
    degraded(cluster, ns, "x", "PlanApplied")
    wait_for(lambda: service_owner(cluster, ns, "x-prefill") == x["metadata"]["uid"] or None,
             "x's prefill Service")  # fmt: skip

    other = cluster.create_md(ns, namespace.chat_deployment("x-prefill", servingMode="colocated"))
    conflicted = degraded(cluster, ns, "x-prefill", "NameConflict")
    condition = {c["type"]: c for c in conflicted["status"]["conditions"]}["Degraded"]
    assert "Service/x-prefill belongs to ModelDeployment x " in condition["message"]
    assert "ModelDeployment x-prefill " in condition["message"]
    assert cluster.deployments(ns, CHILDREN.format("x-prefill")) == [], "nothing is applied"
    assert service_owner(cluster, ns, "x-prefill") == x["metadata"]["uid"]
    held = degraded(cluster, ns, "x", "PlanApplied")
    assert held["status"]["plan"]["mode"] == "disaggregated"

    # `x` goes; once the garbage collector removed its Service, x-prefill takes the name.
    cluster.delete_md(ns, "x")
    degraded(cluster, ns, "x-prefill", "PlanApplied", GARBAGE_COLLECTED_S)
    wait_for(
        lambda: service_owner(cluster, ns, "x-prefill") == other["metadata"]["uid"] or None,
        "x-prefill's own entry Service",
    )
    assert cluster.deployments(ns, CHILDREN.format("x-prefill"))
