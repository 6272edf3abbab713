"""kopf handlers of the Tessera operator: decorate, fetch, delegate, write.

- ModelDeployment create/update/resume -> `reconcile.reconcile` (plan, apply, status, events).
- AcceleratorClass watch events -> stamp a fingerprint of the classes each ModelDeployment may
  use on it; the change of that annotation makes kopf run the deployment's own update handler,
  which re-plans it (one path for every re-plan, serialised per object by kopf).
- Child Deployment watch events -> recompute Ready/Progressing/readyReplicas of the owner; a
  child Deployment or Service deleted (by hand, or by the garbage collector) -> reconcile the
  owner, which puts it back, and the namespace's deployments in NameConflict, which may now
  take the name.
  (Hand edits of a child's spec are undone at the owner's next reconcile, not on the edit.)
- The Gateway API Inference Extension's InferencePool CRD installed -> reconcile the
  deployments in scope, so that each publishes its InferencePool (`inference_pool`).
- PowerBudget -> a control loop per budget in `power_controller` (imported at the end of this
  module, so that importing the handlers registers it).
- RebalancePolicy -> a round loop per policy in `rebalance_controller` (registered the same way).
- ModelDeployment with `autoscaling.enabled` -> the closed loop in `autoscaler` (telemetry ->
  `policies.replan` -> replicas), registered the same way.

Status is written through the API under a per-deployment lock shared by the reconcile and the
readiness handler, so the last writer has always read the newest children.

No delete handler and no finalizer: children carry owner references and Kubernetes' garbage
collector removes them with their ModelDeployment.

The handlers take what they need from kopf's `memo`: `kube` (a `reconcile.Kube`),
`kube_config` (the `kubernetes.client.Configuration` both kopf and the client use),
`namespaces` (empty when cluster-wide) and `locks` (a `LockTable`).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tessera.api.common import GROUP, VERSION, utc_now
from tessera.operator import reconcile_metrics as metrics
from tessera.operator import render
from tessera.operator.inference_pool import INFERENCE_POOL_CRD, crd_serves_pools
from tessera.operator.reconcile import (
    ACCELERATOR_CLASSES,
    CLASSES_FINGERPRINT_ANNOTATION,
    MODEL_DEPLOYMENTS,
    Kube,
    as_object,
    classes_fingerprint,
    items_of,
    reconcile,
    rollout_of_existing,
)
from tessera.operator.status import Outcome, comparable, outcome_of, refreshed_readiness

KOPF_PREFIX = "operator.tessera.dev"
"""kopf's own annotations (progress, last-handled configuration). Not `tessera.dev`: kopf leaves
annotations under its storage prefix out of its change detection, and `tessera.dev/dry-run`
must count as a change."""
RETRY_DELAY_S = 10.0
MERGE_PATCH = "application/merge-patch+json"


class LockTable:
    """One lock per ModelDeployment (namespace, name), created on first use."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)

    def __call__(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[namespace, name]


IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""The pod's own namespace, where kopf posts events about cluster-scoped objects (the chart
grants it that, and nothing in the namespace `default`)."""


def own_namespace(path: Path = IN_CLUSTER_NAMESPACE) -> str | None:
    """The namespace of the pod the operator runs in; None outside a pod."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def connection_info(config: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the kubernetes client's configuration (as kopf's own login does,
    with the pod's namespace as kopf's default namespace)."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        default_namespace=own_namespace(),
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's state in annotations only: the CRD status schema has no room for it."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # our own events are posted explicitly


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """The same credentials the kubernetes client was configured with."""
    config: client.Configuration = memo.kube_config
    return connection_info(config)


def _write_status(kube: Kube, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        MODEL_DEPLOYMENTS,
        name,
        {"status": dict(status)},
        _content_type=MERGE_PATCH,
    )


