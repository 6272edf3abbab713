"""What the RebalancePolicy controller tests (plain pods, KubeVirt VMs) share: creating the
policy, reading its status, the live pods a move is judged by, removing the policy and its
Events."""

from __future__ import annotations

import contextlib
from typing import Any

from kubernetes.client.exceptions import ApiException
from node_standins import pods
from operator_fixtures import Cluster
from tessera.api.common import GROUP, VERSION
from tessera.operator.rebalance_controller import REBALANCE_POLICIES, RebalanceController
from tessera.operator.reconcile import Kube


def policy_name(ns: str) -> str:
    """The test's RebalancePolicy (cluster-scoped), named after its namespace."""
    return f"rb-{ns}"


def policy_status(cluster: Cluster, ns: str) -> dict[str, Any]:
    body = cluster.custom.get_cluster_custom_object(
        GROUP, VERSION, REBALANCE_POLICIES, policy_name(ns)
    )
    return dict(body.get("status") or {})


def live_pods(cluster: Cluster, ns: str) -> dict[str, str]:
    """Pods not being deleted: name -> uid (a moved pod comes back under a new uid)."""
    return {
        p.metadata.name: p.metadata.uid
        for p in pods(cluster.core, ns)
        if p.metadata.deletion_timestamp is None
    }


def delete_policy(cluster: Cluster, ns: str) -> None:
    """Remove the test's policy and the Events it wrote (in `default`), whatever is left."""
    with contextlib.suppress(ApiException):
        cluster.custom.delete_cluster_custom_object(
            GROUP, VERSION, REBALANCE_POLICIES, policy_name(ns)
        )
    with contextlib.suppress(ApiException):
        cluster.core.delete_collection_namespaced_event(
            "default", field_selector=f"involvedObject.name={policy_name(ns)}"
        )


def create_policy(
    cluster: Cluster,
    ns: str,
    node_selector: dict[str, str],
    budget: int,
    dry_run: bool,
    movable: dict[str, Any],
) -> tuple[RebalanceController, dict[str, Any]]:
    """Create the test's RebalancePolicy over `node_selector`'s nodes (any improvement counts)
    and a controller for it that posts its Events in `default`; the controller and the object."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RebalancePolicy",
        "metadata": {"name": policy_name(ns)},
        "spec": {
            "nodeSelector": node_selector,
            "moveBudget": budget,
            "minImprovement": 0.0,
            "dryRun": dry_run,
            "movable": movable,
        },
    }
    created = cluster.custom.create_cluster_custom_object(GROUP, VERSION, REBALANCE_POLICIES, body)
    controller = RebalanceController(
        policy_name(ns), Kube(cluster.api_client), events_namespace="default"
    )
    return controller, dict(created)
