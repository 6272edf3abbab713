"""Kubernetes objects -> the rebalancer's `ClusterSnapshot` (pure: dicts in, dataclasses out).

What each field comes from:
- node capacity: `status.allocatable` (accelerators under ACCELERATOR_RESOURCES, cpu, memory);
  a cordoned node (`spec.unschedulable`) gets the taint the scheduler gives it, so nothing moves
  there;
- pod requests: the sum over its containers of `requests` (a resource given only as a limit
  counts as requested, as the API server defaults it); its node requirement: `nodeSelector`,
  required node affinity (`matchExpressions`) and tolerations;
- movable: a Pod whose owner re-creates it (ReplicaSet, StatefulSet), labels matching the
  policy's `movable.selector`, not a mirror pod, not terminating, and without required
  inter-pod (anti-)affinity or `matchFields` (which the policy does not model);
- tier: the label `tessera.dev/priority`, else its ModelDeployment's `priority`
  (`tessera.dev/deployment` label), else `critical` for system priorities (>= 1e9), else
  `normal`;
- pending pods (not yet bound): the replica shapes the objective keeps room for, beside the
  running pods' (a 4-GPU pod that fits nowhere is the clearest sign of fragmentation);
- PDBs: each `policy/v1` PodDisruptionBudget selects pods of its namespace; its
  `status.disruptionsAllowed` is what the round may spend;
- VMs (where the KubeVirt CRDs are installed): each VirtualMachineInstance bound to a node in
  scope is one workload, named `<namespace>/vmi/<name>` (no pod name has a slash), with the
  requests, node requirement and priority of its virt-launcher pod (the pod it owns; the
  VMI's own spec where none is listed), the launcher pod itself not counted again (a
  migration's target pod on another node is an unmovable pod holding its capacity). It is
  movable when `movable.kinds` has VirtualMachine, `useLiveMigration` is on (eviction would
  stop a VM, not move it), it is Running, KubeVirt reports it LiveMigratable, its labels match
  `movable.selector`, and no migration of it is in flight. PDBs do not limit VM moves: a
  live migration disrupts nothing (KubeVirt's PDB on a launcher pod is there to turn
  evictions into migrations)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from kubernetes.utils import parse_quantity
from tessera.api.common import PRIORITY_TIERS_LOW_FIRST, PriorityTier
from tessera.api.rebalance_policy import RebalancePolicySpec
from tessera.policies.rebalance_model import (
    ClusterSnapshot,
    MatchExpression,
    Node,
    NodeRequirement,
    Pod,
    Resources,
    Taint,
    Toleration,
)

ACCELERATOR_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "huawei.com/Ascend910")
PRIORITY_LABEL = "tessera.dev/priority"
DEPLOYMENT_LABEL = "tessera.dev/deployment"
SYSTEM_PRIORITY = 1_000_000_000
RECREATING_OWNERS = ("ReplicaSet", "StatefulSet")
VMI_KIND = "VirtualMachineInstance"
MIGRATION_DONE_PHASES = ("Succeeded", "Failed")
"""VirtualMachineInstanceMigration phases after which another migration of the VMI may start."""
UNSCHEDULABLE_TAINT = Taint("node.kubernetes.io/unschedulable", "", "NoSchedule")
MIB = Decimal(1024 * 1024)


@dataclass(frozen=True)
class PodRef:
    """What a snapshot workload is in the cluster: a Pod, or a VirtualMachineInstance."""

    namespace: str
    name: str
    node: str
    kind: str = "Pod"


def _quantity(value: Any) -> Decimal:
    return cast(Decimal, parse_quantity(value)) if value is not None else Decimal(0)


def _resources(amounts: Mapping[str, Any]) -> Resources:
    gpus = sum(_quantity(amounts.get(r)) for r in ACCELERATOR_RESOURCES)
    return Resources(
        gpu=int(gpus),
        cpu_m=int(_quantity(amounts.get("cpu")) * 1000),
        memory_mib=int(_quantity(amounts.get("memory")) / MIB),
    )


def node_from(obj: Mapping[str, Any]) -> Node:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    taints = tuple(
        Taint(t.get("key", ""), t.get("value") or "", t.get("effect", "NoSchedule"))
        for t in spec.get("taints") or []
    )
    if spec.get("unschedulable"):
        taints += (UNSCHEDULABLE_TAINT,)
    return Node(
        name=meta["name"],
        capacity=_resources((obj.get("status") or {}).get("allocatable") or {}),
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        taints=taints,
    )


def pod_requests(spec: Mapping[str, Any]) -> Resources:
    total = [0, 0, 0]
    for container in spec.get("containers") or []:
        res = container.get("resources") or {}
        # A resource with a limit and no request is requested at its limit (API defaulting).
        amounts = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for i, v in enumerate(_resources(amounts).as_tuple()):
            total[i] += v
    return Resources(*total)


def requirement_from(spec: Mapping[str, Any]) -> tuple[NodeRequirement, bool]:
    """The pod's node requirement, and whether the rebalancer models all of it."""
    affinity = spec.get("affinity") or {}
    modelled = not any(
        (affinity.get(kind) or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        for kind in ("podAffinity", "podAntiAffinity")
    )
    required = (affinity.get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = []
    for term in required.get("nodeSelectorTerms") or []:
        if term.get("matchFields"):
            modelled = False
        terms.append(
            tuple(
                MatchExpression(e["key"], e["operator"], tuple(e.get("values") or ()))
                for e in term.get("matchExpressions") or []
            )
        )
    tolerations = tuple(
        Toleration(
            t.get("key") or "",
            t.get("operator") or "Equal",
            t.get("value") or "",
            t.get("effect") or "",
        )
        for t in spec.get("tolerations") or []
    )
    selector = tuple(sorted((spec.get("nodeSelector") or {}).items()))
    return NodeRequirement(selector, tuple(terms), tolerations), modelled


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) against labels; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(
        MatchExpression(e["key"], e["operator"], tuple(e.get("values") or ())).matches(labels)
        for e in selector.get("matchExpressions") or []
    )


def tier_of(
    meta: Mapping[str, Any], spec: Mapping[str, Any], deployment_tiers: Mapping[str, str]
) -> PriorityTier:
    labels = meta.get("labels") or {}
    for candidate in (
        labels.get(PRIORITY_LABEL),
        deployment_tiers.get(f"{meta.get('namespace')}/{labels.get(DEPLOYMENT_LABEL)}"),
    ):
        if candidate in PRIORITY_TIERS_LOW_FIRST:
            return cast(PriorityTier, candidate)
    if int(spec.get("priority") or 0) >= SYSTEM_PRIORITY:
        return "critical"
    return "normal"


def movable(obj: Mapping[str, Any], policy: RebalancePolicySpec, modelled: bool) -> bool:
    meta = obj.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    return (
        "Pod" in policy.movable.kinds
        and modelled
        and not meta.get("deletionTimestamp")
        and "kubernetes.io/config.mirror" not in (meta.get("annotations") or {})
        and any(o.get("kind") in RECREATING_OWNERS and o.get("controller") for o in owners)
        and all((meta.get("labels") or {}).get(k) == v for k, v in policy.movable.selector.items())
    )


def _gpu_devices(vmi_spec: Mapping[str, Any]) -> int:
    devices = ((vmi_spec.get("domain") or {}).get("devices")) or {}
    return len(devices.get("gpus") or []) + len(devices.get("hostDevices") or [])


def vmi_requests(vmi_spec: Mapping[str, Any]) -> Resources:
    """A VMI's requests from its own spec (used only where its launcher pod is not listed):
    domain resources, and one accelerator per passed-through GPU or host device."""
    resources = (vmi_spec.get("domain") or {}).get("resources") or {}
    amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    own = _resources(amounts)
    return Resources(own.gpu or _gpu_devices(vmi_spec), own.cpu_m, own.memory_mib)


def migration_in_flight(
    migrations: Iterable[Mapping[str, Any]],
) -> set[tuple[str, str]]:
    """(namespace, VMI name) of every VirtualMachineInstanceMigration not yet finished."""
    return {
        ((m.get("metadata") or {}).get("namespace", ""), (m.get("spec") or {}).get("vmiName", ""))
        for m in migrations
        if (m.get("status") or {}).get("phase") not in MIGRATION_DONE_PHASES
    }


def vmi_movable(
    vmi: Mapping[str, Any], policy: RebalancePolicySpec, modelled: bool, in_flight: bool
) -> bool:
    meta, status = vmi.get("metadata") or {}, vmi.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    state = status.get("migrationState") or {}
    return (
        "VirtualMachine" in policy.movable.kinds
        and policy.movable.use_live_migration
        and modelled
        and not in_flight
        and not meta.get("deletionTimestamp")
        and status.get("phase") == "Running"
        and conditions.get("LiveMigratable") == "True"
        and (not state or bool(state.get("completed")) or bool(state.get("failed")))
        and all((meta.get("labels") or {}).get(k) == v for k, v in policy.movable.selector.items())
    )


def _launcher_of(meta: Mapping[str, Any]) -> str | None:
    """The name of the VMI that owns this pod (its virt-launcher), if any."""
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == VMI_KIND and owner.get("controller"):
            return str(owner.get("name"))
    return None


def snapshot_from(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    pdbs: Iterable[Mapping[str, Any]],
    policy: RebalancePolicySpec,
    deployment_tiers: Mapping[str, str] | None = None,
    vmis: Iterable[Mapping[str, Any]] = (),
    migrations: Iterable[Mapping[str, Any]] = (),
) -> tuple[ClusterSnapshot, dict[str, PodRef]]:
    """The snapshot of the nodes given and the workloads bound to them (pods, and VMs where
    `vmis` lists KubeVirt's VirtualMachineInstances); each workload's cluster object by
    snapshot name."""
    tiers = deployment_tiers or {}
    node_list = tuple(node_from(n) for n in nodes)
    in_scope = {n.name for n in node_list}
    budgets = [
        (
            (b.get("metadata") or {}).get("namespace", ""),
            f"{(b.get('metadata') or {}).get('namespace')}/{b['metadata']['name']}",
            (b.get("spec") or {}).get("selector"),
            int((b.get("status") or {}).get("disruptionsAllowed") or 0),
        )
        for b in pdbs
    ]

    def covering(namespace: str, labels: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(
            key
            for ns, key, selector, _ in budgets
            if ns == namespace and selector is not None and selects(selector, labels)
        )

    vmi_by_key = {
        ((v.get("metadata") or {}).get("namespace", ""), v["metadata"]["name"]): v
        for v in vmis
        if (v.get("status") or {}).get("nodeName") in in_scope
    }
    launchers: dict[tuple[str, str], Mapping[str, Any]] = {}
    out: list[Pod] = []
    pending: list[Pod] = []
    refs: dict[str, PodRef] = {}
    for obj in pods:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        node = spec.get("nodeName")
        phase = (obj.get("status") or {}).get("phase")
        if not node and phase == "Pending" and not meta.get("deletionTimestamp"):
            requirement, _ = requirement_from(spec)
            name = f"{meta.get('namespace')}/{meta['name']}"
            pending.append(
                Pod(name, "", pod_requests(spec), requirement=requirement, movable=False)
            )
            continue
        if node not in in_scope or phase in ("Succeeded", "Failed"):
            continue
        namespace = meta.get("namespace", "")
        vmi = vmi_by_key.get((namespace, _launcher_of(meta) or ""))
        if vmi is not None and vmi["status"]["nodeName"] == node:
            # The VMI's launcher pod, counted as the VMI below. A launcher pod elsewhere is a
            # migration's target (or a finished one's source) and stays a plain, unmovable pod.
            launchers[(namespace, vmi["metadata"]["name"])] = obj
            continue
        labels = meta.get("labels") or {}
        requirement, modelled = requirement_from(spec)
        pdbs_of = covering(namespace, labels)
        name = f"{namespace}/{meta['name']}"
        out.append(
            Pod(
                name=name,
                node=node,
                requests=pod_requests(spec),
                priority=tier_of(meta, spec, tiers),
                requirement=requirement,
                pdbs=pdbs_of,
                # The Eviction API refuses a pod that more than one PDB selects.
                movable=movable(obj, policy, modelled) and len(pdbs_of) <= 1,
            )
        )
        refs[name] = PodRef(namespace, meta["name"], node)
    busy = migration_in_flight(migrations)
    for (namespace, vmi_name), vmi in sorted(vmi_by_key.items()):
        node = vmi["status"]["nodeName"]
        launcher = launchers.get((namespace, vmi_name))
        # The launcher pod is what the scheduler placed: its requests include KubeVirt's
        # overhead, its node selector KubeVirt's own labels.
        source = launcher or vmi
        spec = source.get("spec") or {}
        requirement, modelled = requirement_from(spec)
        name = f"{namespace}/vmi/{vmi_name}"
        out.append(
            Pod(
                name=name,
                node=node,
                requests=pod_requests(spec) if launcher else vmi_requests(spec),
                priority=tier_of(vmi.get("metadata") or {}, spec, tiers),
                requirement=requirement,
                # A live migration keeps the VM running: it spends no disruption. (KubeVirt's
                # own PDB on a launcher pod allows none: it turns evictions into migrations.)
                pdbs=(),
                movable=vmi_movable(vmi, policy, modelled, (namespace, vmi_name) in busy),
            )
        )
        refs[name] = PodRef(namespace, vmi_name, node, VMI_KIND)
    allowed = {key: n for _, key, _, n in budgets}
    return ClusterSnapshot(node_list, tuple(out), allowed, tuple(pending)), refs
