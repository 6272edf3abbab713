"""The real operator (kopf, in a thread) against an API server over HTTP.

The server is the local control plane (tests/kube_control_plane.py), kmock's emulator with the
pieces of tests/kube_emulator.py (TESSERA_TEST_SERVER=emulator), or the cluster of
$TESSERA_TEST_KUBECONFIG. The tests drive it with the official `kubernetes` client only.

Expected plans are computed here with the planner on the same classes, never written down, so a
change to the planner changes what is expected, not whether the test passes.

What each server shows, and how the tests deal with it:
- On the real control plane (the default) the garbage collector, the deployment and replicaset
  controllers and the scheduler are real; no kubelet runs, so where a test needs ready
  replicas it plays the kubelet for their pods (tests/node_standins.py) and says so.
- On the emulator, garbage collection of children on delete is emulated (ownerReferences, as
  the real GC reads them): a wrong owner uid fails the delete test on both servers.
- No-op server-side apply keeps resourceVersion on both servers; the idempotency test asserts
  uid, generation and resourceVersion of every child are unchanged (a real cluster's deployment
  controller writes Deployment status, so there a Deployment's resourceVersion is not compared).
- Nobody runs pods on the emulator: the readiness test writes Deployment status there as the
  deployment controller would.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import free_port
from kubernetes import client
from node_standins import GpuNodes, KubeletStandIn, pods
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    DEADLINE_S,
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    operator_fixture,
    wait_for,
)
from operator_process import OperatorProcess, http_get
from prometheus_client import REGISTRY
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.operator.handlers import KOPF_PREFIX
from tessera.operator.reconcile import plan_summary
from tessera.operator.render import CONFIG_HASH_ANNOTATION, is_disaggregated
from tessera.policies.placement import InfeasiblePlanError, plan_deployment

CHILDREN = "app.kubernetes.io/managed-by=tessera,tessera.dev/deployment={}"
LLAMA_405B = {
    "numLayers": 126,
    "hiddenSize": 16384,
    "numAttentionHeads": 128,
    "numKeyValueHeads": 8,
    "headDim": 128,
    "intermediateSize": 53248,
    "vocabSize": 128256,
    "dtype": "bf16",
    "maxContextTokens": 8192,
}


# --- helpers ----------------------------------------------------------------------------------


def local_plan(namespace: Namespace, document: dict[str, Any], **free: int) -> Plan:
    spec = ModelDeploymentSpec.model_validate(document["spec"])
    return plan_deployment(spec, namespace.offers(free or None))


def conditions(md: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (md.get("status") or {}).get("conditions") or []}


def settled(
    cluster: Cluster, namespace: str, name: str, generation: int, reason: str | None = None
) -> dict[str, Any]:
    """The ModelDeployment once its status describes `generation` (and Degraded has `reason`)."""

    def probe() -> dict[str, Any] | None:
        md = cluster.get_md(namespace, name)
        if md is None or (md.get("status") or {}).get("observedGeneration") != generation:
            return None
        degraded = conditions(md).get("Degraded", {})
        if reason is not None and degraded.get("reason") != reason:
            return None
        return md

    return wait_for(probe, f"{namespace}/{name} status for generation {generation} ({reason})")


def children(cluster: Cluster, namespace: str, name: str = "chat") -> dict[str, Any]:
    """`Kind/name` -> object of every child the operator labels as this deployment's."""
    selector = CHILDREN.format(name)
    found: dict[str, Any] = {}
    for deployment in cluster.deployments(namespace, selector):
        found[f"Deployment/{deployment['metadata']['name']}"] = deployment
    for service in cluster.services(namespace, selector):
        found[f"Service/{service['metadata']['name']}"] = service
    return found


def expected_children(plan: Plan, name: str = "chat") -> set[str]:
    names = {f"Deployment/{name}-{pool.name}" for pool in plan.pools}
    names.add(f"Service/{name}")
    if is_disaggregated(plan):
        names |= {f"Deployment/{name}-router", f"Service/{name}-prefill", f"Service/{name}-decode"}
    return names


