"""Kubernetes objects -> the rebalancer's snapshot (operator/rebalance_snapshot.py): what counts
as capacity, requests, requirement, movable, tier and PDB coverage."""

from __future__ import annotations

from typing import Any

from tessera.api.rebalance_policy import RebalancePolicySpec
from tessera.operator.rebalance_snapshot import (
    UNSCHEDULABLE_TAINT,
    node_from,
    pod_requests,
    requirement_from,
    selects,
    snapshot_from,
    tier_of,
)
from tessera.policies.rebalance_model import MatchExpression, Resources, Taint

RS_OWNER = [
    {"kind": "ReplicaSet", "name": "rs", "controller": True, "uid": "1", "apiVersion": "apps/v1"}
]


def node(name: str = "n1", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"zone": "a"}},
        "spec": spec,
        "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "31500m", "memory": "64Gi"}},
    }


def pod(name: str, node_name: str | None = "n1", **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "ns", "labels": {"app": "x"}, "ownerReferences": RS_OWNER}
    meta.update(extra.pop("meta", {}))
    resources = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": "2"}}
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": resources}]}
    if node_name:
        spec["nodeName"] = node_name
    spec.update(extra.pop("spec", {}))
    return {"metadata": meta, "spec": spec, "status": {"phase": extra.pop("phase", "Running")}}


def test_node_capacity_labels_and_cordon() -> None:
    parsed = node_from(node(unschedulable=True, taints=[{"key": "k", "effect": "NoExecute"}]))
    assert parsed.capacity == Resources(8, 31_500, 65_536)
    assert parsed.labels == (("zone", "a"),)
    assert parsed.taints == (Taint("k", "", "NoExecute"), UNSCHEDULABLE_TAINT)


def test_requests_sum_containers_and_default_to_limits() -> None:
    spec = {
        "containers": [
            {"resources": {"requests": {"cpu": "500m"}, "limits": {"nvidia.com/gpu": "1"}}},
            {"resources": {"limits": {"cpu": "1", "memory": "512Mi"}}},
        ]
    }
    assert pod_requests(spec) == Resources(1, 1500, 512)


def test_requirement_and_what_is_not_modelled() -> None:
    spec = {
        "nodeSelector": {"zone": "a"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                    ]
                }
            }
        },
        "tolerations": [{"operator": "Exists"}],
    }
    requirement, modelled = requirement_from(spec)
    assert modelled
    assert requirement.node_selector == (("zone", "a"),)
    assert requirement.affinity_terms == ((MatchExpression("gpu", "In", ("h100",)),),)
    anti = {
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}}
    }
    assert requirement_from(anti)[1] is False


def test_label_selectors() -> None:
    labels = {"app": "x", "tier": "web"}
    assert selects({}, labels)
    assert selects({"matchLabels": {"app": "x"}}, labels)
    assert not selects({"matchLabels": {"app": "y"}}, labels)
    assert not selects(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]}, labels
    )


def test_tiers_from_label_deployment_or_system_priority() -> None:
    assert tier_of({"labels": {"tessera.dev/priority": "low"}}, {}, {}) == "low"
    md = {"namespace": "ns", "labels": {"tessera.dev/deployment": "chat"}}
    assert tier_of(md, {}, {"ns/chat": "high"}) == "high"
    assert tier_of({}, {"priority": 2_000_000_000}, {}) == "critical"
    assert tier_of({"labels": {"tessera.dev/priority": "bogus"}}, {}, {}) == "normal"


def test_snapshot_movable_pdbs_scope_and_pending() -> None:
    spec = RebalancePolicySpec.model_validate({"movable": {"selector": {"app": "x"}}})
    pdbs = [
        {
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}},
            "status": {"disruptionsAllowed": 2},
        },
        {  # another namespace: selects nothing here
            "metadata": {"name": "q", "namespace": "other"},
            "spec": {"selector": {}},
            "status": {"disruptionsAllowed": 0},
        },
    ]
    pods = [
        pod("ok"),
        pod("bare", meta={"ownerReferences": []}),
        pod("daemon", meta={"ownerReferences": [{**RS_OWNER[0], "kind": "DaemonSet"}]}),
        pod("other-app", meta={"labels": {"app": "y"}}),
        pod("mirror", meta={"annotations": {"kubernetes.io/config.mirror": "x"}}),
        pod("done", phase="Succeeded"),
        pod("elsewhere", node_name="n9"),
        pod("waiting", node_name=None, phase="Pending"),
    ]
    snapshot, refs = snapshot_from([node()], pods, pdbs, spec)
    by_name = {p.name: p for p in snapshot.pods}
    assert set(by_name) == {"ns/ok", "ns/bare", "ns/daemon", "ns/other-app", "ns/mirror"}
    assert [n for n, p in by_name.items() if p.movable] == ["ns/ok"]
    assert by_name["ns/ok"].pdbs == ("ns/p",)
    assert by_name["ns/other-app"].pdbs == ()
    assert snapshot.disruptions_allowed == {"ns/p": 2, "other/q": 0}
    assert [p.name for p in snapshot.pending] == ["ns/waiting"]
    assert snapshot.pending[0].requests.gpu == 2
    assert refs["ns/ok"].name == "ok" and refs["ns/ok"].node == "n1"


