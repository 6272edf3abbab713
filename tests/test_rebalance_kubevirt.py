"""The RebalancePolicy controller moves KubeVirt VMs by live migration, on the real API server.

The test installs minimal KubeVirt CRDs (VirtualMachineInstance and
VirtualMachineInstanceMigration, kubevirt.io/v1, schemas that keep every field) and plays
KubeVirt: each VMI is Running and LiveMigratable on its node, with its virt-launcher pod (owned
by the VMI, holding its GPUs) bound there and Running (the test plays the kubelet too). No
KubeVirt controller runs, so a migration object, once created, stays as the controller made it.

Two 8-GPU Nodes each hold a 4-GPU pod nothing re-creates (unmovable) and one 2-GPU VM: 2 GPUs
free on each, no room for the pending 4-GPU pod. One VM moving to the other node makes room.
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
    wait_for,
)
from rebalance_support import create_policy, delete_policy, live_pods, policy_status
from tessera.operator.rebalance_controller import (
    HOSTNAME_LABEL,
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    POLICY_LABEL,
    VMI_MIGRATIONS,
    VMI_NAME_LABEL,
    VMIS,
    RebalanceController,
)

POOL_LABEL = "tessera.dev/test-pool"
NODES = ("a", "b")
TEST_CRD_LABEL = "tessera.dev/test-kubevirt-crd"


def _crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{KUBEVIRT_GROUP}", "labels": {TEST_CRD_LABEL: "true"}},
        "spec": {
            "group": KUBEVIRT_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": KUBEVIRT_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module", name="kubevirt_crds")
def kubevirt_crds_fixture(cluster: Cluster) -> Iterator[None]:
    """KubeVirt's two CRDs, installed for this module and removed after it."""
    if cluster.emulated:
        pytest.skip("real server only: CRDs installed at run time")
    extensions = client.ApiextensionsV1Api(cluster.api_client)
    crds = [
        _crd("VirtualMachineInstance", VMIS),
        _crd("VirtualMachineInstanceMigration", VMI_MIGRATIONS),
    ]
    for crd in crds:
        try:
            found = extensions.read_custom_resource_definition(crd["metadata"]["name"])
        except ApiException as error:
            if error.status != 404:
                raise
        else:
            if TEST_CRD_LABEL not in (found.metadata.labels or {}):
                pytest.skip("KubeVirt is installed: its controllers would act on the test's VMs")
    created = []
    try:
        for crd in crds:
            with contextlib.suppress(ApiException):  # left by an interrupted run: reused
                extensions.create_custom_resource_definition(crd)
            created.append(crd["metadata"]["name"])
        for name in created:
            wait_for(lambda name=name: _established(extensions, name), f"CRD {name} established")
        yield
    finally:
        for name in created:
            with contextlib.suppress(ApiException):
                extensions.delete_custom_resource_definition(name)


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


def _vmi(ns: str, name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "vm"}},
        "spec": {
            "domain": {
                "devices": {"gpus": [{"name": "gpu0", "deviceName": "nvidia.com/gpu"}] * 2},
                "resources": {"requests": {"memory": "1Gi"}},
            }
        },
        "status": {
            "phase": "Running",
            "nodeName": node,
            "conditions": [{"type": "LiveMigratable", "status": "True"}],
        },
    }


def _pod(ns: str, name: str, node: str, gpus: str, owner: dict[str, Any] | None) -> dict:
    resources = {"nvidia.com/gpu": gpus, "cpu": "1", "memory": "1Gi"}
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if owner is not None:  # a virt-launcher pod, as KubeVirt makes it
        meta["labels"] = {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": owner["uid"]}
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}",
                "kind": "VirtualMachineInstance",
                "name": owner["name"],
                "uid": owner["uid"],
                "controller": True,
            }
        ]
    container = {
        "name": "compute",
        "image": "registry.invalid/virt-launcher:1",
        "resources": {"requests": resources, "limits": resources},
    }
    # No token to mount: a pod created right after its namespace would otherwise wait for the
    # token controller to give the namespace's default ServiceAccount one.
    spec = {"nodeName": node, "containers": [container], "automountServiceAccountToken": False}
    return {"metadata": meta, "spec": spec}


