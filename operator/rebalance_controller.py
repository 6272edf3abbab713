"""The RebalancePolicy controller: snapshot, `policies.rebalance.decide`, evictions, status.

One kopf daemon per RebalancePolicy runs a round every `intervalSeconds` (read afresh each
round, so an edit takes effect at the next one):

1. read: the nodes in scope (`nodeSelector`), every pod bound to them, the PodDisruptionBudgets
   and the ModelDeployments' priorities; `rebalance_snapshot.snapshot_from` makes the snapshot;
2. decide: the fast policy (`policies/rebalance_fast.py`) under `moveBudget`, PDBs,
   `excludePriorities` and `minImprovement`;
3. act (unless `dryRun`): one Eviction (policy/v1) per pod move, so the API server enforces
   the PDBs once more (a 429 is reported as Blocked, not retried); the owner re-creates the pod
   and the scheduler places it. A VirtualMachineInstance (listed where `movable.kinds` has
   VirtualMachine and the KubeVirt CRDs are served) moves by a VirtualMachineInstanceMigration
   (kubevirt.io/v1) whose `addedNodeSelector` names the planned node, owned by the policy and
   labelled with it; never by evicting its launcher pod;
4. report: status (fragmentation before and predicted after, the moves and their results,
   last and next round, a Ready condition with observedGeneration) and one Event per round
   that moved or would move something.

Not done: steering a re-created pod to the planned node (the scheduler picks; docs/rebalance.md
says why and what to configure), and live KV migration of Tessera replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from tessera.api.common import GROUP, VERSION, Condition, utc_now
from tessera.api.rebalance_policy import PlannedMove, RebalancePolicySpec
from tessera.operator.events import event_body, rfc3339
from tessera.operator.power_controller import priority_index
from tessera.operator.rebalance_snapshot import VMI_KIND, PodRef, snapshot_from
from tessera.operator.reconcile import Kube, as_object, items_of
from tessera.operator.rounds import run_rounds
from tessera.operator.status import merge_conditions
from tessera.policies.rebalance import RebalancePlan, decide

log = logging.getLogger(__name__)

REBALANCE_POLICIES = "rebalancepolicies"
MODEL_DEPLOYMENTS = "modeldeployments"
MERGE_PATCH = "application/merge-patch+json"
READY = "Ready"
INVALID_SPEC_RETRY_S = 30.0


POLICY_VERSIONS = ("v1", "v1beta1")
"""policy/v1 (Kubernetes >= 1.21) first, then v1beta1 for older API servers."""

KUBEVIRT_GROUP = "kubevirt.io"
KUBEVIRT_VERSION = "v1"
VMIS = "virtualmachineinstances"
VMI_MIGRATIONS = "virtualmachineinstancemigrations"
POLICY_LABEL = "tessera.dev/rebalance-policy"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
"""The label KubeVirt itself puts on a migration: the VMI it moves."""
HOSTNAME_LABEL = "kubernetes.io/hostname"


def evict(core: client.CoreV1Api, ref: PodRef) -> tuple[str, str | None]:
    """Evict one pod through the Eviction API: (result, message)."""
    for version in POLICY_VERSIONS:
        body = {
            "apiVersion": f"policy/{version}",
            "kind": "Eviction",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
        }
        try:
            core.create_namespaced_pod_eviction(ref.name, ref.namespace, cast(Any, body))
        except ApiException as error:
            if error.status == 429:
                return "Blocked", "a PodDisruptionBudget allows no disruption now"
            if error.status == 404:
                return "Gone", "the pod no longer exists"
            if error.status == 400 and version != POLICY_VERSIONS[-1]:
                continue  # an older server that does not know this Eviction version
            return "Failed", f"{error.status} {error.reason}"
        return "Evicted", None
    return "Failed", "no Eviction version accepted"


def list_kubevirt(
    custom: client.CustomObjectsApi,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every VirtualMachineInstance and VirtualMachineInstanceMigration; none where KubeVirt's
    CRDs are not installed (404)."""
    try:
        vmis = custom.list_cluster_custom_object(KUBEVIRT_GROUP, KUBEVIRT_VERSION, VMIS)
        migrations = custom.list_cluster_custom_object(
            KUBEVIRT_GROUP, KUBEVIRT_VERSION, VMI_MIGRATIONS
        )
    except ApiException as error:
        if error.status == 404:
            return [], []
        raise
    return items_of(vmis), items_of(migrations)


