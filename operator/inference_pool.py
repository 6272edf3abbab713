"""An InferencePool per ModelDeployment, where the Gateway API Inference Extension is installed.

Where this sits: the last step of a ModelDeployment's reconcile (`reconcile.reconcile`), after
its children are applied. An InferencePool (inference.networking.k8s.io/v1) tells a Gateway
that supports the extension which pods serve a model and on which port, and which endpoint
picker (EPP, an ext-proc service) chooses among them. Publishing one lets an HTTPRoute send a
model's traffic to a ModelDeployment by naming its pool.

- Discovery: the pool is published only while the API server serves
  inference.networking.k8s.io/v1 with `inferencepools` (a discovery GET, cached for
  `DISCOVERY_TTL_S`; the CRD's own watch events in `handlers` update the answer at once, and
  reconcile every deployment when pools become served).
  Where it is not served, nothing is published, no error is reported and nothing is retried.
- The pool (`render_inference_pool`, pure): same namespace, named as the ModelDeployment, owned
  by it (the garbage collector deletes it with its owner), selecting the entry pods
  (`render.entry_selector`: the router's in a disaggregated plan, the serving pods in a
  colocated one) on the engine port, like the entry Service.
- The endpoint picker: the schema requires one. Tessera's router is its own picker (it runs
  `policies/dispatch.py` on live load) and no EPP is deployed by the operator, so the reference
  is the documented convention of the extension's own chart, the Service `<md>-epp` on the
  ext-proc port 9002, with failureMode FailOpen: a Gateway that finds no picker there forwards
  to a pod of the pool itself instead of dropping the request. A user who wants an EPP's
  picking (for a colocated plan: the extension's EPP reads the vLLM metric names that
  `tessera serve` exports) deploys one under that name.
- A pool of that name that another owner holds (a user's own, or one made by the extension's
  chart) is left alone: the reconcile posts a Warning event instead of taking it over.
  Forbidden (an older chart without the RBAC rule) and invalid answers are events too; the
  deployment itself is unaffected.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.operator.apply import FIELD_MANAGER, foreign_holder
from tessera.operator.render import (
    NAME_LABEL,
    Owner,
    dns_label,
    entry_selector,
    selector_labels,
)

INFERENCE_GROUP = "inference.networking.k8s.io"
INFERENCE_VERSION = "v1"
INFERENCE_POOLS = "inferencepools"
INFERENCE_POOL_KIND = "InferencePool"
INFERENCE_POOL_CRD = f"{INFERENCE_POOLS}.{INFERENCE_GROUP}"
POOL_NAME_VALUE = "tessera-inference-pool"
"""`app.kubernetes.io/name` of the pools (the engine's pods and Services carry `tessera-engine`)."""
ENDPOINT_PICKER_SUFFIX = "-epp"
ENDPOINT_PICKER_PORT = 9002
"""The ext-proc port of the extension's endpoint picker (its chart's default)."""
ENDPOINT_PICKER_FAILURE_MODE = "FailOpen"
DISCOVERY_TTL_S = 60.0
"""How long a discovery answer is trusted: a CRD installed meanwhile (on a cluster where its
watch event was missed) is found within this time, at a cost of one GET a minute at most."""

APPLY_PATCH = "application/apply-patch+yaml"
"""Server-side apply (as `apply.ChildApplier`): the API server authorizes it as create for a
missing pool and as patch for an existing one."""

logger = logging.getLogger(__name__)


def inference_pool_name(owner: Owner) -> str:
    """The pool is named as its ModelDeployment (a DNS label, as a Service name would be)."""
    return dns_label(owner.name)


def endpoint_picker_name(owner: Owner) -> str:
    """`<pool>-epp`: the Service name the extension's chart gives a pool's endpoint picker."""
    return dns_label(f"{inference_pool_name(owner)}{ENDPOINT_PICKER_SUFFIX}")


def render_inference_pool(owner: Owner, spec: ModelDeploymentSpec, plan: Plan) -> dict[str, Any]:
    """The InferencePool of one ModelDeployment: its entry pods on the engine port."""
    return {
        "apiVersion": f"{INFERENCE_GROUP}/{INFERENCE_VERSION}",
        "kind": INFERENCE_POOL_KIND,
        "metadata": {
            "name": inference_pool_name(owner),
            "namespace": owner.namespace,
            "labels": {NAME_LABEL: POOL_NAME_VALUE, **selector_labels(owner)},
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "selector": {"matchLabels": entry_selector(owner, plan)},
            "targetPorts": [{"number": spec.engine.port}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": endpoint_picker_name(owner),
                "port": {"number": ENDPOINT_PICKER_PORT},
                "failureMode": ENDPOINT_PICKER_FAILURE_MODE,
            },
        },
    }


def crd_serves_pools(crd: Mapping[str, Any]) -> bool:
    """Whether a CustomResourceDefinition, as its watch event carries it, has the API server
    serve InferencePools in the version published here: Established (its handler is up), and
    that version served. Discovery can lag behind the condition; requests already succeed."""
    spec = crd.get("spec") or {}
    if spec.get("group") != INFERENCE_GROUP or (spec.get("names") or {}).get("plural") != (
        INFERENCE_POOLS
    ):
        return False
    conditions = (crd.get("status") or {}).get("conditions") or []
    established = any(
        c.get("type") == "Established" and c.get("status") == "True" for c in conditions
    )
    versions = spec.get("versions") or []
    return established and any(
        v.get("name") == INFERENCE_VERSION and v.get("served") for v in versions
    )


class Published(Enum):
    """What publishing a ModelDeployment's pool did."""

    APPLIED = "InferencePoolApplied"
    NOT_SERVED = "InferencePoolNotServed"
    """The API server does not serve InferencePools: nothing to do."""
    NAME_CONFLICT = "InferencePoolNameConflict"
    REFUSED = "InferencePoolRefused"
    """The API server refused the pool (forbidden, or invalid for the installed CRD)."""


@dataclass(frozen=True)
class PublishResult:
    outcome: Published
    message: str = ""

    @property
    def warning(self) -> bool:
        return self.outcome in (Published.NAME_CONFLICT, Published.REFUSED)


class InferencePoolPublisher:
    """Discovers whether InferencePools are served, and server-side applies one per deployment.

    Thread-safe: kopf runs reconciles of different ModelDeployments in parallel threads.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        ttl_s: float = DISCOVERY_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._served: bool | None = None
        self._checked_at = 0.0

    def learn(self, served: bool) -> bool:
        """Take what the CRD's own watch event says (it is Established, or gone) as the
        discovery answer; True when pools are served now and were not known to be before."""
        with self._lock:
            before = self._served
            self._served, self._checked_at = served, self.clock()
        return served and before is not True

    def forget(self) -> None:
        """Drop the cached discovery answer."""
        with self._lock:
            self._served = None

    def served(self) -> bool:
        """Whether the API server serves inferencepools in inference.networking.k8s.io/v1."""
        with self._lock:
            if self._served is not None and self.clock() - self._checked_at < self.ttl_s:
                return self._served
        try:
            response = self.custom.get_api_resources(
                INFERENCE_GROUP, INFERENCE_VERSION, _preload_content=False
            )
            raw = cast(Any, response).data  # _preload_content=False: the HTTP response
            resources = json.loads(raw).get("resources") or []
        except (ApiException, ValueError) as error:
            if getattr(error, "status", None) != 404:
                # An optional feature: a discovery failure must not fail the reconcile. It
                # counts as not served until the answer expires, so it is not retried per call.
                logger.warning(
                    "discovery of %s/%s failed: %s", INFERENCE_GROUP, INFERENCE_VERSION, error
                )
            resources = []
        found = any(r.get("name") == INFERENCE_POOLS for r in resources)
        with self._lock:
            if found != self._served:
                logger.info(
                    "%s/%s %s is %s",
                    INFERENCE_GROUP,
                    INFERENCE_VERSION,
                    INFERENCE_POOLS,
                    "served: publishing a pool per ModelDeployment" if found else "not served",
                )
            self._served, self._checked_at = found, self.clock()
        return found

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = self.custom.get_namespaced_custom_object(
                INFERENCE_GROUP,
                INFERENCE_VERSION,
                namespace,
                INFERENCE_POOLS,
                name,
                _preload_content=False,
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        found: dict[str, Any] = json.loads(cast(Any, response).data)
        return found

    def publish(self, owner: Owner, spec: ModelDeploymentSpec, plan: Plan) -> PublishResult:
        """Apply the deployment's pool where pools are served. Raises ApiException only for
        answers a retry may fix (the caller's backoff)."""
        if not self.served():
            return PublishResult(Published.NOT_SERVED)
        pool = render_inference_pool(owner, spec, plan)
        name = pool["metadata"]["name"]
        try:
            existing = self.get(owner.namespace, name)
            holder = foreign_holder(existing, owner) if existing is not None else None
            if holder is not None:
                return PublishResult(
                    Published.NAME_CONFLICT,
                    f"InferencePool {name} {holder}: not published for ModelDeployment "
                    f"{owner.name} (rename one of them)",
                )
            self.custom.patch_namespaced_custom_object(
                INFERENCE_GROUP,
                INFERENCE_VERSION,
                owner.namespace,
                INFERENCE_POOLS,
                name,
                pool,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_PATCH,
                _preload_content=False,
            )
        except ApiException as error:
            if error.status == 404:  # the CRD went away between discovery and apply
                self.forget()
                return PublishResult(Published.NOT_SERVED)
            if error.status in (403, 400, 422):
                return PublishResult(
                    Published.REFUSED,
                    f"InferencePool {name} not published: {error.status} {_reason(error)}",
                )
            raise
        return PublishResult(Published.APPLIED)


def _reason(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
