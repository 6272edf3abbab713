"""The Helm chart helm/tessera, rendered by the real `helm` and checked object by object.

What is checked here and why:
- `helm lint --strict` and `helm template` succeed for the default values and for every values
  file in helm/tessera/ci/ (all optional features on, the smallest install) plus a privileged
  agent; values.schema.json rejects bad values *through helm* (a test of the schema that helm
  actually enforces, not of a Python reimplementation).
- Every rendered object is valid against the Kubernetes OpenAPI schemas (`kubernetes_validate`,
  strict: unknown fields are errors) at the oldest and the newest version the package ships
  (1.25 and later; the chart's own minimum, 1.20, is checked by a real `helm install` into the
  1.20 control plane, tests/test_helm_install.py). Kinds it does not know (the Prometheus
  operator's ServiceMonitor) are checked for shape and for what they select.
- What the OpenAPI schemas cannot see: selectors select the pods they should, named ports and
  volumes exist, RBAC is least privilege and covers every resource of tessera.api, security
  contexts obey the API server's cross-field rules, mTLS and node selection follow the values.
- The environment contract: every variable the chart sets on a component is one its command
  reads (a click option's envvar, or the collector's COLLECTOR_ENVIRONMENT), every variable the
  command reads is set by the chart or listed here with the reason it is left to its default,
  and the operator's command line accepts the rendered environment with the values' meaning.
- The chart's CRDs: files/crds/cel is byte-identical to the generated crds/, files/crds/no-cel to
  the CRDs generated for a server before 1.25; `helm template` renders the variant that the
  server's version (--kube-version) evaluates, annotated to survive `helm uninstall`; the
  Grafana dashboard's PromQL parses
  (`promtool`) and queries the metric names the agent and engine export.

Skips, with the reason, when `helm` is not on PATH (`.ci/install-helm.sh` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version
from operator_permissions import LEASE_NAME, Need, Request, operator_needs, requests_for
from tessera.agents.cli import agent_command
from tessera.api.crdgen import CEL_RULES, CHART_VARIANTS, build_crds, render_crd_files
from tessera.api.loader import RESOURCE_TYPES
from tessera.operator.collector import COLLECTOR_ENVIRONMENT
from tessera.operator.main import operator_command

HELM = shutil.which("helm")
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm is not on PATH: run .ci/install-helm.sh to install it"
)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tessera"
CI_VALUES = CHART / "ci"
RELEASE = "tessera-test"
NAMESPACE = "tessera-system"
HELM_TIMEOUT_S = 60

CLUSTER_SCOPED_KINDS = ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition")
# Kinds kubernetes_validate has no schema for, checked by shape below instead.
KINDS_CHECKED_FOR_SHAPE = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# The metric names the agents and the engine export; the dashboard must query every one.
DASHBOARD_METRICS = (
    # from `tessera serve` (vLLM's names)
    "vllm:time_to_first_token_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:request_success_total",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    # from the node agents
    "tessera_device_power_watts",
    "tessera_device_energy_joules_total",
    "tessera_device_power_limit_watts",
    # from the operator's PowerBudget controller
    "tessera_power_budget_draw_watts",
    "tessera_power_budget_watts",
    "tessera_power_budget_headroom_watts",
    "tessera_power_budget_predicted_draw_watts",
    "tessera_power_budget_capped_devices",
    "tessera_power_budget_mode",
    "tessera_power_budget_last_action_timestamp_seconds",
    "tessera_power_budget_device_power_limit_watts",
    "tessera_power_budget_device_sm_clock_max_hertz",
    "tessera_power_budget_actions_total",
    "tessera_power_budget_over_budget_seconds_total",
)

Obj = dict[str, Any]


def _chart_metadata() -> Obj:
    metadata: Obj = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return metadata


def _min_kube_version() -> str:
    """The lowest Kubernetes version Chart.yaml's kubeVersion admits, e.g. '1.30.0'."""
    match = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", _chart_metadata()["kubeVersion"])
    assert match, "Chart.yaml kubeVersion must be of the form '>=X.Y.Z-0'"
    return match.group(1)


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


SCHEMA_VERSIONS = sorted(
    {
        ".".join(str(n) for n in max(_major_minor(_min_kube_version()), _major_minor(v)))
        for v in (min(all_versions(), key=_major_minor), latest_version())
    },
    key=_major_minor,
)

