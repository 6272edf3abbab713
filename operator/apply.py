"""Apply rendered children with server-side apply and prune the ones no longer desired.

Server-side apply (PATCH application/apply-patch+yaml, fieldManager `tessera-operator`,
force=true) makes the operator the owner of exactly the fields it renders: applying the same
object again changes nothing on the server (no new resourceVersion, no rollout), fields other
actors own (the Deployment status, an HPA's replicas if one were added) are left alone, and a
field the operator stops rendering is removed. Objects are returned as plain dicts.

Force would also take over an object of the same name that is not this ModelDeployment's (the
prefill Service `x-prefill` of a deployment `x` is the entry Service of a deployment named
`x-prefill`; a user's own Service may carry a child's name). So before applying, each desired
child is read by name, and one that another owner controls is refused: nothing is applied and
the ModelDeployment reports Degraded/NameConflict, naming the object and who holds it. Whoever
holds a name keeps it; the two never take it from each other in turns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tessera.api.common import API_VERSION
from tessera.operator.render import (
    DEPLOYMENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Owner,
    children_selector,
    label_value,
)

FIELD_MANAGER = "tessera-operator"
APPLY_PATCH = "application/apply-patch+yaml"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _KindApi:
    apply: Callable[..., Any]
    read: Callable[..., Any]
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
                apps.read_namespaced_deployment,
                apps.list_namespaced_deployment,
                apps.delete_namespaced_deployment,
            ),
            "Service": _KindApi(
                core.patch_namespaced_service,
                core.read_namespaced_service,
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

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object as the server has it; None if there is none of that name."""
        try:
            response = self._api(kind).read(name, namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        found: dict[str, Any] = json.loads(response.data)
        return found

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


class NameConflictError(Exception):
    """Desired children whose names are held by objects this ModelDeployment does not control."""

    def __init__(self, owner: Owner, conflicts: Sequence[tuple[str, str]]) -> None:
        self.owner = owner
        self.conflicts = list(conflicts)
        """(`Kind/name`, who holds it) of each refused child."""
        held = "; ".join(f"{child} {holder}" for child, holder in self.conflicts)
        super().__init__(
            f"ModelDeployment {owner.name} cannot take over what others hold: {held} "
            "(rename one of them; nothing was applied)"
        )


def foreign_holder(existing: Mapping[str, Any], owner: Owner) -> str | None:
    """Who holds an existing object of a desired child's name ("belongs to ModelDeployment x"),
    or None if it is `owner`'s own.

    Its own are: objects `owner` controls; objects a ModelDeployment of the same name controls
    (an earlier one of that name, deleted: names are unique in a namespace, so it is this
    deployment recreated, whose garbage the collector has not removed yet); and objects without
    a controller that carry `owner`'s child labels (orphaned by `kubectl delete
    --cascade=orphan`). Anything else is someone else's.
    """
    meta = existing.get("metadata") or {}
    controller = next(
        (ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None
    )
    if controller is not None:
        kind, name = controller.get("kind", "?"), controller.get("name", "?")
        is_md = kind == "ModelDeployment" and controller.get("apiVersion") == API_VERSION
        if is_md and (controller.get("uid") == owner.uid or name == owner.name):
            return None
        holder = (
            f"ModelDeployment {name}"
            if is_md
            else f"{kind} {name} ({controller.get('apiVersion')})"
        )
        return f"belongs to {holder}"
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        return "exists and is not managed by Tessera"
    deployment = labels.get(DEPLOYMENT_LABEL)
    if deployment == label_value(owner.name):
        return None
    return f"belongs to ModelDeployment {deployment} (orphaned)"


def check_names(applier: ChildApplier, owner: Owner, desired: Iterable[Mapping[str, Any]]) -> None:
    """Raise NameConflictError if any desired child's name is held by another owner."""
    conflicts = []
    for obj in desired:
        kind, name = _key(obj)
        existing = applier.get(kind, owner.namespace, name)
        holder = foreign_holder(existing, owner) if existing is not None else None
        if holder is not None:
            conflicts.append((f"{kind}/{name}", holder))
    if conflicts:
        raise NameConflictError(owner, conflicts)


def apply_children(
    applier: ChildApplier, owner: Owner, desired: Sequence[Mapping[str, Any]]
) -> ApplyResult:
    """Apply every desired child, then delete the listed children that are not desired.

    Nothing is applied if a desired name is held by another owner (NameConflictError). New
    pools come up before old ones go (make before break). Only objects carrying the managed-by
    label and the deployment's selector are ever deleted.
    """
    check_names(applier, owner, desired)
    applied = [applier.apply(obj) for obj in desired]
    keep = {_key(obj) for obj in desired}
    pruned = []
    namespace = owner.namespace
    for child in applier.list_children(namespace, children_selector(owner)):
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