def migration_body(policy: Mapping[str, Any], ref: PodRef, target_hostname: str) -> dict[str, Any]:
    """The VirtualMachineInstanceMigration that live-migrates `ref`'s VMI to the planned node.

    `addedNodeSelector` (KubeVirt >= 1.6) narrows the target pod's scheduling to that node for
    this one migration; older KubeVirt prunes the field and lets its scheduler pick. The owner
    is the policy (cluster-scoped owners may own namespaced objects): deleting the policy
    withdraws the migrations it started.
    """
    meta = policy.get("metadata") or {}
    return {
        "apiVersion": f"{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "generateName": f"{ref.name}-rebalance-",
            "namespace": ref.namespace,
            "labels": {POLICY_LABEL: meta.get("name"), VMI_NAME_LABEL: ref.name},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "RebalancePolicy",
                    "name": meta.get("name"),
                    "uid": meta.get("uid"),
                }
            ],
        },
        "spec": {"vmiName": ref.name, "addedNodeSelector": {HOSTNAME_LABEL: target_hostname}},
    }


def migrate(
    custom: client.CustomObjectsApi, body: dict[str, Any]
) -> tuple[str, str | None, str | None]:
    """Create one VirtualMachineInstanceMigration: (result, message, its name)."""
    namespace = body["metadata"]["namespace"]
    try:
        created = custom.create_namespaced_custom_object(
            KUBEVIRT_GROUP, KUBEVIRT_VERSION, namespace, VMI_MIGRATIONS, body
        )
    except ApiException as error:
        if error.status == 404:
            return "Failed", "VirtualMachineInstanceMigration is not served (KubeVirt?)", None
        return "Failed", f"{error.status} {error.reason}", None
    return "Migrating", None, str(as_object(created)["metadata"]["name"])


def list_pdbs(custom: client.CustomObjectsApi) -> list[dict[str, Any]]:
    """Every PodDisruptionBudget, through whichever policy version the server serves."""
    for version in POLICY_VERSIONS:
        try:
            listed = custom.list_cluster_custom_object("policy", version, "poddisruptionbudgets")
        except ApiException as error:
            if error.status == 404 and version != POLICY_VERSIONS[-1]:
                continue
            raise
        return items_of(listed)
    return []


def ready_condition(
    plan: RebalancePlan, moves: Sequence[PlannedMove], dry_run: bool, generation: int | None
) -> Condition:
    failed = [m for m in moves if m.result in ("Failed", "Blocked")]
    status: Literal["True", "False"]
    if failed:
        status, reason = "False", "EvictionFailed"
        message = "; ".join(f"{m.namespace}/{m.pod}: {m.message}" for m in failed[:5])
    elif dry_run and moves:
        status, reason = "True", "DryRun"
        message = f"would move {_counted(moves)}"
    elif moves:
        status, reason = "True", "Rebalanced"
        message = f"moved {_counted(moves)}"
    else:
        status, reason = "True", plan.reason
        message = "no moves this round"
    message += f"; fragmentation {plan.fragmentation_before:.4f} -> {plan.fragmentation_after:.4f}"
    return Condition(
        type=READY, status=status, reason=reason, message=message, observed_generation=generation
    )


def _counted(moves: Sequence[PlannedMove]) -> str:
    """`3 pod(s)`, or `2 pod(s) and 1 VM(s)` where VMs move too."""
    vms = sum(1 for m in moves if m.kind == "VirtualMachineInstance")
    text = f"{len(moves) - vms} pod(s)"
    return f"{text} and {vms} VM(s)" if vms else text


