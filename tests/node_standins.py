"""Nodes as API objects, and the kubelet's status writes, for a control plane without a kubelet.

The real scheduler binds pods to these Nodes by their labels and allocatable accelerators, as on
a cluster; nothing runs the pods. Where a test needs Running, Ready pods (so that the real
ReplicaSet and Deployment controllers count them), `KubeletStandIn.mark_ready` writes the pod
status a kubelet would write after the containers' readiness probes pass. Tests that use it say so.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.exceptions import ApiException


@dataclass
class GpuNodes:
    """Nodes created by one test (removed by `delete`), with allocatable accelerators."""

    core: client.CoreV1Api
    names: list[str] = field(default_factory=list)

    def create(self, name: str, labels: dict[str, str], allocatable: dict[str, str]) -> None:
        """A Ready, schedulable Node with `allocatable` (plus room for pods, CPU and memory)."""
        self.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels)))
        self.names.append(name)
        resources = {"cpu": "64", "memory": "512Gi", "pods": "110", **allocatable}
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "written by the test's kubelet stand-in",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
        }
        self.core.patch_node_status(
            name, {"status": status}, _content_type="application/merge-patch+json"
        )
        # The API server's TaintNodesByCondition admission taints a new Node not-ready; the node
        # lifecycle controller (not run here: it would evict from Nodes that send no heartbeats)
        # lifts the taint once the Node reports Ready.
        self.core.patch_node(name, {"spec": {"taints": None}})

    def delete(self) -> None:
        for name in self.names:
            with contextlib.suppress(ApiException):
                self.core.delete_node(name)
        self.names.clear()


def pods(core: client.CoreV1Api, namespace: str, selector: str = "") -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace, label_selector=selector).items)


@dataclass
class KubeletStandIn:
    """Writes the status a kubelet writes for pods bound to its nodes: Running and Ready."""

    core: client.CoreV1Api

    def mark_ready(self, namespace: str, pod_names: Iterable[str]) -> None:
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for name in pod_names:
            pod = self.core.read_namespaced_pod(name, namespace)
            containers = [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
                for container in pod.spec.containers
            ]
            conditions = [
                {"type": kind, "status": "True", "lastTransitionTime": now}
                for kind in ("Initialized", "ContainersReady", "Ready", "PodScheduled")
            ]
            status = {
                "phase": "Running",
                "conditions": conditions,
                "containerStatuses": containers,
                "startTime": now,
                "podIP": "10.244.0.10",
                "hostIP": "10.240.0.10",
            }
            self.core.patch_namespaced_pod_status(
                name, namespace, {"status": status}, _content_type="application/merge-patch+json"
            )

    def remove_all(self, namespace: str) -> None:
        """Delete the namespace's pods at once, as a kubelet confirms a deletion (no grace):
        bound pods would otherwise wait for a kubelet forever and hold the namespace."""
        for pod in pods(self.core, namespace):
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod(
                    pod.metadata.name, namespace, grace_period_seconds=0
                )