def fingerprints(found: dict[str, Any], emulated: bool) -> dict[str, tuple[Any, ...]]:
    """What must not move when the operator changes nothing: uid, generation, resourceVersion.

    On a real cluster the deployment controller writes Deployment status (a new
    resourceVersion, same generation) whatever the operator does, so there a Deployment's
    resourceVersion is left out; a Service's is kept (no controller writes a ClusterIP Service).
    """
    result: dict[str, tuple[Any, ...]] = {}
    for key, obj in found.items():
        meta = obj["metadata"]
        version = meta["resourceVersion"]
        if not emulated and key.startswith("Deployment/"):
            version = None
        result[key] = (meta["uid"], meta.get("generation"), version)
    return result


def event_reasons(cluster: Cluster, namespace: str, name: str) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    for event in cluster.events(namespace, name):
        reasons.setdefault(event.get("reason", ""), []).append(event.get("message", ""))
    return reasons


def wait_event(cluster: Cluster, namespace: str, name: str, reason: str) -> list[str]:
    return wait_for(
        lambda: event_reasons(cluster, namespace, name).get(reason),
        f"a {reason} event on {namespace}/{name}",
    )


def reconciles(outcome: str) -> float:
    value = REGISTRY.get_sample_value("tessera_operator_reconciles_total", {"outcome": outcome})
    return value or 0.0


def requires_real_server(cluster: Cluster, why: str) -> None:
    if cluster.emulated:
        pytest.skip(f"real server only: {why}")


# --- create, readiness ------------------------------------------------------------------------