# name -> (values files, --set overrides): the configurations rendered and checked.
CASES: dict[str, tuple[tuple[Path, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "full": ((CI_VALUES / "full-values.yaml",), ()),
    "minimal": ((CI_VALUES / "minimal-values.yaml",), ()),
    "namespaced": ((CI_VALUES / "namespaced-values.yaml",), ()),
    "privileged-agent": ((), ("agent.privileged=true",)),
}


def _values_args(case: str) -> list[str]:
    files, sets = CASES[case]
    args: list[str] = []
    for path in files:
        args += ["--values", str(path)]
    for assignment in sets:
        args += ["--set", assignment]
    return args


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm; the result is returned whatever the exit code, for the caller to judge."""
    assert HELM is not None
    return subprocess.run(
        [HELM, *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False
    )


def helm_template(*extra: str) -> subprocess.CompletedProcess[str]:
    return run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        _min_kube_version(),
        *extra,
    )


@cache
def render(case: str) -> tuple[Obj, ...]:
    """Every object `helm template` renders for a case (cached: rendering is deterministic)."""
    result = helm_template(*_values_args(case))
    assert result.returncode == 0, f"helm template failed for {case}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@cache
def merged_values(case: str) -> Obj:
    """The values a case renders with, as helm computes them (defaults, files, --set)."""
    result = run_helm("show", "values", str(CHART))
    assert result.returncode == 0, result.stderr
    values: Obj = yaml.safe_load(result.stdout)
    files, sets = CASES[case]
    for path in files:
        values = _deep_merge(values, yaml.safe_load(path.read_text()))
    for assignment in sets:
        key, raw = assignment.split("=", 1)
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(raw)
    return values


def _deep_merge(base: Obj, override: Obj) -> Obj:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def objects(case: str, kind: str) -> list[Obj]:
    return [obj for obj in render(case) if obj["kind"] == kind]


def one(case: str, kind: str, component: str | None = None) -> Obj:
    found = [
        obj
        for obj in objects(case, kind)
        if component is None
        or obj["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} ({component}) in {case}, got {len(found)}"
    return found[0]


def workloads(case: str) -> list[Obj]:
    return [obj for obj in render(case) if obj["kind"] in ("Deployment", "DaemonSet")]


def container(workload: Obj) -> Obj:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    first: Obj = containers[0]
    return first


def env_of(workload: Obj) -> dict[str, Any]:
    return {
        var["name"]: var.get("value", var.get("valueFrom")) for var in container(workload)["env"]
    }


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ---------------------------------------------------------------------------------------------
# helm itself: lint, render, schema enforcement


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_strict(case: str) -> None:
    result = run_helm(
        "lint", "--strict", "--kube-version", _min_kube_version(), str(CHART), *_values_args(case)
    )
    assert result.returncode == 0, f"helm lint failed for {case}:\n{result.stdout}{result.stderr}"


def test_ci_values_files_are_all_rendered() -> None:
    """A values file added to helm/tessera/ci/ must be added to CASES, or it is never checked."""
    covered = {path for files, _ in CASES.values() for path in files}
    assert set(CI_VALUES.glob("*.yaml")) == covered


def test_values_schema_is_valid_and_accepts_every_case() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for case in CASES:
        jsonschema.Draft7Validator(schema).validate(merged_values(case))


@pytest.mark.parametrize(
    ("assignment", "reported_at"),
    [
        ("operator.replicas=-1", "/operator/replicas"),
        ("operator.replicas=2", "/operator/leaderElection/enabled"),
        ("mtls.enabled=true", "/mtls/agentSecretName"),
        ("agent.grpcPort=70000", "/agent/grpcPort"),
        ("operatr.replicas=1", "additional properties 'operatr'"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("metrics.serviceMonitor.interval=soon", "/metrics/serviceMonitor/interval"),
        ("metrics.serviceMonitor.enabled=true,metrics.service.enabled=false", "/metrics/service"),
    ],
)
def test_values_schema_rejects_bad_values_through_helm(assignment: str, reported_at: str) -> None:
    result = helm_template("--set", assignment)
    assert result.returncode != 0, f"helm accepted --set {assignment}"
    assert "schema" in result.stderr, result.stderr
    assert reported_at in result.stderr, result.stderr


@pytest.mark.parametrize(
    "assignment",
    [
        "operator.replicas=0",
        "operator.replicas=2,operator.leaderElection.enabled=true",
        "mtls.enabled=true,mtls.agentSecretName=a-tls,mtls.operatorSecretName=o-tls",
        "agent.grpcPort=65535",
    ],
)
def test_values_schema_accepts_the_neighbouring_good_values(assignment: str) -> None:
    """The rejections above are for the value, not for the key: its good neighbours pass."""
    result = helm_template("--set", assignment)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes OpenAPI schemas


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_objects_match_kubernetes_openapi(case: str, version: str) -> None:
    unknown: set[tuple[str, str]] = set()
    for obj in render(case):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.add((obj["apiVersion"], obj["kind"]))
        except kubernetes_validate.ValidationError as error:
            name = f"{obj['kind']}/{obj['metadata'].get('name')}"
            pytest.fail(f"{case}: {name} is invalid for Kubernetes {version}: {error}")
    assert unknown <= KINDS_CHECKED_FOR_SHAPE, f"no schema for {unknown - KINDS_CHECKED_FOR_SHAPE}"


def test_openapi_validation_is_strict() -> None:
    """Guards the check above: a misspelt field in a rendered Deployment must be an error."""
    deployment = json.loads(json.dumps(one("default", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_has_the_standard_labels(case: str) -> None:
    chart = _chart_metadata()
    for obj in render(case):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == chart["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == f"{chart['name']}-{chart['version']}"
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert "namespace" in obj["metadata"], f"{obj['kind']} without a namespace"


# ---------------------------------------------------------------------------------------------
# Wiring: selectors, ports, volumes, accounts


@pytest.mark.parametrize("case", sorted(CASES))
def test_workloads_are_wired(case: str) -> None:
    accounts = {sa["metadata"]["name"] for sa in objects(case, "ServiceAccount")}
    for workload in workloads(case):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        assert _matches(workload["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        main = container(workload)
        port_names = {port["name"] for port in main["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert main[probe]["httpGet"]["port"] in port_names, f"{name}: {probe} port"
        volumes = {volume["name"] for volume in pod["spec"].get("volumes", [])}
        for mount in main.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: mount {mount['name']} has no volume"
        assert main["command"] == ["tessera"]
        assert main["args"][0] in ("operator", "agent")
        if pod["spec"]["serviceAccountName"] not in accounts:
            # Only an account the values say exists outside the chart may be missing.
            values = merged_values(case)[main["args"][0]]["serviceAccount"]
            assert not values["create"]
            assert pod["spec"]["serviceAccountName"] == values["name"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_services_select_their_pods_and_ports(case: str) -> None:
    for service in objects(case, "Service"):
        selected = [
            w
            for w in workloads(case)
            if _matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"{service['metadata']['name']} selects {len(selected)}"
        port_names = {port["name"] for port in container(selected[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


@pytest.mark.parametrize("case", sorted(CASES))
def test_role_bindings_point_at_rendered_roles_and_accounts(case: str) -> None:
    for binding in objects(case, "ClusterRoleBinding") + objects(case, "RoleBinding"):
        role_kind = binding["roleRef"]["kind"]
        assert binding["roleRef"]["name"] in {
            r["metadata"]["name"] for r in objects(case, role_kind)
        }
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["namespace"] == NAMESPACE
            operator_pod = one(case, "Deployment")["spec"]["template"]["spec"]
            assert subject["name"] == operator_pod["serviceAccountName"]


def test_image_defaults_to_app_version_and_digest_wins() -> None:
    app_version = _chart_metadata()["appVersion"]
    default_image = container(one("default", "Deployment"))["image"]
    assert default_image.endswith(f":{app_version}")
    full = merged_values("full")["image"]
    for workload in workloads("full"):
        assert container(workload)["image"] == (
            f"{full['registry']}/{full['repository']}@{full['digest']}"
        )


# ---------------------------------------------------------------------------------------------
# Least privilege


RBAC_CASES = [case for case in sorted(CASES) if merged_values(case)["rbac"]["create"]]


@dataclass(frozen=True)
class Grant:
    """One verb on one resource, as a rendered rule grants it to the operator's account."""

    scope: str
    """`*` (a ClusterRole bound cluster-wide) or the namespace of a RoleBinding."""
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]
    role: str
    extra: bool
    """From rbac.extraRules: the user's choice, not the chart's."""


def grants(case: str) -> list[Grant]:
    """Every grant of the rendered RBAC to the operator's ServiceAccount."""
    account = one(case, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    extra_rules = merged_values(case)["rbac"]["extraRules"]
    roles = {
        (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]): obj["rules"]
        for obj in objects(case, "ClusterRole") + objects(case, "Role")
    }
    found = []
    for binding in objects(case, "ClusterRoleBinding") + objects(case, "RoleBinding"):
        subjects = {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]}
        if ("ServiceAccount", account, NAMESPACE) not in subjects:
            continue
        namespace = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        key = (ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])
        scope = namespace or "*"
        for rule in roles[key]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        names = tuple(rule.get("resourceNames", ()))
                        role = f"{key[0]} {key[1] or ''}/{key[2]}"
                        extra = rule in extra_rules and key[0] == "ClusterRole"
                        found.append(Grant(scope, group, resource, verb, names, role, extra))
    return found


