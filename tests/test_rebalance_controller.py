"""The RebalancePolicy controller against the real API server: snapshot, evictions, status.

Four 8-GPU Nodes (API objects, node_standins) each run three 2-GPU pods of their own
ReplicaSet (bound by `nodeName`): 8 GPUs free in pairs, no room for a 4-GPU replica. The test
plays the kubelet (pods Running and Ready, so the Eviction API applies their PDBs) and the
disruption controller, which this control plane does not run (it writes each PDB's status).
A round is `RebalanceController.round()`, the daemon's body, called directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from node_standins import GpuNodes, KubeletStandIn, pods
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    cluster_fixture,
    namespace_fixture,
    real_server_only,
    wait_for,
)
from rebalance_support import create_policy, delete_policy, live_pods, policy_status
from tessera.operator.rebalance_controller import (
    POLICY_VERSIONS,
    RebalanceController,
)

pytestmark = real_server_only(
    "the ReplicaSet controller creating the pods, and the Eviction API (pods/eviction) checking "
    "PDBs; the emulator runs no controllers and has no eviction subresource"
)

POOL_LABEL = "tessera.dev/test-pool"
NODES = ("a", "b", "c", "d")


@pytest.fixture(name="fleet")
def fleet_fixture(cluster: Cluster, namespace: Namespace) -> Iterator[dict[str, Any]]:
    """The nodes, ReplicaSets, Running pods and PDBs of the scenario."""
    ns = namespace.name
    nodes = GpuNodes(cluster.core)
    kubelet = KubeletStandIn(cluster.core)
    policy_version = _policy_version(cluster)
    try:
        for n in NODES:
            nodes.create(f"{ns}-{n}", {POOL_LABEL: ns}, {"nvidia.com/gpu": "8"})
            cluster.apps.create_namespaced_replica_set(ns, _replica_set(ns, n))
        for n in NODES:
            wait_for(lambda n=n: len(pods(cluster.core, ns, f"app=rs-{n}")) == 3, f"pods of rs-{n}")
        kubelet.mark_ready(ns, [p.metadata.name for p in pods(cluster.core, ns)])
        # The replica that fits nowhere: the shape the rebalancer makes room for.
        cluster.core.create_namespaced_pod(ns, _pod(ns, "waiting", gpus="4"))
        # rs-a may not be disrupted at all; the others once each.
        for n in NODES:
            _create_pdb(cluster, policy_version, ns, n, allowed=0 if n == "a" else 1)
        yield {"namespace": ns, "policy_version": policy_version}
    finally:
        delete_policy(cluster, ns)
        for n in NODES:
            with contextlib.suppress(ApiException):
                cluster.apps.delete_namespaced_replica_set(f"rs-{n}", ns)
        kubelet.remove_all(ns)
        nodes.delete()


def _policy_version(cluster: Cluster) -> str:
    groups = client.ApisApi(cluster.api_client).get_api_versions().groups
    served = {v.version for g in groups if g.name == "policy" for v in g.versions}
    return next(v for v in POLICY_VERSIONS if v in served)


def _pod(ns: str, name: str, gpus: str, node: str | None = None) -> dict[str, Any]:
    resources = {"nvidia.com/gpu": gpus, "cpu": "1", "memory": "1Gi"}
    spec: dict[str, Any] = {
        "tolerations": [{"operator": "Exists"}],
        "containers": [
            {
                "name": "work",
                "image": "registry.invalid/work:1",
                "resources": {"requests": resources, "limits": resources},
            }
        ],
    }
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def _replica_set(ns: str, node: str) -> dict[str, Any]:
    template = _pod(ns, "", "2", f"{ns}-{node}")
    template["metadata"] = {"labels": {"app": f"rs-{node}"}}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": f"rs-{node}", "namespace": ns},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": f"rs-{node}"}},
            "template": template,
        },
    }


def _create_pdb(cluster: Cluster, version: str, ns: str, node: str, allowed: int) -> None:
    body = {
        "apiVersion": f"policy/{version}",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"pdb-{node}", "namespace": ns},
        "spec": {"maxUnavailable": allowed, "selector": {"matchLabels": {"app": f"rs-{node}"}}},
    }
    created = cluster.custom.create_namespaced_custom_object(
        "policy", version, ns, "poddisruptionbudgets", body
    )
    status = {
        "observedGeneration": created["metadata"].get("generation", 1),
        "disruptionsAllowed": allowed,
        "currentHealthy": 3,
        "desiredHealthy": 3 - allowed,
        "expectedPods": 3,
    }
    cluster.custom.patch_namespaced_custom_object_status(
        "policy", version, ns, "poddisruptionbudgets", f"pdb-{node}", {"status": status}
    )


def _policy(cluster: Cluster, ns: str, budget: int, dry_run: bool) -> RebalanceController:
    movable = {"excludePriorities": []}
    controller, _ = create_policy(cluster, ns, {POOL_LABEL: ns}, budget, dry_run, movable)
    return controller


def test_dry_run_reports_moves_and_changes_nothing(cluster: Cluster, fleet: dict[str, Any]) -> None:
    ns = fleet["namespace"]
    before = live_pods(cluster, ns)
    interval = _policy(cluster, ns, budget=2, dry_run=True).round()
    assert interval == 300.0
    status = policy_status(cluster, ns)
    assert [m["result"] for m in status["moves"]] == ["Planned", "Planned"]
    assert status["movesLastRound"] == 2
    assert status["fragmentationAfter"] < status["fragmentationBefore"]
    assert status["nextRoundTime"] > status["lastRoundTime"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "DryRun")
    assert live_pods(cluster, ns) == before
    events = cluster.core.list_namespaced_event(
        "default", field_selector=f"involvedObject.name=rb-{ns}"
    ).items
    assert [e.reason for e in events] == ["DryRun"]
    assert "would move 2 pod(s)" in events[0].message


def test_evictions_respect_pdbs_and_the_move_budget(
    cluster: Cluster, fleet: dict[str, Any]
) -> None:
    ns = fleet["namespace"]
    before = live_pods(cluster, ns)
    _policy(cluster, ns, budget=2, dry_run=False).round()
    status = policy_status(cluster, ns)
    moves = status["moves"]
    assert 1 <= len(moves) <= 2
    assert all(m["result"] == "Evicted" for m in moves), moves
    assert status["movesLastRound"] == len(moves)
    moved = {m["pod"] for m in moves}
    # No pod of rs-a (its PDB allows nothing) and at most one per other ReplicaSet.
    owners = [name.rsplit("-", 1)[0] for name in moved]
    assert "rs-a" not in owners and len(set(owners)) == len(owners)
    live = live_pods(cluster, ns)
    assert not moved & set(live), "evicted pods are terminating or gone"
    assert {p for p in before if p not in moved} <= set(live)
    # The API server spent the PDBs' disruptions on exactly these pods.
    for owner in owners:
        pdb = cluster.custom.get_namespaced_custom_object(
            "policy", fleet["policy_version"], ns, "poddisruptionbudgets", f"pdb-{owner[3:]}"
        )
        assert pdb["status"]["disruptionsAllowed"] == 0