def _fetch_model_deployment(
    kube: Kube, namespace: str, name: str, meta: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The ModelDeployment as the server has it now; None if it is gone or was replaced."""
    try:
        current = as_object(
            kube.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, MODEL_DEPLOYMENTS, name
            )
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    if meta.get("uid") and current.get("metadata", {}).get("uid") != meta.get("uid"):
        return None
    if current.get("metadata", {}).get("deletionTimestamp"):
        return None  # being deleted: the garbage collector takes the children
    return current


def _reconcile_and_report(
    kube: Kube, memo: kopf.Memo, namespace: str, name: str, meta: Mapping[str, Any]
) -> None:
    """Reconcile one ModelDeployment under its lock, write its status, post its events."""
    started = time.perf_counter()
    with memo.locks(namespace, name):
        # kopf's body can predate the status this operator wrote a moment ago; the status
        # (and events) must be computed from what the server has now.
        current = _fetch_model_deployment(kube, namespace, name, meta)
        if current is None:
            return
        result = reconcile(kube, current, utc_now(), getattr(memo, "plan_scorer", None))
        if comparable(result.status) != comparable(current.get("status")):
            _write_status(kube, namespace, name, result.status)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    metrics.RECONCILES.labels(result.outcome.value).inc()
    metrics.PRUNED.inc(len(result.pruned))
    for event in result.events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, current)),
            type=event.type,
            reason=event.reason,
            message=event.message,
        )


@kopf.on.resume(GROUP, VERSION, MODEL_DEPLOYMENTS, backoff=RETRY_DELAY_S)
@kopf.on.create(GROUP, VERSION, MODEL_DEPLOYMENTS, backoff=RETRY_DELAY_S)
@kopf.on.update(GROUP, VERSION, MODEL_DEPLOYMENTS, backoff=RETRY_DELAY_S)
def reconcile_model_deployment(
    body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Plan, apply and report one ModelDeployment."""
    if namespace is None:
        raise kopf.PermanentError("a ModelDeployment is namespaced; got one without a namespace")
    try:
        _reconcile_and_report(memo.kube, memo, namespace, name, body.get("metadata", {}))
    except ApiException as error:
        metrics.RECONCILES.labels("Error").inc()
        raise kopf.TemporaryError(
            f"Kubernetes API error {error.status} {error.reason}", delay=RETRY_DELAY_S
        ) from error


def _model_deployments_in_scope(kube: Kube, namespaces: list[str]) -> list[dict[str, Any]]:
    """ModelDeployments in the namespaces this operator serves (all when cluster-wide)."""
    exact = [ns for ns in namespaces if not any(ch in ns for ch in "*?[!")]
    if namespaces and len(exact) == len(namespaces):
        items: list[dict[str, Any]] = []
        for namespace in exact:
            listed = kube.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, MODEL_DEPLOYMENTS
            )
            items.extend(items_of(listed))
        return items
    items = items_of(kube.custom.list_cluster_custom_object(GROUP, VERSION, MODEL_DEPLOYMENTS))
    if not namespaces:
        return items
    return [
        item
        for item in items
        if any(fnmatch.fnmatch(item["metadata"].get("namespace", ""), p) for p in namespaces)
    ]


