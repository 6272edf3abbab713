"""An InferencePool per ModelDeployment, where the Gateway API Inference Extension is installed.

Layer 2 (rendering): the pool selects exactly the pods the entry Service selects (the router's
in a disaggregated plan, the colocated pools' otherwise) on the engine port, is owned by the
ModelDeployment, and is valid against the test CRD's schema (tests/data, written from the
extension's v1 API reference).

Layer 3 (the real kopf operator against the real API server): without the CRD the operator
applies the deployment and publishes nothing, asking discovery at most once per TTL; installing
the CRD publishes the pools of the deployments that exist (the CRD's watch event), with the
server's view of selector, port, picker and owner; deleting the ModelDeployment lets the garbage
collector take its pool; a pool of that name held by someone else is left alone, with a Warning
event, and the deployment is applied all the same. Real server only: the CRD is installed and
removed at run time, and the test reads what the server's schema pruning and defaulting kept.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from api_samples import example_classes, plan_for, spec_of
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    real_server_only,
    wait_for,
)
from operator_permissions import operator_needs
from tessera.api.model_deployment import Plan
from tessera.operator import render
from tessera.operator.inference_pool import (
    ENDPOINT_PICKER_PORT,
    INFERENCE_GROUP,
    INFERENCE_POOL_CRD,
    INFERENCE_POOLS,
    INFERENCE_VERSION,
    InferencePoolPublisher,
    crd_serves_pools,
    endpoint_picker_name,
    render_inference_pool,
)
from test_operator_rbac import (  # noqa: F401  (a fixture, used by name)
    release_namespace_fixture,
    render_chart_rbac,
    run_with,
    without_verb,
)

CRD_FILE = Path(__file__).resolve().parent / "data" / f"{INFERENCE_POOL_CRD}.yaml"
TEST_CRD_LABEL = "tessera.dev/test-inference-pool-crd"
OWNER = render.Owner(name="chat", namespace="serving", uid="3f6b8f0e-0000-4000-8000-000000000002")
DISCOVERY_PATH = f"/apis/{INFERENCE_GROUP}/{INFERENCE_VERSION}"
GC_REDISCOVERY_DEADLINE_S = 90.0
"""The garbage collector follows a resource installed at run time after its next discovery
resync (every 30 s), then deletes the dependents whose owner is gone."""


def crd_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return document


def pool_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd_document()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# --- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_the_pool_selects_the_entry_pods_on_the_engine_port(mode: str) -> None:
    spec = spec_of(servingMode=mode)
    plan = plan_for(spec)
    assert render.is_disaggregated(plan) == (mode == "disaggregated")
    pool = render_inference_pool(OWNER, spec, plan)
    children = render.render_children(OWNER, spec, plan, example_classes())

    entry_service = next(c for c in children if c["metadata"]["name"] == "chat")
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == entry_service["spec"]["selector"]
    templates = {
        c["metadata"]["name"]: c["spec"]["template"]["metadata"]["labels"]
        for c in children
        if c["kind"] == "Deployment"
    }
    selected = sorted(name for name, labels in templates.items() if selects(selector, labels))
    expected = (
        ["chat-router"] if mode == "disaggregated" else [f"chat-{p.name}" for p in plan.pools]
    )
    assert selected == sorted(expected)
    assert pool["spec"]["targetPorts"] == [{"number": spec.engine.port}]
    for name in selected:  # the port the selected pods listen on
        deployment = next(c for c in children if c["metadata"]["name"] == name)
        ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert spec.engine.port in [p["containerPort"] for p in ports]


def test_the_pool_is_owned_named_and_refers_to_the_documented_picker() -> None:
    spec = spec_of(servingMode="colocated")
    pool = render_inference_pool(OWNER, spec, plan_for(spec))
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["kind"] == "InferencePool"
    meta = pool["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat", "serving")
    assert meta["ownerReferences"] == [OWNER.reference()]
    assert meta["ownerReferences"][0]["controller"] is True
    assert render.selector_labels(OWNER).items() <= meta["labels"].items()
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service",
        "name": "chat-epp",
        "port": {"number": ENDPOINT_PICKER_PORT},
        "failureMode": "FailOpen",
    }


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_the_rendered_pool_is_valid_for_the_crd_schema(mode: str) -> None:
    spec = spec_of(servingMode=mode)
    pool = render_inference_pool(OWNER, spec, plan_for(spec))
    jsonschema.validate(pool, pool_schema())
    broken = copy.deepcopy(pool)
    broken["spec"]["targetPorts"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, pool_schema())


def test_long_names_stay_valid_and_distinct() -> None:
    spec = spec_of(servingMode="colocated")
    plan = plan_for(spec)
    names = set()
    for name in ("a" * 70, "a" * 70 + "b", "Chat.Model"):
        owner = render.Owner(name=name, namespace="serving", uid="u")
        pool = render_inference_pool(owner, spec, plan)
        pool_name = pool["metadata"]["name"]
        picker = pool["spec"]["endpointPickerRef"]["name"]
        assert pool_name == render.dns_label(pool_name) and len(pool_name) <= 63
        assert picker == endpoint_picker_name(owner) and len(picker) <= 63
        assert picker == render.dns_label(picker)
        selector = pool["spec"]["selector"]["matchLabels"]
        assert all(len(value) <= 63 for value in selector.values())
        names.add(pool_name)
    assert len(names) == 3


def established(crd: dict[str, Any], status: str = "True") -> dict[str, Any]:
    return {**crd, "status": {"conditions": [{"type": "Established", "status": status}]}}


def test_a_crd_serves_pools_once_established_with_v1_served() -> None:
    crd = crd_document()
    assert crd_serves_pools(established(crd))
    assert not crd_serves_pools(crd)
    assert not crd_serves_pools(established(crd, "False"))
    unserved = copy.deepcopy(crd)
    unserved["spec"]["versions"][0]["served"] = False
    assert not crd_serves_pools(established(unserved))
    alpha = copy.deepcopy(crd)
    alpha["spec"]["versions"][0]["name"] = "v1alpha2"
    assert not crd_serves_pools(established(alpha))
    other = copy.deepcopy(crd)
    other["spec"]["group"] = "inference.networking.x-k8s.io"
    assert not crd_serves_pools(established(other))


# --- against the real API server ---------------------------------------------------------------


class CountingApiClient(client.ApiClient):
    """An ApiClient that counts the discovery requests for InferencePools it sends."""

    def __init__(self, configuration: client.Configuration) -> None:
        super().__init__(configuration)
        self.discoveries = 0

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method == "GET" and url.split("?")[0].endswith(DISCOVERY_PATH):
            self.discoveries += 1
        return super().call_api(method, url, *args, **kwargs)


class PoolCrd:
    """The test CRD, installed and removed on the server (cluster-scoped: module-wide)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def _found(self) -> Any:
        try:
            return self.cluster.extensions.read_custom_resource_definition(INFERENCE_POOL_CRD)
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def foreign(self) -> bool:
        found = self._found()
        return found is not None and TEST_CRD_LABEL not in (found.metadata.labels or {})

    def served(self) -> bool:
        try:
            listed = self.cluster.custom.get_api_resources(
                INFERENCE_GROUP, INFERENCE_VERSION, _preload_content=False
            )
        except ApiException as error:
            if error.status != 404:
                raise
            return False
        resources = json.loads(listed.data).get("resources") or []
        return any(r.get("name") == INFERENCE_POOLS for r in resources)

    def install(self) -> None:
        try:
            self.cluster.extensions.create_custom_resource_definition(crd_document())
        except ApiException as error:
            if error.status != 409:  # 409: installed by an earlier test, reused
                raise
        wait_for(self.served, f"{INFERENCE_POOL_CRD} served")

    def remove(self) -> None:
        with contextlib.suppress(ApiException):
            self.cluster.extensions.delete_custom_resource_definition(INFERENCE_POOL_CRD)
        wait_for(lambda: self._found() is None and not self.served(), "the CRD gone")


