"""What the operator asks of the API server, derived from its code (for the chart's RBAC tests).

Three sources, none of them a hand-kept list of permissions:

1. Kubernetes client calls in operator/*.py: every reference to a method of a client API class
   the package constructs (`client.AppsV1Api(...)`, ...), called there or passed on (as
   `ChildApplier` and `LeaseElector` do). The request each method makes (HTTP method and path)
   is read from the kubernetes client itself (its `_<method>_serialize`), so verb and resource
   are the client's. CustomObjectsApi methods take group and plural from the call's arguments
   (literals or module constants).
2. The kopf handlers the handler modules register: every one needs list and watch; a changing
   (create/update/resume/delete) handler also patch (kopf's progress and diff-base
   annotations, its finalizer), and so does a daemon or timer (its finalizer).
3. kopf's own requests, from its source: kopf/_core/reactor/observation.py lists and watches
   CRDs, and namespaces when it serves some namespaces only (not cluster-wide);
   kopf/_cogs/clients/events.py posts events (`kopf.event`, and handler failures at the
   posting level) in the object's namespace, or for a cluster-scoped object in its default
   namespace, which the login handler sets to the operator's own.

Where a request applies: `cluster` (a cluster-scoped resource, or a cluster-wide list), `served`
(the namespaces the operator serves: ModelDeployments and their children) or `own` (the
operator's own namespace: the Lease).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

OPERATOR = Path(__file__).resolve().parent.parent / "operator"
PACKAGE = "tessera.operator"
HANDLER_MODULES = ("tessera.operator.handlers",)

OWN_NAMESPACE_MODULES = {"leader": "leader-election"}
"""Modules whose namespaced requests go to the operator's own namespace, and the feature
that makes them run."""
NOT_RUN_BY_THE_OPERATOR = {
    ("collector", "kubernetes_discovery"): "agent discovery by listing pods; `tessera operator` "
    "discovers agents through their headless Service's DNS name (collector_from_environment)",
}
"""Functions whose requests `tessera operator` never makes, and why."""
CLUSTER_WIDE_FUNCTIONS = {
    ("rebalance_controller", "evict"): "the rebalancer evicts pods in every namespace",
    ("rebalance_controller", "migrate"): "the rebalancer migrates VMs in every namespace",
}
"""Functions whose namespaced requests go to any namespace, not only the served ones."""
LEASE_NAME = "<the leader-election Lease>"
APPLY_PATCH = "application/apply-patch+yaml"

_SERIALIZE = re.compile(r"method='(?P<method>[A-Z]+)',\s*resource_path='(?P<path>[^']+)'")


@dataclass(frozen=True, order=True)
class Need:
    """One request the operator makes: where, what, how."""

    where: str
    """`cluster`, `served` or `own`."""
    group: str
    resource: str
    """Plural, with its subresource (`modeldeployments/status`)."""
    verb: str
    name: str | None = None
    """The one object it is limited to, when the code addresses a single named object."""
    when: str | None = None
    """The feature it comes with (`leader-election`, `some-namespaces`); None: always."""
    origin: str = field(default="", compare=False)


def _request(api: type, method: str) -> tuple[str, str]:
    """(HTTP method, path template) of a kubernetes client API method."""
    source = inspect.getsource(getattr(api, f"_{method}_serialize"))
    match = _SERIALIZE.search(source)
    if match is None:
        raise AssertionError(f"cannot read the request of {api.__name__}.{method}")
    return match["method"], match["path"]


def _verb(http: str, path: str) -> str:
    named = "{name}" in path
    return {
        ("GET", True): "get",
        ("GET", False): "list",
        ("POST", False): "create",
        ("POST", True): "create",  # a subresource of a named object: pods/{name}/eviction
        ("PATCH", True): "patch",
        ("PUT", True): "update",
        ("DELETE", True): "delete",
        ("DELETE", False): "deletecollection",
    }[http, named]


def _is_discovery(path: str) -> bool:
    """A discovery request (GET /api/v1, /apis/<group>/<version>): a non-resource URL that the
    default ClusterRole system:discovery grants every authenticated user, so no chart rule."""
    parts = path.strip("/").split("/")
    return (parts[0] == "api" and len(parts) <= 2) or (parts[0] == "apis" and len(parts) <= 3)


def _resource(path: str, arguments: dict[str, Any]) -> tuple[str, str, bool]:
    """(group, resource[/subresource], namespaced) of a request path."""
    for key, value in arguments.items():
        path = path.replace(f"{{{key}}}", str(value)) if key in ("group", "plural") else path
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespaced = rest[:1] == ["namespaces"] and rest[1:2] == ["{namespace}"]
    if namespaced:
        rest = rest[2:]
    resource = rest[0]
    if len(rest) > 2:  # {name}/subresource
        resource = f"{resource}/{rest[2]}"
    return group, resource, namespaced


def _constructed_apis(tree: ast.AST) -> set[str]:
    """Names of the kubernetes client API classes a module constructs."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name.endswith("Api") and isinstance(getattr(client, name, None), type):
                found.add(name)
    return found