@kopf.on.event(GROUP, VERSION, ACCELERATOR_CLASSES)
def on_accelerator_class_event(
    type: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Mark the deployments whose usable classes changed, so that kopf re-plans them."""
    if type is None:
        return  # the initial listing: deployments are reconciled on resume anyway
    kube: Kube = memo.kube
    listed = kube.custom.list_cluster_custom_object(GROUP, VERSION, ACCELERATOR_CLASSES)
    specs = {item["metadata"]["name"]: item.get("spec") for item in items_of(listed)}
    for item in _model_deployments_in_scope(kube, memo.namespaces):
        meta = item["metadata"]
        allowed = ((item.get("spec") or {}).get("hardware") or {}).get("acceleratorClasses") or []
        fingerprint = classes_fingerprint(allowed, specs)
        if (meta.get("annotations") or {}).get(CLASSES_FINGERPRINT_ANNOTATION) == fingerprint:
            continue
        logger.info(
            "accelerator classes changed: re-planning %s/%s", meta["namespace"], meta["name"]
        )
        kube.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            MODEL_DEPLOYMENTS,
            meta["name"],
            {"metadata": {"annotations": {CLASSES_FINGERPRINT_ANNOTATION: fingerprint}}},
            _content_type=MERGE_PATCH,
        )


def _owner_of(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """Name and uid of the ModelDeployment that controls a child, if any."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "ModelDeployment" and ref.get("controller"):
            return str(ref["name"]), str(ref["uid"])
    return None


def _name_conflicted(kube: Kube, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """Name and metadata of the namespace's ModelDeployments whose status says NameConflict."""
    listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, MODEL_DEPLOYMENTS)
    found = []
    for item in items_of(listed):
        recorded = outcome_of(item.get("status"))
        if recorded is not None and recorded[0] is Outcome.NAME_CONFLICT:
            found.append((str(item["metadata"]["name"]), {"uid": item["metadata"].get("uid")}))
    return found


CHILD_LABELS: dict[str, Any] = {
    render.MANAGED_BY_LABEL: render.MANAGED_BY,
    render.DEPLOYMENT_LABEL: kopf.PRESENT,
}


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "services", labels=CHILD_LABELS)
def on_child_event(
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A child changed: report the owner's readiness; a child deleted by hand is put back."""
    owner = _owner_of(body)
    if namespace is None or owner is None:
        return
    name, uid = owner
    kube: Kube = memo.kube
    if type == "DELETED":
        # Level-based: reconcile the owner, which re-creates the child if it is still desired
        # (a child the operator pruned is not, and an owner being deleted is skipped); then the
        # deployments that wait for a name to be let go (NameConflict) try again.
        try:
            _reconcile_and_report(kube, memo, namespace, name, {"uid": uid})
            for waiting, meta in _name_conflicted(kube, namespace):
                _reconcile_and_report(kube, memo, namespace, waiting, meta)
        except ApiException as error:
            logger.warning(
                "could not reconcile in %s after a child of %s was deleted: %s",
                namespace,
                name,
                error,
            )
        return
    if body.get("kind", "Deployment") != "Deployment":
        return
    with memo.locks(namespace, name):
        md = _fetch_model_deployment(kube, namespace, name, {"uid": uid})
        if md is None:
            return  # the owner is gone; the garbage collector takes the children
        rollout = rollout_of_existing(kube, render.Owner(name, namespace, uid))
        if rollout is None:
            return
        patch = refreshed_readiness(md.get("status"), rollout, utc_now())
        if patch is not None:
            _write_status(kube, namespace, name, patch)


def _is_inference_pool_crd(name: str | None, **_: Any) -> bool:
    return name == INFERENCE_POOL_CRD


@kopf.on.event(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", when=_is_inference_pool_crd
)
def on_inference_pool_crd_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """The InferencePool CRD was installed, changed or removed: once pools are served, reconcile
    every deployment in scope, so that each publishes its pool now rather than at its next
    change."""
    kube: Kube = memo.kube
    served = type != "DELETED" and crd_serves_pools(body)
    if not kube.inference_pools.learn(served) or type is None:
        return  # not served, known before, or the initial listing (resume reconciles anyway)
    for item in _model_deployments_in_scope(kube, memo.namespaces):
        meta = item["metadata"]
        try:
            _reconcile_and_report(kube, memo, meta["namespace"], meta["name"], meta)
        except ApiException as error:
            logger.warning(
                "could not publish the InferencePool of %s/%s: %s",
                meta["namespace"],
                meta["name"],
                error,
            )


# Importing them registers their handlers.
from tessera.operator import autoscaler, power_controller, rebalance_controller  # noqa: E402,F401