def needs(case: str) -> list[Request]:
    """Everything the operator requests, as this case's values configure it."""
    operator = merged_values(case)["operator"]
    lease = env_of(one(case, "Deployment")).get("TESSERA_LEADER_ELECTION_LEASE")
    return requests_for(
        operator["watchNamespaces"], operator["leaderElection"]["enabled"], lease, NAMESPACE
    )


def covers(grant: Grant, scope: str, need: Need, name: str | None) -> bool:
    return (
        (grant.group, grant.resource, grant.verb) == (need.group, need.resource, need.verb)
        and grant.scope in ("*", scope)
        and (not grant.names or name in grant.names)
    )


def missing(given: list[Grant], wanted: list[Request]) -> list[str]:
    return [
        f"{need.verb} {need.group}/{need.resource} in {scope} ({need.origin})"
        for scope, need, name in wanted
        if not any(covers(grant, scope, need, name) for grant in given)
    ]


def superfluous(given: list[Grant], wanted: list[Request]) -> list[Grant]:
    """The chart's grants that can go without any request going ungranted."""
    return [
        grant
        for index, grant in enumerate(given)
        if not grant.extra and not missing(given[:index] + given[index + 1 :], wanted)
    ]


@pytest.mark.parametrize("case", RBAC_CASES)
def test_the_operator_is_granted_every_request_it_makes(case: str) -> None:
    assert missing(grants(case), needs(case)) == []


