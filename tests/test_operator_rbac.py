"""The operator with exactly the RBAC the Helm chart renders, on the real API server.

The chart is rendered with the real `helm` (`helm template`, one watched namespace, leader
election on); its
ServiceAccount, Roles, ClusterRoles and bindings are created on the server; the operator runs
with a token of that ServiceAccount (TokenRequest) and nothing else. It must plan, apply the
children, write status, post events and hold its Lease. With one verb taken from the chart's
rules, the reconcile it needs fails and nothing is applied: the test can tell a missing rule.

Needs a real API server (RBAC is not enforced by the emulator) and the helm binary.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils
from kubernetes.client.exceptions import ApiException
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    Cluster,
    Namespace,
    OperatorThread,
    cluster_fixture,
    namespace_fixture,
    wait_for,
)
from prometheus_client import REGISTRY
from tessera.api.model_deployment import Plan
from tessera.operator.leader import LeaseElector, LeaseTiming
from tessera.operator.render import is_disaggregated

CHART = Path(__file__).resolve().parents[1] / "helm" / "tessera"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
CHILDREN = "app.kubernetes.io/managed-by=tessera,tessera.dev/deployment=chat"


def render_chart_rbac(
    release: str, release_namespace: str, watched: str | None
) -> list[dict[str, Any]]:
    """The chart's RBAC objects for a release serving one namespace (all when None)."""
    helm = shutil.which("helm")
    if helm is None:
        pytest.fail("the helm binary is needed (tools/install-dev.sh installs it)")
    rendered = subprocess.run(
        [
            helm, "template", release, str(CHART),
            "--namespace", release_namespace,
            "--set", "operator.leaderElection.enabled=true",
            *(["--set", f"operator.watchNamespaces={{{watched}}}"] if watched else []),
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") in RBAC_KINDS]


def without_verb(objects: list[dict[str, Any]], resource: str, verb: str) -> list[dict[str, Any]]:
    """The same RBAC with `verb` on `resource` taken out of every rule that grants it."""
    changed = copy.deepcopy(objects)
    removed = 0
    for document in changed:
        for rule in document.get("rules") or []:
            if resource in rule.get("resources", []) and verb in rule.get("verbs", []):
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
                removed += 1
    assert removed, f"the chart grants no {verb} on {resource}"
    return changed


class ChartRbac:
    """The chart's RBAC created on the server for one test, and a client of its account."""

    def __init__(self, cluster: Cluster, objects: list[dict[str, Any]]) -> None:
        self.cluster = cluster
        self.objects = objects

    def create(self) -> client.Configuration:
        for document in self.objects:
            utils.create_from_dict(self.cluster.api_client, document)
        account = next(
            d["metadata"]
            for d in self.objects
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("-operator")
        )
        token = self.cluster.core.create_namespaced_service_account_token(
            account["name"],
            account["namespace"],
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    audiences=["https://kubernetes.default.svc"], expiration_seconds=3600
                )
            ),
        ).status.token
        configuration = client.Configuration()
        configuration.host = self.cluster.configuration.host
        configuration.ssl_ca_cert = self.cluster.configuration.ssl_ca_cert
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return configuration

    def delete(self) -> None:
        rbac = client.RbacAuthorizationV1Api(self.cluster.api_client)
        deleters: dict[str, Callable[..., Any]] = {
            "ClusterRole": rbac.delete_cluster_role,
            "ClusterRoleBinding": rbac.delete_cluster_role_binding,
        }
        for document in self.objects:
            delete = deleters.get(document["kind"])
            if delete is not None:
                try:
                    delete(document["metadata"]["name"])
                except ApiException as error:
                    if error.status != 404:
                        raise


@pytest.fixture(name="release_namespace")
def release_namespace_fixture(cluster: Cluster) -> Iterator[str]:
    if cluster.emulated:
        pytest.skip("real server only: the emulator enforces no RBAC")
    name = f"tessera-system-{secrets.token_hex(3)}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        cluster.core.delete_namespace(name)


def errors_so_far() -> float:
    value = REGISTRY.get_sample_value("tessera_operator_reconciles_total", {"outcome": "Error"})
    return value or 0.0


def run_with(
    cluster: Cluster, namespace: Namespace, objects: list[dict[str, Any]]
) -> tuple[Cluster, OperatorThread, ChartRbac]:
    rbac = ChartRbac(cluster, objects)
    account = Cluster(rbac.create(), emulated=False)
    return account, OperatorThread(account, namespace.name).start(), rbac


@pytest.mark.parametrize("scope", ["namespaced", "cluster-wide"])
def test_the_operator_does_its_job_with_exactly_the_charts_rbac(
    cluster: Cluster, namespace: Namespace, release_namespace: str, scope: str
) -> None:
    release = f"t{secrets.token_hex(3)}"
    watched = namespace.name if scope == "namespaced" else None
    objects = render_chart_rbac(release, release_namespace, watched)
    account, running, rbac = run_with(cluster, namespace, objects)
    try:
        namespace.create_classes("l40s")
        cluster.create_md(namespace.name, namespace.chat_deployment())

        def applied() -> dict[str, Any] | None:
            md = cluster.get_md(namespace.name, "chat") or {}
            found = {c["type"]: c for c in (md.get("status") or {}).get("conditions") or []}
            return md if found.get("Degraded", {}).get("reason") == "PlanApplied" else None

        md = wait_for(applied, "PlanApplied under the chart's RBAC", timeout_s=60.0)
        plan = Plan.model_validate(md["status"]["plan"])
        routers = 1 if is_disaggregated(plan) else 0  # a router Deployment fronts P/D pools
        assert len(cluster.deployments(namespace.name, CHILDREN)) == len(plan.pools) + routers
        assert cluster.services(namespace.name, CHILDREN)
        wait_for(lambda: cluster.events(namespace.name, "chat"), "the operator's events")

        # The Lease in the release namespace (named as the chart names it), as a replica with
        # leader election holds it.
        elector = LeaseElector(
            account.api_client,
            release_namespace,
            f"{release}-tessera-operator",
            "pod-a",
            LeaseTiming(lease_duration_s=15, renew_deadline_s=10, retry_period_s=0.1),
        )

        async def lead() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(elector.campaign(stop))
            await asyncio.wait_for(elector.leading.wait(), 20)
            stop.set()
            await asyncio.wait_for(task, 20)

        asyncio.run(lead())
    finally:
        running.stop()
        account.api_client.close()
        rbac.delete()


def test_a_verb_missing_from_the_charts_rbac_fails_the_reconcile(
    cluster: Cluster, namespace: Namespace, release_namespace: str
) -> None:
    release = f"t{secrets.token_hex(3)}"
    objects = render_chart_rbac(release, release_namespace, namespace.name)
    crippled = without_verb(objects, "deployments", "patch")  # server-side apply is a PATCH
    before = errors_so_far()
    account, running, rbac = run_with(cluster, namespace, crippled)
    try:
        namespace.create_classes("l40s")
        cluster.create_md(namespace.name, namespace.chat_deployment())
        wait_for(lambda: errors_so_far() > before, "a failed reconcile", timeout_s=60.0)
        assert cluster.deployments(namespace.name, CHILDREN) == []
    finally:
        running.stop()
        account.api_client.close()
        rbac.delete()
