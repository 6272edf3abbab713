"""The RebalancePolicy controller: snapshot, `policies.rebalance.decide`, evictions, status.

One kopf daemon per RebalancePolicy runs a round every `intervalSeconds` (read afresh each
round, so an edit takes effect at the next one):

1. read: the nodes in scope (`nodeSelector`), every pod bound to them, the PodDisruptionBudgets
   and the ModelDeployments' priorities; `rebalance_snapshot.snapshot_from` makes the snapshot;
2. decide: the fast policy (`policies/rebalance_fast.py`) under `moveBudget`, PDBs,
   `excludePriorities` and `minImprovement`;
3. act (unless `dryRun`): one Eviction (policy/v1) per move, so the API server enforces the
   PDBs once more (a 429 is reported as Blocked, not retried); the owner re-creates the pod and
   the scheduler places it;
4. report: status (fragmentation before and predicted after, the moves and their results,
   last and next round, a Ready condition with observedGeneration) and one Event per round
   that moved or would move something.

Not yet: steering the re-created pod to the planned node (the scheduler picks; the plan's
targets are where it fits best), KubeVirt VirtualMachineInstanceMigrations, and live KV
migration of Tessera replicas (`useLiveMigration`).
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
from tessera.operator.power_controller import priority_index
from tessera.operator.rebalance_snapshot import PodRef, snapshot_from
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


def _timestamp(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


POLICY_VERSIONS = ("v1", "v1beta1")
"""policy/v1 (Kubernetes >= 1.21) first, then v1beta1 for older API servers."""


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
        message = f"would move {len(moves)} pod(s)"
    elif moves:
        status, reason = "True", "Rebalanced"
        message = f"evicted {len(moves)} pod(s)"
    else:
        status, reason = "True", plan.reason
        message = "no moves this round"
    message += f"; fragmentation {plan.fragmentation_before:.4f} -> {plan.fragmentation_after:.4f}"
    return Condition(
        type=READY, status=status, reason=reason, message=message, observed_generation=generation
    )


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

    def _objects(self, spec: RebalancePolicySpec) -> tuple[list, list, list, dict[str, str]]:
        api_client = self.kube.api_client
        selector = ",".join(f"{k}={v}" for k, v in sorted(spec.node_selector.items()))
        nodes = self.kube.core.list_node(label_selector=selector or None)
        pods = self.kube.core.list_pod_for_all_namespaces()
        listed = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, MODEL_DEPLOYMENTS)
        return (
            [api_client.sanitize_for_serialization(n) for n in nodes.items],
            [api_client.sanitize_for_serialization(p) for p in pods.items],
            list_pdbs(self.kube.custom),
            priority_index(items_of(listed)),
        )

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
        nodes, pods, pdbs, tiers = self._objects(spec)
        snapshot, refs = snapshot_from(nodes, pods, pdbs, spec, tiers)
        plan = decide(snapshot, spec)
        moves = []
        for move in plan.moves:
            ref = refs[move.pod]
            result, message = ("Planned", None) if spec.dry_run else evict(self.kube.core, ref)
            moves.append(
                PlannedMove(
                    pod=ref.name,
                    namespace=ref.namespace,
                    source_node=move.source,
                    target_node=move.target,
                    result=result,  # type: ignore[arg-type]
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
        evicted = sum(1 for m in moves if m.result == "Evicted")
        self._write(
            {
                "observedGeneration": generation,
                "lastRoundTime": _timestamp(now),
                "nextRoundTime": _timestamp(now + timedelta(seconds=spec.interval_seconds)),
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
        meta = body.get("metadata") or {}
        event: dict[str, Any] = {
            "metadata": {"generateName": f"{self.name}.", "namespace": self.events_namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "RebalancePolicy",
                "name": self.name,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "firstTimestamp": _timestamp(now),
            "lastTimestamp": _timestamp(now),
            "count": 1,
            "source": {"component": "tessera-rebalancer"},
        }
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