@pytest.fixture(name="vms")
def vms_fixture(
    cluster: Cluster, namespace: Namespace, kubevirt_crds: None
) -> Iterator[dict[str, Any]]:
    """The nodes, the unmovable pods, the VMIs and their launcher pods (Running)."""
    ns = namespace.name
    nodes = GpuNodes(cluster.core)
    kubelet = KubeletStandIn(cluster.core)
    launchers: dict[str, str] = {}
    try:
        for n in NODES:
            node = f"{ns}-{n}"
            labels = {POOL_LABEL: ns, HOSTNAME_LABEL: f"host-{node}"}
            nodes.create(node, labels, {"nvidia.com/gpu": "8"})
            cluster.core.create_namespaced_pod(ns, _pod(ns, f"fixed-{n}", node, "4", None))
            vmi = cluster.custom.create_namespaced_custom_object(
                KUBEVIRT_GROUP, KUBEVIRT_VERSION, ns, VMIS, _vmi(ns, f"vm-{n}", node)
            )
            owner = {"name": vmi["metadata"]["name"], "uid": vmi["metadata"]["uid"]}
            launcher = f"virt-launcher-vm-{n}-x1"
            cluster.core.create_namespaced_pod(ns, _pod(ns, launcher, node, "2", owner))
            launchers[f"vm-{n}"] = launcher
        kubelet.mark_ready(ns, [p.metadata.name for p in pods(cluster.core, ns)])
        waiting = _pod(ns, "waiting", "", "4", None)
        del waiting["spec"]["nodeName"]
        # Nothing fits it: no scheduler decision will change that during the test.
        waiting["spec"]["nodeSelector"] = {POOL_LABEL: ns}
        cluster.core.create_namespaced_pod(ns, waiting)
        yield {"namespace": ns, "launchers": launchers}
    finally:
        delete_policy(cluster, ns)
        for plural in (VMI_MIGRATIONS, VMIS):
            with contextlib.suppress(ApiException):
                cluster.custom.delete_collection_namespaced_custom_object(
                    KUBEVIRT_GROUP, KUBEVIRT_VERSION, ns, plural
                )
        kubelet.remove_all(ns)
        nodes.delete()


def _policy(
    cluster: Cluster, ns: str, dry_run: bool = False, **movable: Any
) -> tuple[RebalanceController, dict[str, Any]]:
    movable = {"kinds": ["Pod", "VirtualMachine"], "excludePriorities": [], **movable}
    return create_policy(cluster, ns, {POOL_LABEL: ns}, 2, dry_run, movable)


def _migrations(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    listed = cluster.custom.list_namespaced_custom_object(
        KUBEVIRT_GROUP, KUBEVIRT_VERSION, ns, VMI_MIGRATIONS
    )
    return list(listed["items"])


def test_a_vm_moves_by_a_migration_to_the_planned_node_not_by_eviction(
    cluster: Cluster, vms: dict[str, Any]
) -> None:
    ns = vms["namespace"]
    before = live_pods(cluster, ns)
    controller, policy = _policy(cluster, ns)
    controller.round()
    status = policy_status(cluster, ns)
    moves = status["moves"]
    assert len(moves) == 1, moves
    move = moves[0]
    assert (move["kind"], move["result"]) == ("VirtualMachineInstance", "Migrating"), move
    assert move["pod"] in ("vm-a", "vm-b")
    assert move["sourceNode"] == f"{ns}-{move['pod'][-1]}" != move["targetNode"]
    assert status["movesLastRound"] == 1
    assert status["fragmentationAfter"] < status["fragmentationBefore"]

    (migration,) = _migrations(cluster, ns)
    assert migration["metadata"]["name"] == move["migration"]
    assert migration["spec"]["vmiName"] == move["pod"]
    assert migration["spec"]["addedNodeSelector"] == {HOSTNAME_LABEL: f"host-{move['targetNode']}"}
    assert migration["metadata"]["labels"] == {
        POLICY_LABEL: f"rb-{ns}",
        VMI_NAME_LABEL: move["pod"],
    }
    (owner,) = migration["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "RebalancePolicy",
        f"rb-{ns}",
        policy["metadata"]["uid"],
    )
    # No pod was evicted: every pod, the launchers included, is still there, not terminating.
    assert live_pods(cluster, ns) == before

    # The next round sees the migration in flight and does not migrate that VM again.
    controller.round()
    again = [m["spec"]["vmiName"] for m in _migrations(cluster, ns)]
    assert again.count(move["pod"]) == 1, again
    assert live_pods(cluster, ns) == before


def test_a_dry_run_creates_no_migration(cluster: Cluster, vms: dict[str, Any]) -> None:
    ns = vms["namespace"]
    before = live_pods(cluster, ns)
    controller, _ = _policy(cluster, ns, dry_run=True)
    controller.round()
    moves = policy_status(cluster, ns)["moves"]
    assert [(m["kind"], m["result"]) for m in moves] == [("VirtualMachineInstance", "Planned")]
    assert _migrations(cluster, ns) == []
    assert live_pods(cluster, ns) == before


def test_without_live_migration_vms_stay(cluster: Cluster, vms: dict[str, Any]) -> None:
    ns = vms["namespace"]
    before = live_pods(cluster, ns)
    controller, _ = _policy(cluster, ns, useLiveMigration=False)
    controller.round()
    status = policy_status(cluster, ns)
    assert status["moves"] == []
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NothingToMove", ready
    assert _migrations(cluster, ns) == []
    assert live_pods(cluster, ns) == before