class _Scanner(ast.NodeVisitor):
    """Every reference to a client API method in one module, with its call's arguments."""

    def __init__(self, module: str, apis: list[type]) -> None:
        self.module = module
        self.globals = vars(importlib.import_module(f"{PACKAGE}.{module}"))
        self.apis = apis
        self.function = ""
        self.scope: ast.AST | None = None
        self.found: list[tuple[str, type, str, dict[str, Any]]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer = (self.function, self.scope)
        if not self.function:
            self.function = node.name
        self.scope = node
        self.generic_visit(node)
        self.function, self.scope = outer

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owners = [api for api in self.apis if hasattr(api, f"_{node.attr}_serialize")]
        if owners and all(_is_discovery(_request(api, node.attr)[1]) for api in owners):
            owners = []  # every API class has `get_api_resources`: discovery, no rule needed
        if owners:
            assert len(owners) == 1, f"{self.module}: {node.attr} is a method of {owners}"
            arguments = self._arguments(owners[0], node)
            self.found.append((self.function, owners[0], node.attr, arguments))
        self.generic_visit(node)

    def _arguments(self, api: type, reference: ast.Attribute) -> dict[str, Any]:
        if api is not client.CustomObjectsApi:
            return {}
        call = self._call_of(reference)
        names = list(inspect.signature(getattr(api, reference.attr)).parameters)[1:]  # no self
        values = {names[i]: self._value(arg) for i, arg in enumerate(call[0])}
        values.update({k: self._value(v) for k, v in call[1].items()})
        return values

    def _call_of(self, reference: ast.Attribute) -> tuple[list[ast.expr], dict[str, ast.expr]]:
        """The arguments the method is called with: where it is called, or where it (or the
        local name it is assigned to) is passed on as a call's argument."""
        assert self.scope is not None, f"{self.module}: {reference.attr} outside a function"
        aliases: set[str] = set()
        for node in ast.walk(self.scope):
            if isinstance(node, ast.Assign) and node.value is reference:
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(self.scope):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if node.func is reference:
                return list(node.args), keywords
            for index, arg in enumerate(node.args):
                if arg is reference or (isinstance(arg, ast.Name) and arg.id in aliases):
                    return list(node.args[index + 1 :]), keywords
        raise AssertionError(f"{self.module}.{self.function}: no call of {reference.attr}")

    def _value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.globals:
            return self.globals[node.id]
        return None  # a run-time value (a namespace, a name, a body)


def client_needs() -> list[Need]:
    """The requests of every kubernetes client call in operator/.

    A module that server-side applies (the apply-patch content type) may create with its patch
    methods: the API server authorizes such a PATCH of a missing object as create.
    """
    needs = []
    trees = {path.stem: ast.parse(path.read_text()) for path in sorted(OPERATOR.glob("*.py"))}
    constructed = set().union(*(_constructed_apis(tree) for tree in trees.values()))
    apis = [getattr(client, name) for name in sorted(constructed)]
    for module, tree in trees.items():
        applies = APPLY_PATCH in ast.unparse(tree)
        scanner = _Scanner(module, apis)
        scanner.visit(tree)
        for function, api, method, arguments in scanner.found:
            if (module, function) in NOT_RUN_BY_THE_OPERATOR:
                continue
            http, template = _request(api, method)
            group, resource, namespaced = _resource(template, arguments)
            assert "{" not in group + resource, f"{module}.{function}: {method} {arguments}"
            own = OWN_NAMESPACE_MODULES.get(module)
            where = ("own" if own else "served") if namespaced else "cluster"
            if (module, function) in CLUSTER_WIDE_FUNCTIONS:
                where = "cluster"
            verb = _verb(http, template)
            name = LEASE_NAME if own and "{name}" in template else None
            origin = f"{module}.{function}: {method}"
            needs.append(Need(where, group, resource, verb, name, own, origin))
            if verb == "patch" and applies:
                needs.append(Need(where, group, resource, "create", name, own, origin + " (apply)"))
    return needs


def _scope(group: str, plural: str) -> str:
    from tessera.api.loader import RESOURCE_TYPES

    for model in RESOURCE_TYPES.values():
        if group == "tessera.dev" and model.crd.plural == plural:
            return "served" if model.crd.scope == "Namespaced" else "cluster"
    namespaced = {("apps", "deployments"), ("", "services"), ("", "pods"), ("", "events")}
    cluster = {("", "nodes"), ("", "namespaces")}
    cluster |= {("apiextensions.k8s.io", "customresourcedefinitions")}
    assert (group, plural) in namespaced | cluster, f"scope of {group}/{plural} unknown here"
    return "served" if (group, plural) in namespaced else "cluster"


def kopf_needs() -> list[Need]:
    """The requests kopf makes for the registered handlers, and for itself."""
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    registry = kopf.get_default_registry()
    needs = []
    kinds: tuple[tuple[str, Any], ...] = (
        ("watching", registry._watching.get_all_handlers()),
        ("changing", registry._changing.get_all_handlers()),
        ("spawning", registry._spawning.get_all_handlers()),
    )
    for kind, handlers in kinds:
        for handler in handlers:
            selector = handler.selector
            assert selector is not None and selector.any_name, handler
            group, plural = selector.group or "", selector.any_name
            where = _scope(group, plural)
            origin = f"kopf {kind} {handler.id}"
            verbs = ["list", "watch"]
            if kind == "changing" or getattr(handler, "requires_finalizer", None):
                verbs.append("patch")  # progress annotations, finalizers
            needs += [Need(where, group, plural, verb, origin=origin) for verb in verbs]
            if where == "cluster":  # failures of its handlers are posted in kopf's namespace
                needs.append(Need("own", "", "events", "create", origin=f"kopf posts {plural}"))
    needs += [
        Need("cluster", "apiextensions.k8s.io", "customresourcedefinitions", v, origin="kopf")
        for v in ("list", "watch")
    ]
    needs += [
        Need("cluster", "", "namespaces", v, when="some-namespaces", origin="kopf")
        for v in ("list", "watch")
    ]
    needs.append(Need("served", "", "events", "create", origin="kopf.event / kopf posting"))
    return needs


def operator_needs() -> list[Need]:
    return client_needs() + kopf_needs()


Request = tuple[str, Need, str | None]
"""(where: `*` cluster-wide or a namespace, the request, the one object's name if limited)."""


def requests_for(
    served: list[str], leader_election: bool, lease: str | None, own_namespace: str
) -> list[Request]:
    """Everything the operator requests when it serves `served` (empty: every namespace), with
    or without leader election on the Lease `lease`, running in `own_namespace`."""
    features = {"leader-election"} if leader_election else set()
    features |= {"some-namespaces"} if served else set()
    found: list[Request] = []
    for need in sorted(set(operator_needs())):
        if need.when is not None and need.when not in features:
            continue
        name = lease if need.name == LEASE_NAME else need.name
        scopes = {"cluster": ["*"], "served": served or ["*"], "own": [own_namespace]}
        found += [(scope, need, name) for scope in scopes[need.where]]
    return found