VMI_SPEC = {
    "domain": {
        "devices": {"gpus": [{"name": "g0", "deviceName": "nvidia.com/gpu"}]},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
    }
}


def vmi(name: str, node_name: str = "n1", **status: Any) -> dict[str, Any]:
    state = {
        "phase": "Running",
        "nodeName": node_name,
        "conditions": [{"type": "LiveMigratable", "status": "True"}],
        **status,
    }
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "labels": {"app": "x"}},
        "spec": VMI_SPEC,
        "status": state,
    }


def launcher(vm: str, node_name: str = "n1", suffix: str = "abc") -> dict[str, Any]:
    owner = {"kind": "VirtualMachineInstance", "name": vm, "uid": f"uid-{vm}", "controller": True}
    return pod(f"virt-launcher-{vm}-{suffix}", node_name, meta={"ownerReferences": [owner]})


VM_POLICY = RebalancePolicySpec.model_validate({"movable": {"kinds": ["Pod", "VirtualMachine"]}})
ALL_PDB = [
    {
        "metadata": {"name": "kubevirt-disruption-budget", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}},
        "status": {"disruptionsAllowed": 0},
    }
]


def test_a_vmi_is_one_workload_with_its_launchers_requests() -> None:
    snapshot, refs = snapshot_from(
        [node(), node("n2")],
        [launcher("vm"), launcher("vm", "n2", "target"), pod("web")],
        ALL_PDB,
        VM_POLICY,
        vmis=[vmi("vm")],
    )
    by_name = {p.name: p for p in snapshot.pods}
    # The launcher on the VMI's node is the VMI; the one on n2 (a migration's target pod) holds
    # its capacity there and is not movable.
    assert set(by_name) == {"ns/vmi/vm", "ns/virt-launcher-vm-target", "ns/web"}
    vm = by_name["ns/vmi/vm"]
    assert (vm.node, vm.requests, vm.movable, vm.pdbs) == ("n1", Resources(2, 2000, 1024), True, ())
    assert not by_name["ns/virt-launcher-vm-target"].movable
    assert refs["ns/vmi/vm"].kind == "VirtualMachineInstance" and refs["ns/vmi/vm"].name == "vm"
    assert refs["ns/web"].kind == "Pod"


def test_a_vmi_without_a_listed_launcher_uses_its_own_spec() -> None:
    snapshot, _ = snapshot_from([node()], [], [], VM_POLICY, vmis=[vmi("vm")])
    assert snapshot.pods[0].requests == Resources(1, 1000, 2048)


def test_which_vmis_may_move() -> None:
    cases = {
        "ok": (vmi("ok"), VM_POLICY),
        "pods-only": (vmi("pods-only"), RebalancePolicySpec()),
        "no-live-migration": (
            vmi("no-live-migration"),
            RebalancePolicySpec.model_validate(
                {"movable": {"kinds": ["VirtualMachine"], "useLiveMigration": False}}
            ),
        ),
        "not-migratable": (
            vmi("not-migratable", conditions=[{"type": "LiveMigratable", "status": "False"}]),
            VM_POLICY,
        ),
        "starting": (vmi("starting", phase="Scheduled"), VM_POLICY),
        "migrating": (vmi("migrating", migrationState={"completed": False}), VM_POLICY),
        "in-flight": (vmi("in-flight"), VM_POLICY),
        "migrated": (vmi("migrated", migrationState={"completed": True}), VM_POLICY),
    }
    migrations = [
        {"metadata": {"namespace": "ns"}, "spec": {"vmiName": "in-flight"}, "status": {}},
        {"metadata": {"namespace": "ns"}, "spec": {"vmiName": "ok"}, "status": {"phase": "Failed"}},
    ]
    movable = {}
    for name, (obj, policy) in cases.items():
        snapshot, _ = snapshot_from([node()], [], [], policy, vmis=[obj], migrations=migrations)
        movable[name] = snapshot.pods[0].movable
    assert movable == {
        "ok": True,
        "pods-only": False,
        "no-live-migration": False,
        "not-migratable": False,
        "starting": False,
        "migrating": False,
        "in-flight": False,
        "migrated": True,
    }