class RebalanceController:
    """The rounds of one RebalancePolicy (state between rounds: none but the status)."""

    def __init__(self, name: str, kube: Kube, events_namespace: str | None = None) -> None:
        from tessera.operator.handlers import own_namespace  # handlers imports this module

        self.name = name
        self.kube = kube
        self.events_namespace = events_namespace or own_namespace() or "default"
        """Where Events about this cluster-scoped policy go (the operator's namespace)."""

    def _get(self) -> dict[str, Any] | None:
        try:
            return as_object(
                self.kube.custom.get_cluster_custom_object(
                    GROUP, VERSION, REBALANCE_POLICIES, self.name
                )
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _objects(self, spec: RebalancePolicySpec) -> dict[str, Any]:
        """The cluster state a round reads, as plain dicts (snapshot_from's arguments)."""
        api_client = self.kube.api_client
        selector = ",".join(f"{k}={v}" for k, v in sorted(spec.node_selector.items()))
        nodes = self.kube.core.list_node(label_selector=selector or None)
        pods = self.kube.core.list_pod_for_all_namespaces()
        listed = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, MODEL_DEPLOYMENTS)
        vmis, migrations = (
            list_kubevirt(self.kube.custom) if "VirtualMachine" in spec.movable.kinds else ([], [])
        )
        return {
            "nodes": [api_client.sanitize_for_serialization(n) for n in nodes.items],
            "pods": [api_client.sanitize_for_serialization(p) for p in pods.items],
            "pdbs": list_pdbs(self.kube.custom),
            "deployment_tiers": priority_index(items_of(listed)),
            "vmis": vmis,
            "migrations": migrations,
        }

    def _act(
        self, body: Mapping[str, Any], ref: PodRef, target_hostname: str
    ) -> tuple[str, str | None, str | None]:
        """Carry out one move: (result, message, migration name)."""
        if ref.kind == VMI_KIND:
            return migrate(self.kube.custom, migration_body(body, ref, target_hostname))
        result, message = evict(self.kube.core, ref)
        return result, message, None

    def round(self) -> float | None:
        """One round; the seconds until the next (None: the policy is gone)."""
        body = self._get()
        if body is None:
            return None
        status = body.get("status") or {}
        generation = body.get("metadata", {}).get("generation")
        now = utc_now()
        try:
            spec = RebalancePolicySpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            condition = Condition(
                type=READY,
                status="False",
                reason="InvalidSpec",
                message=str(error).splitlines()[0],
                observed_generation=generation,
            )
            self._write(
                {
                    "observedGeneration": generation,
                    "conditions": merge_conditions(
                        status.get("conditions") or [], [condition], now
                    ),
                }
            )
            return INVALID_SPEC_RETRY_S
        objects = self._objects(spec)
        snapshot, refs = snapshot_from(policy=spec, **objects)
        hostnames = {n.name: n.labels_map.get(HOSTNAME_LABEL, n.name) for n in snapshot.nodes}
        plan = decide(snapshot, spec)
        moves = []
        for move in plan.moves:
            ref = refs[move.pod]
            result, message, migration = (
                ("Planned", None, None)
                if spec.dry_run
                else self._act(body, ref, hostnames[move.target])
            )
            moves.append(
                PlannedMove(
                    pod=ref.name,
                    namespace=ref.namespace,
                    kind=cast(Literal["Pod", "VirtualMachineInstance"], ref.kind),
                    source_node=move.source,
                    target_node=move.target,
                    result=result,  # type: ignore[arg-type]
                    migration=migration,
                    message=message,
                )
            )
        self._report(body, spec, plan, moves, now)
        return spec.interval_seconds

    def _report(
        self,
        body: Mapping[str, Any],
        spec: RebalancePolicySpec,
        plan: RebalancePlan,
        moves: Sequence[PlannedMove],
        now: Any,
    ) -> None:
        status = body.get("status") or {}
        generation = body.get("metadata", {}).get("generation")
        condition = ready_condition(plan, moves, spec.dry_run, generation)
        evicted = sum(1 for m in moves if m.result in ("Evicted", "Migrating"))
        self._write(
            {
                "observedGeneration": generation,
                "lastRoundTime": rfc3339(now),
                "nextRoundTime": rfc3339(now + timedelta(seconds=spec.interval_seconds)),
                "movesLastRound": len(moves) if spec.dry_run else evicted,
                "fragmentationBefore": round(plan.fragmentation_before, 6),
                "fragmentationAfter": round(plan.fragmentation_after, 6),
                "moves": [m.to_wire() for m in moves],
                "conditions": merge_conditions(status.get("conditions") or [], [condition], now),
            }
        )
        if moves:
            listing = ", ".join(
                f"{m.namespace}/{m.pod} {m.source_node}->{m.target_node} ({m.result})"
                for m in moves
            )
            self._event(
                body,
                "Warning" if condition.status == "False" else "Normal",
                condition.reason,
                f"{condition.message}: {listing}"[:1024],
                now,
            )

    def _event(
        self, body: Mapping[str, Any], type_: str, reason: str, message: str, now: Any
    ) -> None:
        """Post a core/v1 Event on the policy through the API (kopf's posting needs its own
        context, which a round run outside the daemon does not have)."""
        event = event_body(
            kind="RebalancePolicy",
            name=self.name,
            uid=(body.get("metadata") or {}).get("uid"),
            object_namespace=None,
            event_namespace=self.events_namespace,
            type_=type_,
            reason=reason,
            message=message,
            now=now,
            component="tessera-rebalancer",
        )
        self.kube.core.create_namespaced_event(self.events_namespace, cast(Any, event))

    def _write(self, patch: Mapping[str, Any]) -> None:
        # A list in a merge patch replaces the old one: `moves` is the last round's only.
        self.kube.custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            REBALANCE_POLICIES,
            self.name,
            {"status": dict(patch)},
            _content_type=MERGE_PATCH,
        )


@kopf.daemon(GROUP, VERSION, REBALANCE_POLICIES, cancellation_timeout=10.0)
def run_rebalance_policy(
    name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    """Rounds until the policy is deleted or the operator stops."""
    controller = RebalanceController(name, memo.kube)
    run_rounds(controller.round, stopped, logger, f"RebalancePolicy {name}", retry_s=10.0)
