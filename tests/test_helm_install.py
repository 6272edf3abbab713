"""`helm install` of the chart into the real kube-apiserver 1.20 of the test control plane.

What only a real install shows: helm picks the CRD variant by the server's version (1.20: no
CEL, which the server's schema for CRDs would refuse), every rendered object is one the 1.20 API
accepts (kubernetes_validate has no schemas before 1.25), the CRDs validate custom resources, the
chart's RBAC grants the operator's ServiceAccount every request the operator's code makes and
not the ones it never makes (asked of the server's own authorizer with SubjectAccessReviews), and
`helm uninstall` leaves the CRDs in place.

No kubelet runs: the operator and agent pods are scheduled (or stay Pending), never started, so
the install is not waited for. Needs the helm binary and the control plane (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_samples import chat_deployment
from kube_control_plane import ControlPlane
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from operator_permissions import requests_for
from tessera.api.common import GROUP, VERSION
from tessera.api.crdgen import CEL_RULES, build_crds

HELM = shutil.which("helm")
pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not on PATH (.ci/install-helm.sh)")

CHART = Path(__file__).resolve().parent.parent / "helm" / "tessera"
HELM_TIMEOUT_S = 120
NOT_REQUESTED = [
    ("*", "apps", "statefulsets", "create"),
    ("*", "", "pods", "delete"),  # the rebalancer lists pods and evicts, never deletes
    ("*", "", "secrets", "get"),
    ("*", "apps", "deployments", "update"),
    ("*", "", "configmaps", "get"),
    ("*", "tessera.dev", "modeldeployments", "delete"),
]
"""Requests the operator never makes, which the old chart granted or which it must not have."""


def helm(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run(
        [HELM, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_S,
        check=False,
    )


def adopt_existing_crds(api: client.ApiextensionsV1Api, release: str, namespace: str) -> None:
    """Mark Tessera CRDs that other tests installed as this release's, as helm adopts objects
    (helm refuses to take over objects that are not marked)."""
    for crd in build_crds("1.20"):
        name = crd["metadata"]["name"]
        patch = {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": release,
                    "meta.helm.sh/release-namespace": namespace,
                },
            }
        }
        with contextlib.suppress(ApiException):  # 404: not installed yet, helm creates it
            api.patch_custom_resource_definition(name, patch)


@pytest.fixture(name="installed", scope="module")
def installed_fixture(control_plane: ControlPlane) -> Iterator[dict[str, Any]]:
    """The chart installed, serving one namespace, with leader election; uninstalled after."""
    api_client = client.ApiClient(control_plane.configuration())
    core = client.CoreV1Api(api_client)
    suffix = secrets.token_hex(3)
    release, namespace, served = f"tessera-{suffix}", f"tessera-system-{suffix}", f"llm-{suffix}"
    for name in (namespace, served):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    adopt_existing_crds(client.ApiextensionsV1Api(api_client), release, namespace)
    kubeconfig = control_plane.admin_kubeconfig
    result = helm(
        kubeconfig,
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        f"operator.watchNamespaces={{{served}}}",
        "--set",
        "operator.leaderElection.enabled=true",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = helm(kubeconfig, "get", "manifest", release, "--namespace", namespace)
    assert manifest.returncode == 0, manifest.stderr
    try:
        yield {
            "api_client": api_client,
            "kubeconfig": kubeconfig,
            "release": release,
            "namespace": namespace,
            "served": served,
            "objects": [d for d in yaml.safe_load_all(manifest.stdout) if d],
        }
    finally:
        helm(kubeconfig, "uninstall", release, "--namespace", namespace)
        for name in (namespace, served):
            with contextlib.suppress(ApiException):
                core.delete_namespace(name)
        api_client.close()


def test_helm_installs_the_crds_without_cel_on_1_20(installed: dict[str, Any]) -> None:
    api = client.ApiextensionsV1Api(installed["api_client"])
    version = client.VersionApi(installed["api_client"]).get_code()
    assert (version.major, version.minor.rstrip("+")) == ("1", "20")
    for expected in build_crds("1.20"):
        response = api.read_custom_resource_definition(
            expected["metadata"]["name"], _preload_content=False
        )
        served = json.loads(response.data)
        assert CEL_RULES not in json.dumps(served)
        schema = served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema == expected["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert served["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        established = {c["type"]: c["status"] for c in served["status"]["conditions"]}
        assert established.get("Established") == "True"


def test_the_installed_crds_validate_model_deployments(installed: dict[str, Any]) -> None:
    custom = client.CustomObjectsApi(installed["api_client"])
    document = chat_deployment()
    document["metadata"] = {"name": "chat", "namespace": installed["served"]}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, installed["served"], "modeldeployments", document, dry_run="All"
    )
    document["spec"]["servingMode"] = "split-brain"
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, installed["served"], "modeldeployments", document, dry_run="All"
        )
    assert refused.value.status == 422 and "servingMode" in str(refused.value.body)


def test_every_rendered_object_is_on_the_server(installed: dict[str, Any]) -> None:
    kinds = {obj["kind"] for obj in installed["objects"]}
    assert {"Role", "RoleBinding", "ClusterRole", "NetworkPolicy", "DaemonSet"} <= kinds
    server = dynamic.DynamicClient(installed["api_client"])
    for obj in installed["objects"]:
        kind = server.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        found = kind.get(name=meta["name"], namespace=meta.get("namespace"))  # 404 raises
        assert found.metadata.uid


def _allowed(installed: dict[str, Any], scope: str, group: str, resource: str, verb: str,
             name: str | None) -> bool:  # fmt: skip
    account = f"{installed['release']}-operator"
    resource, _, subresource = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{installed['namespace']}:{account}",
            groups=["system:serviceaccounts", f"system:serviceaccounts:{installed['namespace']}"],
            resource_attributes=client.V1ResourceAttributes(
                namespace=None if scope == "*" else scope,
                group=group,
                resource=resource,
                subresource=subresource or None,
                verb=verb,
                name=name,
            ),
        )
    )
    answer = client.AuthorizationV1Api(installed["api_client"]).create_subject_access_review(review)
    return bool(answer.status.allowed)


def test_the_server_grants_the_operator_every_request_its_code_makes(
    installed: dict[str, Any],
) -> None:
    lease = f"{installed['release']}-operator"
    wanted = requests_for([installed["served"]], True, lease, installed["namespace"])
    refused = [
        f"{need.verb} {need.group}/{need.resource} in {scope} ({need.origin})"
        for scope, need, name in wanted
        if not _allowed(installed, scope, need.group, need.resource, need.verb, name)
    ]
    assert refused == []


def test_the_server_refuses_the_operator_what_it_never_requests(
    installed: dict[str, Any],
) -> None:
    served, own = installed["served"], installed["namespace"]
    granted = [request for request in NOT_REQUESTED if _allowed(installed, *request, None)]
    assert granted == []
    # Outside the namespaces it serves, the operator cannot touch workloads.
    elsewhere = "default"
    for verb in ("create", "patch", "delete"):
        assert _allowed(installed, served, "apps", "deployments", verb, None)
        assert not _allowed(installed, elsewhere, "apps", "deployments", verb, None)
        assert not _allowed(installed, "*", "apps", "deployments", verb, None)
    # Only its own Lease, only in its own namespace.
    assert not _allowed(installed, own, "coordination.k8s.io", "leases", "patch", "another")
    assert not _allowed(installed, served, "coordination.k8s.io", "leases", "create", None)


def test_uninstall_keeps_the_crds(control_plane: ControlPlane, installed: dict[str, Any]) -> None:
    """Runs last in this module (pytest keeps file order): uninstalls, then looks."""
    result = helm(installed["kubeconfig"], "uninstall", installed["release"], "--namespace",
                  installed["namespace"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    api = client.ApiextensionsV1Api(installed["api_client"])
    for crd in build_crds("1.20"):
        api.read_custom_resource_definition(crd["metadata"]["name"])  # 404 would raise
    rbac = client.RbacAuthorizationV1Api(installed["api_client"])
    with pytest.raises(ApiException) as gone:
        rbac.read_cluster_role(f"{installed['release']}-operator")
    assert gone.value.status == 404