@pytest.mark.parametrize("case", RBAC_CASES)
def test_the_operator_is_granted_nothing_it_never_requests(case: str) -> None:
    assert superfluous(grants(case), needs(case)) == []


@pytest.mark.parametrize("case", RBAC_CASES)
def test_served_namespaces_get_roles_and_the_cluster_role_only_what_is_cluster_wide(
    case: str,
) -> None:
    served = merged_values(case)["operator"]["watchNamespaces"]
    wanted = needs(case)
    for grant in grants(case):
        if grant.extra:
            continue
        if grant.scope == "*":
            cluster_wide = [(s, n, name) for s, n, name in wanted if s == "*"]
            assert any(covers(grant, *need) for need in cluster_wide), grant
        else:
            assert grant.scope in [*served, NAMESPACE], grant
    bound = {grant.scope for grant in grants(case)}
    assert bound == {"*", *served} | ({NAMESPACE} if served and NAMESPACE not in served else set())
    if merged_values(case)["operator"]["leaderElection"]["enabled"]:
        assert NAMESPACE in bound


def test_the_rbac_comparison_sees_a_missing_and_a_superfluous_grant() -> None:
    """Guards the two tests above: one verb less is missing, one verb more is superfluous."""
    given, wanted = grants("default"), needs("default")
    deletes = [g for g in given if (g.resource, g.verb) == ("deployments", "delete")]
    assert len(deletes) == 1
    reported = missing([g for g in given if g not in deletes], wanted)
    assert reported == [
        "delete apps/deployments in * (apply.__init__: delete_namespaced_deployment)"
    ]
    update = Grant("*", "apps", "deployments", "update", (), "ClusterRole /x", extra=False)
    assert superfluous([*given, update], wanted) == [update]
    statefulsets = dataclasses.replace(update, resource="statefulsets", verb="create")
    assert superfluous([*given, statefulsets], wanted) == [statefulsets]


def test_the_operators_requests_are_read_from_its_code() -> None:
    """A few requests the derivation must find, each from where the code makes it."""
    found = {(n.where, n.group, n.resource, n.verb): n for n in operator_needs()}
    assert "apply" in found["served", "apps", "deployments", "create"].origin  # server-side apply
    assert "leader" in found["own", "coordination.k8s.io", "leases", "create"].origin
    assert found["own", "coordination.k8s.io", "leases", "patch"].name == LEASE_NAME
    assert "kopf" in found["cluster", "tessera.dev", "acceleratorclasses", "watch"].origin
    assert (
        "_write_status" in found["served", "tessera.dev", "modeldeployments/status", "patch"].origin
    )
    # Pods are listed by the rebalancer only (agent discovery by pods is not run), and evicted
    # in any namespace.
    pod_lists = [n for n in operator_needs() if n.resource == "pods"]
    assert [(n.where, n.verb) for n in pod_lists] == [("cluster", "list")]
    assert "rebalance_controller" in pod_lists[0].origin
    assert "evict" in found["cluster", "", "pods/eviction", "create"].origin


