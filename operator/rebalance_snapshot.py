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
  `status.disruptionsAllowed` is what the round may spend.
"""

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
UNSCHEDULABLE_TAINT = Taint("node.kubernetes.io/unschedulable", "", "NoSchedule")
MIB = Decimal(1024 * 1024)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    node: str


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


def snapshot_from(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    pdbs: Iterable[Mapping[str, Any]],
    policy: RebalancePolicySpec,
    deployment_tiers: Mapping[str, str] | None = None,
) -> tuple[ClusterSnapshot, dict[str, PodRef]]:
    """The snapshot of the nodes given and the pods bound to them; pods by snapshot name."""
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
        labels = meta.get("labels") or {}
        requirement, modelled = requirement_from(spec)
        covering = tuple(
            key
            for ns, key, selector, _ in budgets
            if ns == namespace and selector is not None and selects(selector, labels)
        )
        name = f"{namespace}/{meta['name']}"
        out.append(
            Pod(
                name=name,
                node=node,
                requests=pod_requests(spec),
                priority=tier_of(meta, spec, tiers),
                requirement=requirement,
                pdbs=covering,
                # The Eviction API refuses a pod that more than one PDB selects.
                movable=movable(obj, policy, modelled) and len(covering) <= 1,
            )
        )
        refs[name] = PodRef(namespace, meta["name"], node)
    allowed = {key: n for _, key, _, n in budgets}
    return ClusterSnapshot(node_list, tuple(out), allowed, tuple(pending)), refs