@pytest.fixture(scope="module", name="pool_crd")
def pool_crd_fixture(cluster: Cluster) -> Iterator[PoolCrd]:
    """Control of the test CRD; absent at the start of the module, removed after it."""
    crd = PoolCrd(cluster)
    if crd.foreign():
        pytest.skip("the Gateway API Inference Extension is installed: the test cannot remove it")
    crd.remove()
    try:
        yield crd
    finally:
        crd.remove()


def get_pool(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            INFERENCE_GROUP, INFERENCE_VERSION, namespace, INFERENCE_POOLS, name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return found


def applied(cluster: Cluster, namespace: str, name: str = "chat") -> dict[str, Any] | None:
    md = cluster.get_md(namespace, name) or {}
    found = {c["type"]: c for c in (md.get("status") or {}).get("conditions") or []}
    return md if found.get("Degraded", {}).get("reason") == "PlanApplied" else None


def assert_pool_of(cluster: Cluster, md: dict[str, Any], pool: dict[str, Any]) -> None:
    """The pool on the server selects what the entry Service selects, on its port, owned by
    the ModelDeployment, with the documented picker."""
    ns, name = md["metadata"]["namespace"], md["metadata"]["name"]
    service = cluster.core.read_namespaced_service(name, ns)
    assert pool["spec"]["selector"] == {"matchLabels": service.spec.selector}
    plan = Plan.model_validate(md["status"]["plan"])
    entry = "router" if render.is_disaggregated(plan) else render.entry_role(plan).value
    assert service.spec.selector == {"tessera.dev/deployment": name, "tessera.dev/role": entry}
    assert pool["spec"]["targetPorts"] == [{"number": service.spec.ports[0].port}]
    assert pool["spec"]["endpointPickerRef"] == {
        "group": "",  # the schema's default, written by the server
        "kind": "Service",
        "name": f"{name}-epp",
        "port": {"number": ENDPOINT_PICKER_PORT},
        "failureMode": "FailOpen",
    }
    (owner,) = pool["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelDeployment",
        name,
        md["metadata"]["uid"],
        True,
    )


@real_server_only("installs and removes a CRD, reads the server's schema defaulting")
def test_without_the_crd_nothing_is_published_and_installing_it_publishes(
    cluster: Cluster, namespace: Namespace, pool_crd: PoolCrd
) -> None:
    ns = namespace.name
    namespace.create_classes("l40s")
    running = OperatorThread(cluster, ns).start()
    try:
        cluster.create_md(ns, namespace.chat_deployment())
        md = wait_for(lambda: applied(cluster, ns), "PlanApplied without the CRD")
        assert not pool_crd.served()
        events = {e["reason"] for e in cluster.events(ns, "chat")}
        assert not any(reason.startswith("InferencePool") for reason in events), events

        # Installing the CRD publishes the existing deployment's pool (the CRD's watch event),
        # with nothing changed on the ModelDeployment.
        pool_crd.install()
        pool = wait_for(lambda: get_pool(cluster, ns, "chat"), "the InferencePool published")
        assert_pool_of(cluster, md, pool)
        assert (cluster.get_md(ns, "chat") or {})["metadata"]["generation"] == (
            md["metadata"]["generation"]
        )

        # Deleting the ModelDeployment: the garbage collector takes the pool with it, once it
        # follows the new resource (kube-controller-manager rediscovers resources every 30 s).
        cluster.delete_md(ns, "chat")
        wait_for(
            lambda: get_pool(cluster, ns, "chat") is None,
            "the pool garbage-collected",
            timeout_s=GC_REDISCOVERY_DEADLINE_S,
            every_s=0.5,
        )
    finally:
        running.stop()


@real_server_only("discovery of a group no CRD serves")
def test_discovery_is_asked_at_most_once_per_ttl_when_the_crd_is_absent(
    cluster: Cluster, pool_crd: PoolCrd
) -> None:
    pool_crd.remove()
    api_client = CountingApiClient(cluster.configuration)
    now = [0.0]
    publisher = InferencePoolPublisher(api_client, ttl_s=60.0, clock=lambda: now[0])
    spec = spec_of(servingMode="colocated")
    plan = plan_for(spec)
    try:
        for _ in range(20):
            assert publisher.publish(OWNER, spec, plan).outcome.name == "NOT_SERVED"
        assert api_client.discoveries == 1
        now[0] = 61.0
        assert not publisher.served()
        assert api_client.discoveries == 2
    finally:
        api_client.close()


@real_server_only("installs a CRD, server-side applies to it")
def test_a_pool_someone_else_holds_is_left_alone_with_a_warning(
    cluster: Cluster, namespace: Namespace, pool_crd: PoolCrd
) -> None:
    ns = namespace.name
    pool_crd.install()
    theirs = {
        "apiVersion": f"{INFERENCE_GROUP}/{INFERENCE_VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "theirs"}},
            "targetPorts": [{"number": 8080}],
            "endpointPickerRef": {"name": "their-epp", "port": {"number": 9002}},
        },
    }
    cluster.custom.create_namespaced_custom_object(
        INFERENCE_GROUP, INFERENCE_VERSION, ns, INFERENCE_POOLS, theirs
    )
    namespace.create_classes("l40s")
    running = OperatorThread(cluster, ns).start()
    try:
        cluster.create_md(ns, namespace.chat_deployment())
        wait_for(lambda: applied(cluster, ns), "PlanApplied despite the pool's name being held")
        warning = wait_for(
            lambda: [
                e for e in cluster.events(ns, "chat") if e["reason"] == "InferencePoolNameConflict"
            ],
            "a Warning event about the held pool name",
        )[0]
        assert warning["type"] == "Warning"
        assert "InferencePool chat" in warning["message"]
        pool = get_pool(cluster, ns, "chat") or {}
        assert pool["spec"]["selector"] == {"matchLabels": {"app": "theirs"}}
        assert not pool["metadata"].get("ownerReferences")

        # A second deployment, whose name is free, gets its own pool meanwhile.
        other = namespace.chat_deployment("chat-b")
        cluster.create_md(ns, other)
        md = wait_for(lambda: applied(cluster, ns, "chat-b"), "chat-b applied")
        pool_b = wait_for(lambda: get_pool(cluster, ns, "chat-b"), "chat-b's pool")
        assert_pool_of(cluster, md, pool_b)
    finally:
        running.stop()