@pytest.mark.parametrize("case", RBAC_CASES)
def test_operator_may_do_nothing_dangerous(case: str) -> None:
    for grant in grants(case):
        assert "*" not in (grant.group, grant.resource, grant.verb), grant
        assert grant.verb not in {"escalate", "bind", "impersonate", "deletecollection"}, grant
        assert grant.resource not in {"secrets", "configmaps", "pods/exec", "serviceaccounts"} or (
            grant.extra
        ), grant
        if grant.group == "tessera.dev" and "/" not in grant.resource:
            # Users own their Tessera resources: the operator never creates or deletes them.
            assert grant.verb not in {"create", "delete", "update"}, grant
    for role in objects(case, "ClusterRole") + objects(case, "Role"):
        assert all("nonResourceURLs" not in rule for rule in role["rules"])


def test_leader_election_is_one_lease_in_the_release_namespace() -> None:
    assert not [g for g in grants("default") if g.resource == "leases"]
    lease = env_of(one("full", "Deployment"))["TESSERA_LEADER_ELECTION_LEASE"]
    leases = [g for g in grants("full") if g.resource == "leases"]
    assert {g.scope for g in leases} == {NAMESPACE}
    for grant in leases:
        assert grant.group == "coordination.k8s.io"
        if grant.verb != "create":  # create cannot be limited by name in Kubernetes
            assert grant.names == (lease,)


