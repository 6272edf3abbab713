"""`tessera operator` as a process, configured through its environment as the Helm chart does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from agent_support import free_port
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_fixtures import KUBECONFIG_ENV, Cluster, Namespace, wait_for
from prometheus_client.parser import text_string_to_metric_families

# Settings of the test's own environment that must not leak into the operator's.
_NOT_INHERITED = ("POD_NAME", "POD_NAMESPACE", "KUBECONFIG")


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: bytes = response.read()
            return body.decode()
    except OSError:
        return None


def sample(metrics: str | None, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition; None if absent."""
    for family in text_string_to_metric_families(metrics or ""):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


class OperatorProcess:
    """One replica: `tessera operator --kubeconfig ... --bind 127.0.0.1` with `env` set."""

    def __init__(self, cluster: Cluster, folder: Path, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.health_port, self.metrics_port = free_port(), free_port()
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key == KUBECONFIG_ENV or not (key.startswith("TESSERA_") or key in _NOT_INHERITED)
        }
        environment = {
            **inherited,
            "TESSERA_HEALTH_PORT": str(self.health_port),
            "TESSERA_METRICS_PORT": str(self.metrics_port),
            **env,
        }
        command = [sys.executable, "-m", "tessera", "operator", "--bind", "127.0.0.1"]
        command += ["--kubeconfig", str(cluster.kubeconfig(folder))]
        self.log_path = folder / f"{name}.log"
        with self.log_path.open("w") as log:
            # cwd: never the repository root, whose operator/ would shadow the stdlib module
            self.process = subprocess.Popen(
                command, env=environment, cwd=folder, stdout=log, stderr=subprocess.STDOUT
            )

    def health(self) -> str | None:
        return http_get(f"http://127.0.0.1:{self.health_port}/healthz")

    def metrics(self) -> str | None:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def output(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited early:\n{self.output()}")
        return True

    def terminate(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def lease_spec(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    """The Lease's spec as on the wire (camelCase); None while there is no Lease."""
    api = client.CoordinationV1Api(cluster.api_client)
    try:
        lease = api.read_namespaced_lease(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    spec: dict[str, Any] = cluster.api_client.sanitize_for_serialization(lease.spec) or {}
    return spec


def reconciled(cluster: Cluster, namespace: Namespace, generation: int) -> dict[str, Any]:
    """The "chat" ModelDeployment once its plan is applied at `generation`."""

    def probe() -> dict[str, Any] | None:
        md = cluster.get_md(namespace.name, "chat")
        status = (md or {}).get("status") or {}
        reasons = {c["type"]: c.get("reason") for c in status.get("conditions") or []}
        if (
            status.get("observedGeneration") != generation
            or reasons.get("Degraded") != "PlanApplied"
        ):
            return None
        return md

    return wait_for(probe, f"the ModelDeployment reconciled at generation {generation}")