def test_the_operators_derived_requests_include_publishing_pools() -> None:
    """The chart's RBAC tests derive the operator's requests from its code: publishing a pool
    reads it by name and server-side applies it (create and patch), in the served namespaces;
    discovery needs no rule."""
    found = {
        (n.where, n.verb)
        for n in operator_needs()
        if (n.group, n.resource)
        == (
            INFERENCE_GROUP,
            INFERENCE_POOLS,
        )
    }
    assert found == {("served", "get"), ("served", "create"), ("served", "patch")}


@real_server_only("RBAC is not enforced by the emulator")
@pytest.mark.parametrize("granted", [True, False], ids=["chart-rbac", "without-create"])
def test_with_the_charts_rbac_the_pool_is_published_and_without_it_refused(
    cluster: Cluster,
    namespace: Namespace,
    release_namespace: str,
    pool_crd: PoolCrd,
    granted: bool,
) -> None:
    ns = namespace.name
    pool_crd.install()
    objects = render_chart_rbac(f"t{secrets.token_hex(3)}", release_namespace, ns)
    if not granted:
        objects = without_verb(objects, INFERENCE_POOLS, "create")
    account, running, rbac = run_with(cluster, namespace, objects)
    try:
        namespace.create_classes("l40s")
        cluster.create_md(ns, namespace.chat_deployment())
        md = wait_for(lambda: applied(cluster, ns), "PlanApplied under the chart's RBAC", 60.0)
        if granted:
            pool = wait_for(lambda: get_pool(cluster, ns, "chat"), "the pool published")
            assert_pool_of(cluster, md, pool)
            return
        refused = wait_for(
            lambda: [
                e for e in cluster.events(ns, "chat") if e["reason"] == "InferencePoolRefused"
            ],
            "a Warning event about the refused pool",
        )[0]
        assert refused["type"] == "Warning" and "403" in refused["message"], refused
        assert get_pool(cluster, ns, "chat") is None
    finally:
        running.stop()
        account.api_client.close()
        rbac.delete()
