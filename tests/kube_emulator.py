"""kmock's Kubernetes emulator with the few pieces of apiserver behaviour the operator relies on.

kmock (by kopf's author) stores objects and serves discovery, list, watch, get, create, merge
patch and delete over HTTP. Its docs invite subclassing where a test needs more of Kubernetes;
this subclass adds, and only adds, these pieces (each a small, faithful subset of the apiserver):

0. Paths of Namespace objects (/api/v1/namespaces[/NAME]), which kmock 0.8 misparses.

1. Discovery: the built-in resources from kmock's bundled K3s discovery snapshot, plus custom
   resources declared from CustomResourceDefinitions when they are created (scope, verbs,
   status subresource), so kopf finds and watches them as on a real cluster.
2. Creates answer 201 Created (clients map only 201 to a body for some kinds). Object
   metadata: uid, creationTimestamp, a resourceVersion counter that moves only when an object
   really changes, generation that moves only when a non-metadata/non-status field changes,
   and generateName (kopf posts Events with it).
3. The status subresource: PATCH .../status changes only `status`; a PATCH of the main resource
   of a kind with a status subresource ignores `status`.
4. Server-side apply (PATCH application/apply-patch+yaml): creates a missing object; on an
   existing one the applied configuration replaces what the (single) applier owns, keeping
   system metadata and status. A no-op apply writes nothing and emits no watch event. Field
   ownership between several managers is not modelled: every child here has one applier.
5. Label selectors on list and watch (=, ==, !=, exists, !exists, in, notin).
6. Background garbage collection: after every write, objects all of whose ownerReferences
   point at uids that no longer exist are deleted (cascading), including an object created
   after its owner was deleted.

What it still does not do: schema validation and defaulting, admission, resourceVersion
conflicts, namespace deletion cascading, controllers (nobody runs pods; a test that wants ready
replicas writes Deployment status itself, as the deployment controller would).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, k8s_dicts, parsing, rendering

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}

_NAMESPACE_PATH = re.compile(
    r"/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?"
)
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
SYSTEM_METADATA: tuple[str, ...] = ("uid", "creationTimestamp", "resourceVersion", "generation")
SYSTEM_METADATA += ("finalizers", "deletionTimestamp", "managedFields")

_SELECTOR_TERM = re.compile(
    r"\s*(?:(?P<key>[^\s!=,()]+)\s*(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*"
    r"(?P<value>\([^)]*\)|[^\s,()]*)|(?P<neg>!)?\s*(?P<exists>[^\s!=,()]+))\s*(?:,|$)"
)


class LabelSelector:
    """A parsed `labelSelector` query parameter (the equality- and set-based grammar)."""

    def __init__(self, text: str) -> None:
        self.terms: list[tuple[str, str, set[str]]] = []
        position = 0
        text = text.strip()
        while position < len(text):
            match = _SELECTOR_TERM.match(text, position)
            if match is None or match.end() == position:
                raise ValueError(f"unparsable labelSelector {text!r} at {position}")
            position = match.end()
            if match["exists"]:
                self.terms.append((match["exists"], "!" if match["neg"] else "exists", set()))
                continue
            op = match["op"].strip()
            value = match["value"]
            values = (
                {v.strip() for v in value[1:-1].split(",")} if value.startswith("(") else {value}
            )
            self.terms.append((match["key"], {"==": "="}.get(op, op), values))

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, op, values in self.terms:
            present = key in labels
            ok = {
                "exists": present,
                "!": not present,
                "=": present and labels[key] in values,
                "in": present and labels[key] in values,
                "!=": not present or labels[key] not in values,
                "notin": not present or labels[key] not in values,
            }[op]
            if not ok:
                return False
        return True


def merge_patch_between(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`; {} when they are equal."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            if isinstance(old[key], dict) and isinstance(value, dict):
                patch[key] = merge_patch_between(old[key], value)
            else:
                patch[key] = copy.deepcopy(value)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge: dicts merge recursively, null removes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class TesseraKubernetesEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the pieces listed in the module docstring."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _mutations: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _in_flight: set[int] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()

    # ---- request entry ---------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACE_PATH.fullmatch(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        # kmock 0.8 cannot parse the paths of Namespace objects themselves (/api/v1/namespaces,
        # /api/v1/namespaces/NAME): it reads "namespaces" as the namespace prefix of a path.
        request = await self._parse_namespace_request(raw_request, match)
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as error:  # as kmock does: the client gets a Status, not a hang-up
            return await self._render_error(error)

    async def _parse_namespace_request(
        self, raw_request: aiohttp.web.BaseRequest, match: re.Match[str]
    ) -> rendering.Request:
        body = await raw_request.read()
        text = await raw_request.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        path = parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            name=match["name"],
            subresource=match["sub"],
        )
        method = enums.method(raw_request.method)
        return rendering.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            data=data,
            body=body,
            text=text,
            action=parsing.guess_k8s(path, method, dict(raw_request.query)),
            resource=kmock.resource("", "v1", "namespaces"),
            namespace=None,
            name=match["name"],
            subresource=match["sub"],
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock keeps every request for assertions and routes a request by scanning them all,
        # which makes a long test module quadratic; these tests assert on the API's state only,
        # so only requests still being served are kept.
        self._in_flight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        try:
            return await self._handle_in_flight(request)
        finally:
            self._in_flight.discard(id(request))

    async def _handle_in_flight(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        mutating = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        if request.resource is None or request.action not in mutating:
            return await super()._handle(request)
        async with self._mutations:
            emulated = self._emulate(request)
            if emulated is not request:
                # kmock routes requests it has recorded, by identity: record the rewritten one.
                index = next(i for i, r in enumerate(self._requests) if r is request)
                self._requests[index] = emulated
                self._in_flight.add(id(emulated))
            try:
                response = await super()._handle(emulated)
            finally:
                self._in_flight.discard(id(emulated))
            await self._collect_garbage()
            if emulated.action == enums.action.CREATE and response.status == 200:
                response.set_status(201)  # "Created", as the apiserver answers (kmock says 200)
            return response

    def _emulate(self, request: rendering.Request) -> rendering.Request:
        if request.action == enums.action.CREATE:
            return self._prepare_create(request, request.data)
        if request.action == enums.action.UPDATE:
            return self._prepare_update(request)
        return request

    # ---- pieces 1 and 2: discovery of CRDs, metadata ----------------------------------------

    def _prepare_create(self, request: rendering.Request, body: Any) -> rendering.Request:
        body = copy.deepcopy(body) if isinstance(body, dict) else {}
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.name and not meta.get("name"):
            meta["name"] = request.name
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        if request.resource == CRDS:
            self._declare_crd(body)
        return attrs.evolve(request, action=enums.action.CREATE, data=body)

    def _declare_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.resources[key] = kmock.ResourceInfo(
                kind=names.get("kind"),
                singular=names.get("singular") or names.get("kind", "").lower(),
                namespaced=spec.get("scope") == "Namespaced",
                verbs=VERBS,
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources", {})),
            )

    def _current(self, request: rendering.Request) -> k8s_dicts.Object | None:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj

    # ---- pieces 3 and 4: status subresource, server-side apply -------------------------------

    def _prepare_update(self, request: rendering.Request) -> rendering.Request:
        current = self._current(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type.startswith("application/apply-patch"):
            if current is None:
                return self._prepare_create(request, request.data)
            old = current.raw
            new = self._applied(old, request.data)
        else:
            if current is None:
                return request  # kmock answers 404 Not Found
            old = current.raw
            if isinstance(request.data, list):
                new = jsonpatch.apply_patch(old, request.data, in_place=False)
            else:
                new = apply_merge_patch(old, request.data or {})
        new = self._guard_subresources(request, old, new)
        patch = merge_patch_between(old, new)
        if not patch:
            # A no-op write: nothing stored, no watch event, resourceVersion unchanged.
            return attrs.evolve(request, action=enums.action.FETCH)
        meta = patch.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._versions))
        spec_changed = any(key not in ("metadata", "status") for key in patch)
        if spec_changed:
            meta["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1
        return attrs.evolve(request, data=patch)

    def _guard_subresources(
        self, request: rendering.Request, old: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        """Keep only `status` for .../status writes; ignore `status` in main-resource writes."""
        assert request.resource is not None
        known = request.resource in self.resources
        has_status = known and "status" in self.resources[request.resource].subresources
        guarded = copy.deepcopy(new)
        if request.subresource == "status":
            guarded = copy.deepcopy(old)
            if "status" in new:
                guarded["status"] = copy.deepcopy(new["status"])
            else:
                guarded.pop("status", None)
        elif has_status:
            if "status" in old:
                guarded["status"] = copy.deepcopy(old["status"])
            else:
                guarded.pop("status", None)
        for key in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            if key in old.get("metadata", {}):
                guarded.setdefault("metadata", {})[key] = old["metadata"][key]
        return guarded

    @staticmethod
    def _applied(old: dict[str, Any], applied: Any) -> dict[str, Any]:
        """The object after a forced apply by its only field manager."""
        applied = copy.deepcopy(applied) if isinstance(applied, dict) else {}
        new = {key: value for key, value in applied.items() if key != "status"}
        meta = new.setdefault("metadata", {})
        for key in SYSTEM_METADATA:
            if key in old.get("metadata", {}):
                meta[key] = copy.deepcopy(old["metadata"][key])
        for key in ("name", "namespace"):
            if key in old.get("metadata", {}):
                meta[key] = old["metadata"][key]
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        return new

    # ---- piece 5: label selectors ------------------------------------------------------------

    @staticmethod
    def _selector(request: rendering.Request) -> LabelSelector | None:
        text = request.params.get("labelSelector")
        return LabelSelector(text) if text else None

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_list(request)
        selector = self._selector(request)
        if selector is not None:
            payload["items"] = [
                item
                for item in payload["items"]
                if selector.matches(item.get("metadata", {}).get("labels") or {})
            ]
        payload["metadata"]["resourceVersion"] = str(next(self._versions))
        return payload

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        selector = self._selector(request)
        async for event in super()._serve_watch(request):
            if selector is not None and isinstance(event, dict):
                labels = event.get("object", {}).get("metadata", {}).get("labels") or {}
                if not selector.matches(labels):
                    continue
            yield event

    # ---- piece 6: garbage collection ---------------------------------------------------------

    async def _collect_garbage(self) -> None:
        """Delete dependents whose owners are all gone, until nothing more goes (cascading)."""
        while True:
            async with self._lock:
                live = [(key, obj) for key, obj in self.objects.items() if not obj.deleted]
                uids = {obj.raw.get("metadata", {}).get("uid") for _, obj in live}
                orphans = []
                for key, obj in live:
                    meta = obj.raw.get("metadata", {})
                    owners = meta.get("ownerReferences") or []
                    gone = all(owner.get("uid") not in uids for owner in owners)
                    if owners and gone and not meta.get("deletionTimestamp"):
                        orphans.append((key, obj))
                for (resource, _, _), obj in orphans:
                    if obj.raw.get("metadata", {}).get("finalizers"):
                        obj.patch({"metadata": {"deletionTimestamp": _now()}})
                        event = {"type": "MODIFIED", "object": obj.raw}
                    else:
                        raw = obj.raw
                        obj.delete()
                        event = {"type": "DELETED", "object": raw}
                    await self._buses[resource].put(event)
            if not orphans:
                return
