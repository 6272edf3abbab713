"""Apply rendered children with server-side apply and prune the ones no longer desired.

Server-side apply (PATCH application/apply-patch+yaml, fieldManager `tessera-operator`,
force=true) makes the operator the owner of exactly the fields it renders: applying the same
object again changes nothing on the server (no new resourceVersion, no rollout), fields other
actors own (the Deployment status, an HPA's replicas if one were added) are left alone, and a
field the operator stops rendering is removed. Objects are returned as plain dicts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tessera.operator.render import MANAGED_BY, MANAGED_BY_LABEL

FIELD_MANAGER = "tessera-operator"
APPLY_PATCH = "application/apply-patch+yaml"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _KindApi:
    apply: Callable[..., Any]
    list: Callable[..., Any]
    delete: Callable[..., Any]


class ChildApplier:
    """Server-side apply, list and delete of the kinds the operator renders (namespaced)."""

    KINDS = ("Deployment", "Service")

    def __init__(self, api_client: client.ApiClient) -> None:
        apps = client.AppsV1Api(api_client)
        core = client.CoreV1Api(api_client)
        self._apis = {
            "Deployment": _KindApi(
                apps.patch_namespaced_deployment,
                apps.list_namespaced_deployment,
                apps.delete_namespaced_deployment,
            ),
            "Service": _KindApi(
                core.patch_namespaced_service,
                core.list_namespaced_service,
                core.delete_namespaced_service,
            ),
        }

    def _api(self, kind: str) -> _KindApi:
        try:
            return self._apis[kind]
        except KeyError:
            raise ValueError(
                f"cannot apply kind {kind}; supported: {', '.join(self.KINDS)}"
            ) from None

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply one object; the object as the server now has it."""
        meta = obj["metadata"]
        response = self._api(obj["kind"]).apply(
            meta["name"],
            meta["namespace"],
            dict(obj),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY_PATCH,
            _preload_content=False,
        )
        result: dict[str, Any] = json.loads(response.data)
        return result

    def list_children(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Every object of the rendered kinds in a namespace that matches a label selector.

        The labels are checked here too, not only by the server: deleting is irreversible, and
        this must never delete an object the operator does not manage.
        """
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        found: list[dict[str, Any]] = []
        for kind in self.KINDS:
            response = self._api(kind).list(
                namespace, label_selector=selector, _preload_content=False
            )
            for item in json.loads(response.data).get("items", []):
                labels = item.get("metadata", {}).get("labels") or {}
                if all(labels.get(k) == v for k, v in wanted.items()):
                    item.setdefault("kind", kind)
                    found.append(item)
        return found

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete one object (background propagation); False if it was already gone."""
        try:
            self._api(kind).delete(
                name, namespace, propagation_policy="Background", _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True


@dataclass(frozen=True)
class ApplyResult:
    """What one apply pass did."""

    applied: list[dict[str, Any]]
    """The desired objects as the server has them after the apply, in the rendered order."""
    pruned: list[str]
    """`Kind/name` of the children deleted because they are no longer desired."""


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def apply_children(
    applier: ChildApplier,
    namespace: str,
    selector: str,
    desired: Sequence[Mapping[str, Any]],
) -> ApplyResult:
    """Apply every desired child, then delete the listed children that are not desired.

    New pools come up before old ones go (make before break). Only objects carrying the
    managed-by label and the deployment's selector are ever deleted.
    """
    applied = [applier.apply(obj) for obj in desired]
    keep = {_key(obj) for obj in desired}
    pruned = []
    for child in applier.list_children(namespace, selector):
        labels = child.get("metadata", {}).get("labels") or {}
        if _key(child) in keep or labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            continue
        kind, name = _key(child)
        if applier.delete(kind, namespace, name):
            logger.info("pruned %s/%s in %s: no longer in the plan", kind, name, namespace)
            pruned.append(f"{kind}/{name}")
    return ApplyResult(applied, pruned)


def workloads(objects: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Deployments among some objects."""
    return [obj for obj in objects if obj.get("kind") == "Deployment"]
