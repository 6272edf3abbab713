"""The chart tells the agents which client identity may call Control: the operator's.

With mTLS on, the agent DaemonSet sets TESSERA_AGENT_CONTROL_ALLOWED_SANS to the operator's
ServiceAccount identity (the ServiceAccount the rendered operator Deployment runs as) unless the
values name identities, and `tessera agent` parses the rendered variable to that list. The
chart generates no certificates; helm/tessera/README.md says which SAN the operator's must carry.
Rendering helpers come from test_helm_chart (which skips without helm).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tessera.agents.cli import agent_command
from test_helm_chart import HELM, NAMESPACE, container, env_of, helm_template, one

pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm is not on PATH: run .ci/install-helm.sh to install it"
)

MTLS = ("mtls.enabled=true", "mtls.agentSecretName=agent-tls", "mtls.operatorSecretName=op-tls")
VARIABLE = "TESSERA_AGENT_CONTROL_ALLOWED_SANS"


def rendered(*sets: str) -> list[dict]:
    args = [arg for assignment in (*MTLS, *sets) for arg in ("--set", assignment)]
    result = helm_template(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def workload(objects: list[dict], kind: str) -> dict:
    [found] = [obj for obj in objects if obj["kind"] == kind]
    return found


def agent_params(daemon_set: dict, monkeypatch: pytest.MonkeyPatch, tls_dir: Path) -> dict:
    """The agent command's parameters from the DaemonSet's environment and arguments (the
    Secret's mount point replaced by `tls_dir`, which exists here)."""
    for name, value in env_of(daemon_set).items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "from-the-downward-api")
    monkeypatch.setenv("TESSERA_TLS_DIR", str(tls_dir))
    args = container(daemon_set)["args"]
    with agent_command.make_context("agent", list(args[1:])) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize(
    ("sets", "account"),
    [
        ((), "tessera-test-operator"),
        (("operator.serviceAccount.name=llm-operator",), "llm-operator"),
        (("operator.serviceAccount.create=false",), "default"),
    ],
)
def test_the_default_allowed_identity_is_the_operators_service_account(
    sets: tuple[str, ...], account: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = rendered(*sets)
    deployment, daemon_set = workload(objects, "Deployment"), workload(objects, "DaemonSet")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    identity = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{account}"
    assert env_of(daemon_set)[VARIABLE] == identity
    params = agent_params(daemon_set, monkeypatch, tmp_path)
    assert params["control"] is True and params["allowed_sans"] == (identity,)


def test_values_name_the_allowed_identities_and_the_trust_domain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    listed = rendered("mtls.controlAllowedSans={spiffe://prod.example/ns/a/sa/b,ops.example.com}")
    assert env_of(workload(listed, "DaemonSet"))[VARIABLE] == (
        "spiffe://prod.example/ns/a/sa/b,ops.example.com"
    )
    params = agent_params(workload(listed, "DaemonSet"), monkeypatch, tmp_path)
    assert params["allowed_sans"] == ("spiffe://prod.example/ns/a/sa/b", "ops.example.com")
    domain = rendered("mtls.trustDomain=prod.example")
    assert env_of(workload(domain, "DaemonSet"))[VARIABLE] == (
        f"spiffe://prod.example/ns/{NAMESPACE}/sa/tessera-test-operator"
    )


def test_without_mtls_no_identity_is_set() -> None:
    assert VARIABLE not in env_of(one("default", "DaemonSet"))


@pytest.mark.parametrize("entry", ["a b", "a,b", "*.example.com", ""])
def test_the_schema_refuses_entries_the_agent_would_refuse(entry: str) -> None:
    result = helm_template(
        *(arg for assignment in MTLS for arg in ("--set", assignment)),
        "--set-json",
        f'mtls.controlAllowedSans=["{entry}"]',
    )
    assert result.returncode != 0 and "controlAllowedSans" in result.stderr