# ---------------------------------------------------------------------------------------------
# Security contexts and what the agent may touch on the node


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_runs_unprivileged(case: str) -> None:
    deployment = one(case, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    security = container(deployment)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert container(deployment)["resources"]["limits"]["memory"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pods_stay_off_the_host(case: str) -> None:
    for workload in workloads(case):
        pod = workload["spec"]["template"]["spec"]
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), f"{workload['metadata']['name']}: {field}"
        assert all("hostPath" not in volume for volume in pod.get("volumes", []))


@pytest.mark.parametrize("case", ["default", "full", "privileged-agent"])
def test_agent_privilege_follows_the_values(case: str) -> None:
    values = merged_values(case)
    daemonset = one(case, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    security = container(daemonset)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    added = set(security.get("capabilities", {}).get("add", []))
    if values["agent"]["privileged"]:
        assert security["privileged"] is True
    elif values["mtls"]["enabled"]:
        assert added == {"SYS_ADMIN"}, "control needs CAP_SYS_ADMIN for NVML power limits"
        assert not security.get("privileged")
    else:
        assert not security.get("privileged") and not added
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
    # The API server rejects allowPrivilegeEscalation=false beside privileged or CAP_SYS_ADMIN
    # (a cross-field rule the OpenAPI schema does not encode).
    if security.get("privileged") or "SYS_ADMIN" in added:
        assert security.get("allowPrivilegeEscalation") is not False
    # NVML sees every device without the agent taking one from the workloads.
    assert "nvidia.com/gpu" not in json.dumps(container(daemonset)["resources"])
    assert (
        env_of(daemonset)["NVIDIA_VISIBLE_DEVICES"] == values["agent"]["nvidia"]["visibleDevices"]
    )


@pytest.mark.parametrize("case", ["default", "full"])
def test_agent_node_selection_follows_the_values(case: str) -> None:
    agent = merged_values(case)["agent"]
    pod = one(case, "DaemonSet")["spec"]["template"]["spec"]
    assert pod.get("nodeSelector", {}) == agent["nodeSelector"]
    assert pod["affinity"] == agent["affinity"]
    assert pod["tolerations"] == agent["tolerations"]
    assert pod.get("runtimeClassName", "") == agent["runtimeClassName"]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]


def test_operator_node_selection_follows_the_values() -> None:
    operator = merged_values("full")["operator"]
    pod = one("full", "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == operator["nodeSelector"]
    assert pod["tolerations"] == operator["tolerations"]
    assert pod["priorityClassName"] == operator["priorityClassName"]


# ---------------------------------------------------------------------------------------------
# mTLS and control


def _tls_secret(workload: Obj) -> str | None:
    for volume in workload["spec"]["template"]["spec"].get("volumes", []):
        if volume["name"] == "tls":
            secret_name: str = volume["secret"]["secretName"]
            return secret_name
    return None


@pytest.mark.parametrize("case", ["default", "full"])
def test_control_is_on_only_with_mtls_certificates(case: str) -> None:
    mtls = merged_values(case)["mtls"]
    operator, agent = one(case, "Deployment"), one(case, "DaemonSet")
    for workload in (operator, agent):
        env = env_of(workload)
        assert env["TESSERA_AGENT_CONTROL"] == str(mtls["enabled"]).lower()
        mounts = {m["name"]: m for m in container(workload).get("volumeMounts", [])}
        if mtls["enabled"]:
            assert mounts["tls"]["readOnly"] is True
            assert env["TESSERA_TLS_DIR"] == mounts["tls"]["mountPath"]
        else:
            assert "tls" not in mounts and "TESSERA_TLS_DIR" not in env
    if mtls["enabled"]:
        assert _tls_secret(operator) == mtls["operatorSecretName"]
        assert _tls_secret(agent) == mtls["agentSecretName"]
    else:
        assert _tls_secret(operator) is None and _tls_secret(agent) is None


@pytest.mark.parametrize("case", ["default", "full"])
def test_operator_finds_the_agents(case: str) -> None:
    env = env_of(one(case, "Deployment"))
    agent_service = one(case, "Service", "agent")
    assert env["TESSERA_AGENT_SERVICE"] == f"{agent_service['metadata']['name']}.{NAMESPACE}.svc"
    assert agent_service["spec"]["clusterIP"] == "None"
    grpc = next(p for p in agent_service["spec"]["ports"] if p["name"] == "grpc")
    assert env["TESSERA_AGENT_GRPC_PORT"] == str(grpc["port"])
    assert grpc["port"] == merged_values(case)["agent"]["grpcPort"]


# ---------------------------------------------------------------------------------------------
# The agents' NetworkPolicy


def _pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("case", sorted(CASES))
def test_agent_network_policy_admits_the_operator_and_the_scrapers_only(case: str) -> None:
    values = merged_values(case)["agent"]
    policies = objects(case, "NetworkPolicy")
    if not values["enabled"]:
        assert policies == []
        return
    policy = values["networkPolicy"]
    [rendered] = policies
    agent, operator = one(case, "DaemonSet"), one(case, "Deployment")
    spec = rendered["spec"]
    assert _matches(spec["podSelector"]["matchLabels"], _pod_labels(agent))
    assert not _matches(spec["podSelector"]["matchLabels"], _pod_labels(operator))
    assert spec["policyTypes"] == ["Ingress"]
    ports = {port["name"] for port in container(agent)["ports"]}
    by_port: dict[str, list[Obj] | None] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in ports and port["protocol"] == "TCP", port
            by_port[port["port"]] = rule.get("from")
    assert set(by_port) == ports, "a port the policy leaves out would be cut off"
    operator_peer, *grpc_peers = by_port["grpc"] or []
    assert _matches(operator_peer["podSelector"]["matchLabels"], _pod_labels(operator))
    assert set(operator_peer) == {"podSelector"}, "the operator's own namespace only"
    assert grpc_peers == policy["grpcFrom"]
    assert by_port["metrics"] == (policy["metricsFrom"] or None)


def test_agent_network_policy_can_be_left_out() -> None:
    result = helm_template("--set", "agent.networkPolicy.enabled=false")
    assert result.returncode == 0, result.stderr
    assert "kind: NetworkPolicy" not in result.stdout


@pytest.mark.parametrize(
    "peers",
    ['[{"podSelectr": {}}]', "[{}]", '{"podSelector": {}}', '[{"ipBlock": {"except": []}}]'],
)
def test_values_schema_rejects_a_bad_network_policy_peer(peers: str) -> None:
    result = helm_template("--set-json", f"agent.networkPolicy.metricsFrom={peers}")
    assert result.returncode != 0, f"helm accepted metricsFrom={peers}"
    assert "/agent/networkPolicy/metricsFrom" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# The environment contract: what the chart sets is what the commands read


def click_environment(command: click.Command) -> dict[str, str]:
    """Environment variable -> the name of the option of `command` that reads it."""
    found: dict[str, str] = {}
    for param in command.params:
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        for name in names:
            found[name] = param.name or ""
    return found


OPERATOR_READS = set(click_environment(operator_command)) | set(COLLECTOR_ENVIRONMENT)
AGENT_READS = set(click_environment(agent_command))

# Variables a command reads that the chart leaves to their defaults on purpose, and why.
OPERATOR_READS_NOT_SET = {
    "TESSERA_AGENT_TLS_SERVER_NAME": "defaults to the agent Service's name, which the agents' "
    "certificate must carry (operator.extraEnv overrides it)",
}
AGENT_READS_NOT_SET = {
    "TESSERA_AGENT_BACKEND": "auto: the agent finds the node's devices itself",
    "TESSERA_AGENT_BIND": "every address of the pod",
    "TESSERA_AGENT_TELEMETRY_PORT": "the operator reads telemetry on the gRPC port",
}

# Where a variable is set from the downward API, a stand-in value for parsing.
DOWNWARD_API_STAND_IN = "from-the-downward-api"


def chart_environment(case: str, component: str) -> dict[str, str]:
    """What the chart sets on a component's container, less the values' extraEnv."""
    kind = "Deployment" if component == "operator" else "DaemonSet"
    extra = {var["name"] for var in merged_values(case)[component]["extraEnv"]}
    return {
        name: value if isinstance(value, str) else DOWNWARD_API_STAND_IN
        for name, value in env_of(one(case, kind)).items()
        if name not in extra
    }


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    ("component", "reads"),
    [
        pytest.param("operator", OPERATOR_READS, id="operator"),
        pytest.param("agent", AGENT_READS, id="agent"),
    ],
)
def test_every_tessera_variable_the_chart_sets_is_read(
    case: str, component: str, reads: set[str]
) -> None:
    if component == "agent" and not merged_values(case)["agent"]["enabled"]:
        pytest.skip("no agent in this case")
    tessera = {name for name in chart_environment(case, component) if name.startswith("TESSERA_")}
    assert tessera - reads == set(), f"the chart sets what `tessera {component}` never reads"


@pytest.mark.parametrize(
    ("component", "reads", "not_set"),
    [
        pytest.param("operator", OPERATOR_READS, OPERATOR_READS_NOT_SET, id="operator"),
        pytest.param("agent", AGENT_READS, AGENT_READS_NOT_SET, id="agent"),
    ],
)
def test_every_variable_the_commands_read_is_set_or_left_to_its_default_on_purpose(
    component: str, reads: set[str], not_set: dict[str, str]
) -> None:
    rendered: set[str] = set()
    for case in CASES:
        if component == "operator" or merged_values(case)["agent"]["enabled"]:
            rendered |= set(chart_environment(case, component))
    assert reads - rendered == set(not_set), (
        f"`tessera {component}` reads what the chart never sets"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_operator_parses_the_rendered_environment_as_the_values_mean_it(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = merged_values(case)["operator"]
    for name in OPERATOR_READS:
        monkeypatch.delenv(name, raising=False)
    environment = chart_environment(case, "operator")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = container(one(case, "Deployment"))["args"]
    assert args[0] == "operator"
    with operator_command.make_context("operator", list(args[1:])) as ctx:
        params = ctx.params
    assert params["health_port"] == values["healthPort"]
    assert params["metrics_port"] == values["metricsPort"]
    assert params["log_level"] == values["logLevel"]
    assert params["namespaces"] == tuple(values["watchNamespaces"])
    assert params["leader_election"] is values["leaderElection"]["enabled"]
    assert params["simulate_candidates"] is values["simulateCandidates"]
    assert params["identity"] == params["leader_election_namespace"] == DOWNWARD_API_STAND_IN
    if values["leaderElection"]["enabled"]:
        [lease] = {name for grant in grants(case) for name in grant.names}
        assert params["leader_election_lease"] == lease
    if merged_values(case)["agent"]["enabled"]:
        agent_service = one(case, "Service", "agent")["metadata"]["name"]
        assert environment["TESSERA_AGENT_SERVICE"].split(".")[:2] == [agent_service, NAMESPACE]
    else:
        assert not set(COLLECTOR_ENVIRONMENT) & set(environment), "no agents: no collector"


# ---------------------------------------------------------------------------------------------
# Optional objects: ServiceMonitor and Grafana dashboard


def test_optional_objects_are_off_by_default() -> None:
    kinds = {obj["kind"] for obj in render("default")}
    assert "ServiceMonitor" not in kinds and "ConfigMap" not in kinds


# The ServiceMonitor endpoint fields the chart may set (monitoring.coreos.com/v1 Endpoint).
SERVICE_MONITOR_ENDPOINT_FIELDS = frozenset(
    ("port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings")
)


def test_service_monitor_scrapes_operator_and_agents() -> None:
    values = merged_values("full")["metrics"]["serviceMonitor"]
    monitor = one("full", "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == values["namespace"]
    assert _matches(values["labels"], monitor["metadata"]["labels"])
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    selected = [
        service
        for service in objects("full", "Service")
        if _matches(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    ]
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected}
    assert components == {"operator", "agent"}
    duration = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT_FIELDS, endpoint
        for service in selected:
            assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
        assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
        assert endpoint["relabelings"] == values["relabelings"]


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


def _dashboard_files() -> list[Path]:
    return sorted((CHART / "dashboards").glob("*.json"))


def test_dashboard_config_map_ships_the_dashboards_as_they_are() -> None:
    values = merged_values("full")["dashboard"]
    config_map = one("full", "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == values["namespace"]
    assert config_map["metadata"]["annotations"]["grafana_folder"] == values["folder"]
    shipped = {path.name: path.read_text() for path in _dashboard_files()}
    assert shipped, "helm/tessera/dashboards/ is empty"
    assert {name: json.loads(text) for name, text in config_map["data"].items()} == {
        name: json.loads(text) for name, text in shipped.items()
    }


def _panels(dashboard: Obj) -> Iterator[Obj]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.name)
def test_dashboard_queries_the_exported_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert "__inputs" not in dashboard, "the sidecar imports dashboards without input mapping"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in variables
    panels = list(_panels(dashboard))
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    expressions = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        expressions += [target["expr"] for target in panel["targets"]]
    queried = " ".join(expressions)
    for metric in DASHBOARD_METRICS:
        assert metric in queried, f"no panel queries {metric}"
    for used in re.findall(r"\$(\w+)", queried):
        assert used in variables | {"__rate_interval", "__interval", "__range"}, used
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("first token", "per output token", "power", "request rate"):
        assert topic in titles


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian package prometheus)")
@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.name)
def test_dashboard_promql_parses(path: Path, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule for promtool."""
    assert PROMTOOL is not None
    dashboard = json.loads(path.read_text())
    rules = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in (("__rate_interval", "5m"), ("namespace", ".*")):
                expr = expr.replace(f"${variable}", value)
            rules.append(
                {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr}
            )
    rule_file = tmp_path / "dashboard-rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


# ---------------------------------------------------------------------------------------------
# CRDs


def test_chart_crds_are_the_generated_crds() -> None:
    generated = {path.name: path.read_bytes() for path in (ROOT / "crds").glob("*.yaml")}
    assert generated, "crds/ is empty: run `tessera crds`"
    for folder, version in CHART_VARIANTS.items():
        in_chart = {p.name: p.read_text() for p in (CHART / "files" / "crds" / folder).glob("*")}
        assert in_chart == render_crd_files(version), (
            f"helm/tessera/files/crds/{folder} differs: run `tessera crds`"
        )
    cel = {p.name: p.read_bytes() for p in (CHART / "files" / "crds" / "cel").glob("*")}
    assert cel == generated


def _rendered_crds(*args: str) -> dict[str, Obj]:
    result = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["kind"] == "CustomResourceDefinition"
    }


@pytest.mark.parametrize(
    ("kube_version", "generated_for"),
    [("1.20.2", "1.20"), ("1.24.17", "1.24"), ("1.25.0", None), (latest_version(), None)],
)
def test_rendered_crds_are_the_variant_the_server_evaluates(
    kube_version: str, generated_for: str | None
) -> None:
    rendered = _rendered_crds("--kube-version", kube_version)
    expected = {crd["metadata"]["name"]: crd for crd in build_crds(generated_for)}
    assert set(rendered) == set(expected)
    assert {crd["spec"]["names"]["kind"] for crd in rendered.values()} == set(RESOURCE_TYPES)
    assert (CEL_RULES in json.dumps(rendered)) is (generated_for is None)
    for name, crd in rendered.items():
        assert crd["spec"] == expected[name]["spec"], f"{name} is not the generated CRD"
        metadata = crd["metadata"]
        assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert metadata["labels"]["app.kubernetes.io/part-of"] == "tessera"
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crds_can_be_left_to_another_installer_or_to_helm_uninstall() -> None:
    assert _rendered_crds("--set", "crds.install=false") == {}
    for crd in _rendered_crds("--set", "crds.keep=false").values():
        assert "annotations" not in crd["metadata"]