def test_create_applies_a_workload_per_pool_a_service_and_status(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("h100", "a100", "l40s")
    document = namespace.chat_deployment()
    created = cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    plan = local_plan(namespace, document)
    assert md["status"]["plan"] == plan.to_wire()
    assert md["status"]["endpoint"] == f"http://chat.{namespace.name}.svc:8000"

    found = children(cluster, namespace.name)
    assert set(found) == expected_children(plan)
    assert len(cluster.deployments(namespace.name)) == len(plan.pools) + is_disaggregated(plan)
    for pool in plan.pools:
        deployment = found[f"Deployment/chat-{pool.name}"]
        labels = deployment["metadata"]["labels"]
        assert deployment["spec"]["replicas"] == pool.replicas
        assert labels["tessera.dev/role"] == pool.role.value
        assert labels["tessera.dev/accelerator-class"] == pool.accelerator_class
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": str(pool.tensor_parallel)}
        assert CONFIG_HASH_ANNOTATION in deployment["metadata"]["annotations"]
    for obj in found.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "tessera.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": "chat",
            "uid": created["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    entry = found["Service/chat"]
    entry_role = "router" if is_disaggregated(plan) else "colocated"
    assert entry["spec"]["selector"] == {
        "tessera.dev/deployment": "chat",
        "tessera.dev/role": entry_role,
    }

    state = conditions(md)
    assert (state["Ready"]["status"], state["Ready"]["reason"]) == ("False", "ReplicasNotReady")
    assert (state["Progressing"]["status"], state["Progressing"]["reason"]) == (
        "True",
        "RollingOut",
    )
    assert state["Degraded"]["status"] == "False"
    assert state["Degraded"]["message"] == plan.rationale
    assert wait_event(cluster, namespace.name, "chat", "PlanApplied") == [plan_summary(plan)]


@pytest.fixture(name="gpu_nodes")
def gpu_nodes_fixture(cluster: Cluster, namespace: Namespace) -> Iterator[GpuNodes]:
    """Nodes this test creates (real server: the scheduler binds to them); removed after it,
    with the namespace's pods (nothing else would ever confirm a bound pod's deletion)."""
    nodes = GpuNodes(cluster.core)
    try:
        yield nodes
    finally:
        if not cluster.emulated:
            KubeletStandIn(cluster.core).remove_all(namespace.name)
        nodes.delete()


def node_class(namespace: Namespace, gpu_nodes: GpuNodes, count: int, gpus: int) -> str:
    """The l40s class under a node selector only this test's `count` Nodes carry."""
    selector = {"tessera.dev/accelerator": f"l40s-{namespace.name}"}
    namespace.create_classes("l40s", l40s={"nodeSelector": selector})
    for index in range(count):
        gpu_nodes.create(f"gpu-{index}-{namespace.name}", selector, {"nvidia.com/gpu": str(gpus)})
    return namespace.classes["l40s"]


def mark_deployment_ready(
    cluster: Cluster, namespace: str, deployment: dict[str, Any], ready: int
) -> None:
    """`ready` of the Deployment's replicas become ready: on the emulator its status is written
    as the deployment controller would; on a real server the test plays the kubelet for `ready`
    of its pods and the real ReplicaSet and Deployment controllers count them."""
    replicas = deployment["spec"]["replicas"]
    name = deployment["metadata"]["name"]
    if cluster.emulated:
        cluster.patch_deployment_status(
            namespace,
            name,
            {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
            },
        )
        return
    selector = ",".join(
        f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items()
    )

    def bound() -> list[client.V1Pod] | None:
        found = [p for p in pods(cluster.core, namespace, selector) if p.spec.node_name]
        return found if len(found) >= replicas else None

    found = wait_for(bound, f"the scheduler to bind {replicas} pods of {name}", timeout_s=60.0)
    KubeletStandIn(cluster.core).mark_ready(namespace, [p.metadata.name for p in found[:ready]])


def test_ready_when_the_workloads_report_ready_replicas(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread, gpu_nodes: GpuNodes
) -> None:
    node_class(namespace, gpu_nodes, count=8, gpus=8)
    cluster.create_md(namespace.name, namespace.chat_deployment())
    md = settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    degraded_since = conditions(md)["Degraded"]["lastTransitionTime"]
    deployments = cluster.deployments(namespace.name, CHILDREN.format("chat"))
    for index, deployment in enumerate(deployments):
        replicas = deployment["spec"]["replicas"]
        ready = replicas if index else replicas - 1  # the first pool is one replica short
        mark_deployment_ready(cluster, namespace.name, deployment, ready)
    total = sum(d["spec"]["replicas"] for d in deployments)

    def ready_replicas(expected: int, ready: str) -> dict[str, Any] | None:
        current = cluster.get_md(namespace.name, "chat") or {}
        state = conditions(current)
        if current.get("status", {}).get("readyReplicas") != expected:
            return None
        return current if state["Ready"]["status"] == ready else None

    timeout_s = DEADLINE_S if cluster.emulated else 60.0
    partial = wait_for(
        lambda: ready_replicas(total - 1, "False"), "readyReplicas one short", timeout_s
    )
    assert conditions(partial)["Progressing"]["status"] == "True"
    first = deployments[0]
    mark_deployment_ready(cluster, namespace.name, first, first["spec"]["replicas"])
    md = wait_for(lambda: ready_replicas(total, "True"), "Ready=True with all replicas", timeout_s)
    state = conditions(md)
    assert (state["Progressing"]["status"], state["Progressing"]["reason"]) == (
        "False",
        "RolloutComplete",
    )
    assert state["Degraded"]["lastTransitionTime"] == degraded_since


def test_the_scheduler_binds_each_replica_to_a_node_of_its_class_within_its_gpus(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread, gpu_nodes: GpuNodes
) -> None:
    requires_real_server(cluster, "only a real scheduler binds pods to Nodes")
    node_class(namespace, gpu_nodes, count=2, gpus=4)
    cluster.create_md(namespace.name, namespace.chat_deployment(servingMode="colocated"))
    settled(cluster, namespace.name, "chat", 1)
    ours = set(gpu_nodes.names)

    def bound() -> list[client.V1Pod] | None:
        found = pods(cluster.core, namespace.name)
        if not found or any(not p.spec.node_name for p in found if fits_somewhere(p)):
            return None
        return found

    def fits_somewhere(pod: client.V1Pod) -> bool:
        return gpus_of(pod) <= 4

    found = wait_for(bound, "the scheduler to bind every pod that fits", timeout_s=60.0)
    used: dict[str, int] = {}
    for pod in found:
        if pod.spec.node_name:
            assert pod.spec.node_name in ours, "bound outside the class's node selector"
            used[pod.spec.node_name] = used.get(pod.spec.node_name, 0) + gpus_of(pod)
    assert used and all(total <= 4 for total in used.values()), used


def gpus_of(pod: client.V1Pod) -> int:
    return sum(
        int((c.resources.requests or {}).get("nvidia.com/gpu", 0)) for c in pod.spec.containers
    )


# --- updates ----------------------------------------------------------------------------------


def test_more_traffic_scales_the_pool_in_place(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    document = namespace.chat_deployment(servingMode="colocated")
    cluster.create_md(namespace.name, document)
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    before = children(cluster, namespace.name)
    plan = local_plan(namespace, document)

    busier = copy.deepcopy(document)
    busier["spec"]["traffic"]["requestRatePerSecond"] *= 6
    bigger = local_plan(namespace, busier)
    assert [p.name for p in bigger.pools] == [p.name for p in plan.pools]
    assert bigger.pools[0].replicas > plan.pools[0].replicas, "the test needs a scale-up"
    cluster.patch_md(namespace.name, "chat", {"spec": {"traffic": busier["spec"]["traffic"]}})
    md = settled(cluster, namespace.name, "chat", 2, "PlanApplied")
    assert md["status"]["plan"] == bigger.to_wire()

    after = children(cluster, namespace.name)
    assert set(after) == set(before) == expected_children(bigger)
    for key, obj in after.items():
        uid = obj["metadata"]["uid"]
        assert uid == before[key]["metadata"]["uid"], f"{key} was replaced, not updated"
    (workload,) = [obj for key, obj in after.items() if key.startswith("Deployment/")]
    assert workload["spec"]["replicas"] == bigger.pools[0].replicas
    assert len(cluster.deployments(namespace.name)) == 1


def test_serving_mode_change_replaces_pools_without_orphans(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment(servingMode="colocated")
    cluster.create_md(namespace.name, document)
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    colocated = local_plan(namespace, document)
    assert set(children(cluster, namespace.name)) == expected_children(colocated)

    split = copy.deepcopy(document)
    split["spec"]["servingMode"] = "disaggregated"
    split_plan = local_plan(namespace, split)
    cluster.patch_md(namespace.name, "chat", {"spec": {"servingMode": "disaggregated"}})
    md = settled(cluster, namespace.name, "chat", 2, "PlanApplied")
    assert md["status"]["plan"] == split_plan.to_wire()
    found = children(cluster, namespace.name)
    assert set(found) == expected_children(split_plan)
    assert {d["metadata"]["name"] for d in cluster.deployments(namespace.name)} == {
        f"chat-{p.name}" for p in split_plan.pools
    } | {"chat-router"}
    assert found["Service/chat"]["spec"]["selector"]["tessera.dev/role"] == "router"
    pruned = wait_event(cluster, namespace.name, "chat", "Pruned")
    assert any(f"Deployment/chat-{colocated.pools[0].name}" in message for message in pruned)

    cluster.patch_md(namespace.name, "chat", {"spec": {"servingMode": "colocated"}})
    settled(cluster, namespace.name, "chat", 3, "PlanApplied")
    assert set(children(cluster, namespace.name)) == expected_children(colocated)
    assert {s["metadata"]["name"] for s in cluster.services(namespace.name)} == {"chat"}


def test_a_disaggregated_deployment_is_served_through_its_router(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    """The endpoint of a disaggregated ModelDeployment is the router: its Deployment runs
    `tessera router` over the pools' headless Services, the entry Service selects its pods
    only, and all of them carry the ModelDeployment's owner reference (the garbage collector
    removes them with it)."""
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment(servingMode="disaggregated")
    created = cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    plan = local_plan(namespace, document)
    assert is_disaggregated(plan), "the test needs a plan with prefill and decode pools"
    assert md["status"]["endpoint"] == f"http://chat.{namespace.name}.svc:8000"
    found = children(cluster, namespace.name)
    assert set(found) == expected_children(plan)
    owner = {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "chat",
        "uid": created["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for key in (
        "Deployment/chat-router",
        "Service/chat",
        "Service/chat-prefill",
        "Service/chat-decode",
    ):
        assert found[key]["metadata"]["ownerReferences"] == [owner], key
    router = found["Deployment/chat-router"]
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tessera", "router"]
    ns = namespace.name
    assert container["args"] == [
        f"--prefill-service=http://chat-prefill.{ns}.svc:8000",
        f"--decode-service=http://chat-decode.{ns}.svc:8000",
        "--port=8000",
    ]
    template = router["spec"]["template"]["metadata"]["labels"]
    entry = found["Service/chat"]["spec"]
    assert entry["selector"].items() <= template.items() and entry.get("clusterIP") != "None"
    for name, role in (("chat-prefill", "prefill"), ("chat-decode", "decode")):
        service = found[f"Service/{name}"]["spec"]
        assert service["clusterIP"] == "None", f"{name} must be headless"
        assert service["selector"] == {"tessera.dev/deployment": "chat", "tessera.dev/role": role}
    for pool in plan.pools:
        labels = found[f"Deployment/chat-{pool.name}"]["spec"]["template"]["metadata"]["labels"]
        assert not entry["selector"].items() <= labels.items(), "clients must not reach engines"
        if pool.role.value == "decode":
            (engine,) = found[f"Deployment/chat-{pool.name}"]["spec"]["template"]["spec"][
                "containers"
            ]
            assert f"--prefill-service=chat-prefill.{ns}.svc:8000" in engine["args"]


def test_accelerator_class_change_replans(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment(servingMode="colocated")
    cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    plan = local_plan(namespace, document)
    assert md["status"]["plan"] == plan.to_wire()

    used = next(
        name
        for name, unique in namespace.classes.items()
        if unique == plan.pools[0].accelerator_class
    )
    cost = namespace.class_specs[plan.pools[0].accelerator_class]["costPerHour"]
    namespace.patch_class(used, {"costPerHour": cost * 100})
    replanned = local_plan(namespace, document)
    assert replanned.pools[0].accelerator_class != plan.pools[0].accelerator_class

    def current_plan() -> dict[str, Any] | None:
        md = cluster.get_md(namespace.name, "chat") or {}
        return md if md.get("status", {}).get("plan") == replanned.to_wire() else None

    wait_for(current_plan, "the plan to move off the class that became expensive")
    wait_for(
        lambda: set(children(cluster, namespace.name)) == expected_children(replanned),
        "children of the new plan only",
    )


# --- delete -----------------------------------------------------------------------------------


def test_delete_removes_the_children(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    cluster.create_md(namespace.name, namespace.chat_deployment())
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    assert children(cluster, namespace.name)
    cluster.delete_md(namespace.name, "chat")
    wait_for(
        lambda: (
            cluster.get_md(namespace.name, "chat") is None
            and not cluster.deployments(namespace.name)
            and not cluster.services(namespace.name)
        ),
        "the ModelDeployment and its children to be gone",
        timeout_s=60.0 if not cluster.emulated else 20.0,
    )


def test_a_child_deleted_by_hand_is_put_back(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    document = namespace.chat_deployment()
    cluster.create_md(namespace.name, document)
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    before = children(cluster, namespace.name)
    workload = next(key for key in before if key.startswith("Deployment/"))
    cluster.apps.delete_namespaced_deployment(
        workload.split("/", 1)[1], namespace.name, _preload_content=False
    )
    cluster.core.delete_namespaced_service("chat", namespace.name, _preload_content=False)

    def replaced() -> dict[str, Any] | None:
        found = children(cluster, namespace.name)
        if set(found) != set(before):
            return None
        fresh = [
            key
            for key in (workload, "Service/chat")
            if found[key]["metadata"]["uid"] != before[key]["metadata"]["uid"]
        ]
        return found if len(fresh) == 2 else None

    wait_for(replaced, "the deleted Deployment and Service to be re-created")


# --- infeasible, invalid, dry run --------------------------------------------------------------


def test_infeasible_spec_is_degraded_with_the_planners_reason_and_creates_nothing(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    document = namespace.chat_deployment()
    document["spec"]["model"]["architecture"] = LLAMA_405B
    with pytest.raises(InfeasiblePlanError) as expected:
        local_plan(namespace, document)
    cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "Infeasible")
    state = conditions(md)
    assert state["Degraded"]["status"] == "True"
    assert state["Degraded"]["message"] == str(expected.value)
    assert state["Ready"]["status"] == "False"
    assert "plan" not in md["status"]
    assert children(cluster, namespace.name) == {}
    assert wait_event(cluster, namespace.name, "chat", "Infeasible") == [str(expected.value)]
    assert cluster.deployments(namespace.name) == []


def test_infeasible_update_keeps_the_running_plan(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    document = namespace.chat_deployment()
    cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    running = fingerprints(children(cluster, namespace.name), cluster.emulated)
    cluster.patch_md(namespace.name, "chat", {"spec": {"model": {"architecture": LLAMA_405B}}})
    degraded = settled(cluster, namespace.name, "chat", 2, "Infeasible")
    assert degraded["status"]["plan"] == md["status"]["plan"]
    assert conditions(degraded)["Progressing"]["reason"] == "Infeasible"
    assert fingerprints(children(cluster, namespace.name), cluster.emulated) == running


def test_invalid_spec_names_the_field_and_recovers_when_fixed(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s")
    document = namespace.chat_deployment()
    # max below mean: a cross-field rule of the models that the CRD schema cannot express.
    document["spec"]["traffic"] = {
        "requestRatePerSecond": 2,
        "promptTokens": {"mean": 1000, "max": 100},
        "outputTokens": {"mean": 100},
    }
    cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "InvalidSpec")
    message = conditions(md)["Degraded"]["message"]
    assert message.startswith("spec.traffic.promptTokens:"), message
    assert "max (100) must not be below mean (1000" in message
    assert children(cluster, namespace.name) == {}

    cluster.patch_md(namespace.name, "chat", {"spec": {"traffic": {"promptTokens": {"max": 4096}}}})
    settled(cluster, namespace.name, "chat", 2, "PlanApplied")
    fixed = copy.deepcopy(document)
    fixed["spec"]["traffic"]["promptTokens"]["max"] = 4096
    assert set(children(cluster, namespace.name)) == expected_children(local_plan(namespace, fixed))


def test_dry_run_reports_the_plan_and_never_touches_children(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment()
    document["metadata"]["annotations"] = {"tessera.dev/dry-run": "true"}
    cluster.create_md(namespace.name, document)
    md = settled(cluster, namespace.name, "chat", 1, "DryRun")
    plan = local_plan(namespace, document)
    assert md["status"]["plan"] == plan.to_wire()
    assert conditions(md)["Ready"]["reason"] == "DryRun"
    assert children(cluster, namespace.name) == {}
    assert wait_event(cluster, namespace.name, "chat", "DryRun") == [plan_summary(plan)]

    cluster.patch_md(
        namespace.name, "chat", {"metadata": {"annotations": {"tessera.dev/dry-run": None}}}
    )
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    applied = fingerprints(children(cluster, namespace.name), cluster.emulated)
    assert set(applied) == expected_children(plan)

    cluster.patch_md(
        namespace.name,
        "chat",
        {
            "metadata": {"annotations": {"tessera.dev/dry-run": "true"}},
            "spec": {"servingMode": "colocated"},
        },
    )
    md = settled(cluster, namespace.name, "chat", 2, "DryRun")
    colocated = copy.deepcopy(document)
    colocated["spec"]["servingMode"] = "colocated"
    assert md["status"]["plan"] == local_plan(namespace, colocated).to_wire()
    assert fingerprints(children(cluster, namespace.name), cluster.emulated) == applied


# --- idempotency and restarts -----------------------------------------------------------------


def test_reconciling_an_unchanged_spec_changes_nothing(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s", "a100")
    cluster.create_md(namespace.name, namespace.chat_deployment())
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    before = fingerprints(children(cluster, namespace.name), cluster.emulated)
    status = (cluster.get_md(namespace.name, "chat") or {})["status"]

    # An annotation the operator does not read: kopf sees a change and reconciles again.
    cluster.patch_md(
        namespace.name, "chat", {"metadata": {"annotations": {"example.com/touch": "1"}}}
    )
    handled = f"{KOPF_PREFIX}/last-handled-configuration"
    wait_for(
        lambda: (
            "example.com/touch"
            in (
                (cluster.get_md(namespace.name, "chat") or {})["metadata"].get("annotations") or {}
            ).get(handled, "")
        ),
        "kopf to handle the touched ModelDeployment",
    )
    assert fingerprints(children(cluster, namespace.name), cluster.emulated) == before
    assert (cluster.get_md(namespace.name, "chat") or {})["status"] == status

    # A restart resumes every deployment: the reconcile runs and again changes nothing.
    operator.stop()
    count = reconciles("PlanApplied")
    operator.start()
    wait_for(lambda: reconciles("PlanApplied") > count, "the resume reconcile")
    assert fingerprints(children(cluster, namespace.name), cluster.emulated) == before
    assert (cluster.get_md(namespace.name, "chat") or {})["status"] == status


def test_spec_changed_while_the_operator_is_down_converges_on_restart(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread
) -> None:
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment(servingMode="colocated")
    cluster.create_md(namespace.name, document)
    settled(cluster, namespace.name, "chat", 1, "PlanApplied")
    operator.stop()
    cluster.patch_md(namespace.name, "chat", {"spec": {"servingMode": "disaggregated"}})
    split = copy.deepcopy(document)
    split["spec"]["servingMode"] = "disaggregated"
    expected = local_plan(namespace, split)
    operator.start()
    md = settled(cluster, namespace.name, "chat", 2, "PlanApplied")
    assert md["status"]["plan"] == expected.to_wire()
    assert set(children(cluster, namespace.name)) == expected_children(expected)
    routers = is_disaggregated(expected)
    assert len(cluster.deployments(namespace.name)) == len(expected.pools) + routers


def test_an_operator_killed_mid_reconcile_converges_when_it_restarts(
    cluster: Cluster, namespace: Namespace, tmp_path: Path
) -> None:
    """SIGKILL `tessera operator` the moment the new plan's first Deployment appears, while the
    old plan's pools still stand; the restarted operator finishes the job: exactly the new
    plan's children, status at the new generation."""
    namespace.create_classes("l40s", "a100")
    document = namespace.chat_deployment(servingMode="colocated")
    env = {"TESSERA_WATCH_NAMESPACES": namespace.name}
    first = OperatorProcess(cluster, tmp_path, "first", env)
    try:
        cluster.create_md(namespace.name, document)
        settled(cluster, namespace.name, "chat", 1, "PlanApplied")
        old = set(children(cluster, namespace.name))
        cluster.patch_md(namespace.name, "chat", {"spec": {"servingMode": "disaggregated"}})

        def new_child_applied() -> set[str] | None:
            first.alive()
            found = set(children(cluster, namespace.name))
            return found if found - old else None

        seen = wait_for(new_child_applied, "the new plan's first child", every_s=0.005)
    finally:
        first.kill()
    mid_way = bool(seen & old)
    second = OperatorProcess(cluster, tmp_path, "second", env)
    try:
        md = settled(cluster, namespace.name, "chat", 2, "PlanApplied")
        # The command scores plans by simulation (the thread-run operator does not), so the
        # plan in force is the reference here.
        applied = Plan.model_validate(md["status"]["plan"])
        assert applied.mode.value == "disaggregated"
        wanted = expected_children(applied)
        wait_for(
            lambda: set(children(cluster, namespace.name)) == wanted,
            f"exactly the new plan's children (killed mid-way: {mid_way})",
        )
    finally:
        second.kill()
    assert mid_way, "the kill came after the old pools were pruned: not mid-reconcile"


# --- capacity ---------------------------------------------------------------------------------


def test_capacity_comes_from_nodes_less_other_deployments_plans(
    cluster: Cluster, namespace: Namespace, operator: OperatorThread, gpu_nodes: GpuNodes
) -> None:
    unique = node_class(namespace, gpu_nodes, count=1, gpus=1)
    first = namespace.chat_deployment("first", servingMode="colocated")
    first["spec"]["traffic"]["requestRatePerSecond"] = 2
    cluster.create_md(namespace.name, first)
    md = settled(cluster, namespace.name, "first", 1)
    plan = local_plan(namespace, first, **{unique: 1})
    assert md["status"]["plan"] == plan.to_wire()

    second = copy.deepcopy(first)
    second["metadata"]["name"] = "second"
    cluster.create_md(namespace.name, second)
    md = settled(cluster, namespace.name, "second", 1)
    left = max(0, 1 - plan.accelerators)
    try:
        expected = local_plan(namespace, second, **{unique: left})
    except InfeasiblePlanError as error:
        assert conditions(md)["Degraded"]["message"] == str(error)
    else:
        assert md["status"]["plan"] == expected.to_wire()


# --- the command line -------------------------------------------------------------------------


def test_tessera_operator_command_serves_a_namespace_with_probes_and_metrics(
    cluster: Cluster, namespace: Namespace, tmp_path: Path
) -> None:
    metrics_port, liveness_port = free_port(), free_port()
    command = [sys.executable, "-m", "tessera", "operator", "--standalone"]
    command += ["--kubeconfig", str(cluster.kubeconfig(tmp_path)), "-n", namespace.name]
    command += ["--metrics-port", str(metrics_port)]
    command += ["--bind", "127.0.0.1", "--health-port", str(liveness_port)]
    log = (tmp_path / "operator.log").open("w")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{liveness_port}/healthz") is not None,
            "the liveness endpoint",
        )
        namespace.create_classes("l40s")
        cluster.create_md(namespace.name, namespace.chat_deployment())
        settled(cluster, namespace.name, "chat", 1, "PlanApplied")
        metrics = wait_for(
            lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics"), "the metrics endpoint"
        )
        assert 'tessera_operator_reconciles_total{outcome="PlanApplied"}' in metrics
        assert "tessera_collector_" not in metrics, "no agents configured: no collector"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "operator.log").read_text()
    assert "Traceback" not in output, output
