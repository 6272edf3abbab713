"""Fixtures of the operator tests: an API server, namespaces, the real kopf operator.

The server is, by default, a real control plane on loopback (tests/kube_control_plane.py:
etcd, kube-apiserver with RBAC, kube-controller-manager, kube-scheduler), started once per test
session (the `control_plane` fixture in tests/conftest.py). TESSERA_TEST_SERVER=emulator selects
kmock's emulator (tests/kube_emulator.py) instead, for fast inner loops; TESSERA_TEST_KUBECONFIG
names any other cluster. Each test gets its own namespace and its own AcceleratorClasses (names
suffixed with the namespace), and runs the operator in a thread (`kopf.operator()` via
`tessera.operator.main.run_operator`) watching that namespace only. The tests talk to the server
with the official `kubernetes` client; nothing is patched between.

A test module imports the fixtures (`cluster_fixture`, `namespace_fixture`, `operator_fixture`,
registered under the names `cluster`, `namespace` and `operator`) to use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import pytest
import yaml
from api_samples import chat_deployment, example_documents
from kube_control_plane import ControlPlane
from kube_emulator import TesseraKubernetesEmulator
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.common import GROUP, VERSION
from tessera.api.crdgen import build_crds
from tessera.operator.main import run_operator
from tessera.operator.plan_scoring import PlanScorer
from tessera.operator.reconcile import as_object
from tessera.policies.capacity import ClassOffer

__all__ = [  # fixtures, and the helpers tests use
    "Cluster",
    "Namespace",
    "OperatorThread",
    "cluster_fixture",
    "namespace_fixture",
    "operator_fixture",
    "real_server_only",
    "wait_for",
]

KUBECONFIG_ENV = "TESSERA_TEST_KUBECONFIG"
SERVER_ENV = "TESSERA_TEST_SERVER"
DEADLINE_S = 20.0
T = TypeVar("T")


def emulator_selected() -> bool:
    """Whether the suite runs against kmock's emulator ($TESSERA_TEST_SERVER=emulator and no
    $TESSERA_TEST_KUBECONFIG, which `cluster_fixture` gives precedence)."""
    return os.environ.get(SERVER_ENV) == "emulator" and not os.environ.get(KUBECONFIG_ENV)


def real_server_only(needs: str) -> pytest.MarkDecorator:
    """Skip a test or module under the emulator, saying what of a real server it `needs`
    (checked before any fixture starts, so nothing waits on behaviour the emulator lacks)."""
    return pytest.mark.skipif(
        emulator_selected(), reason=f"real API server only ({SERVER_ENV}=emulator): {needs}"
    )


def wait_for(
    probe: Callable[[], T | None], what: str, timeout_s: float = DEADLINE_S, every_s: float = 0.05
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}"
            )
        time.sleep(every_s)


class EmulatorServer:
    """The emulator served over HTTP on 127.0.0.1 (ephemeral port) from a background thread."""

    def __init__(self) -> None:
        self.emulator: TesseraKubernetesEmulator | None = None
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.emulator = TesseraKubernetesEmulator()
        async with self.emulator:
            server = aiohttp.test_utils.RawTestServer(self.emulator, host="127.0.0.1", port=0)
            await server.start_server()
            self.port = int(server.port or 0)
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await server.close()

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class Cluster:
    """An API server the tests and the operator share."""

    configuration: client.Configuration
    emulated: bool
    control_plane: ControlPlane | None = None
    """The local control plane when the server is one (its processes, certificates, logs)."""
    api_client: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api_client = client.ApiClient(self.configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.extensions = client.ApiextensionsV1Api(self.api_client)

    def kubeconfig(self, directory: Path) -> Path:
        """A kubeconfig file for this server, as its admin (the given one on another cluster)."""
        given = os.environ.get(KUBECONFIG_ENV)
        if given:
            return Path(given)
        if self.control_plane is not None:
            return self.control_plane.admin_kubeconfig
        path = directory / "kubeconfig.yaml"
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.configuration.host}}],
            "users": [{"name": "tests", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tests"}}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(document))
        return path

    def server_version(self) -> tuple[int, int]:
        info = client.VersionApi(self.api_client).get_code()
        return int(info.major), int("".join(c for c in info.minor if c.isdigit()))

    def install_crds(self) -> None:
        """Server-side apply the generated CRDs for this server's version and wait until they
        are served."""
        version = None if self.emulated else "{}.{}".format(*self.server_version())
        for crd in build_crds(kube_version=version):
            self.extensions.patch_custom_resource_definition(
                crd["metadata"]["name"],
                crd,
                field_manager="tessera-tests",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        if not self.emulated:
            for crd in build_crds(kube_version=version):
                name: str = crd["metadata"]["name"]
                wait_for(
                    functools.partial(_established, self.extensions, name),
                    f"CRD {name} to be established",
                )

    # --- ModelDeployments -------------------------------------------------------------------

    def create_md(self, namespace: str, document: dict[str, Any]) -> dict[str, Any]:
        return as_object(
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "modeldeployments", document
            )
        )

    def get_md(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result = as_object(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "modeldeployments", name
                )
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return result

    def patch_md(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return as_object(
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                "modeldeployments",
                name,
                patch,
                _content_type="application/merge-patch+json",
            )
        )

    def delete_md(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "modeldeployments", name
        )

    # --- children ---------------------------------------------------------------------------

    def deployments(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        response = self.apps.list_namespaced_deployment(
            namespace, label_selector=selector, _preload_content=False
        )
        return _items(response)

    def services(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        response = self.core.list_namespaced_service(
            namespace, label_selector=selector, _preload_content=False
        )
        return _items(response)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        response = self.core.list_namespaced_event(namespace, _preload_content=False)
        return [e for e in _items(response) if e.get("involvedObject", {}).get("name") == name]

    def patch_deployment_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.apps.patch_namespaced_deployment_status(
            name,
            namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )


def _items(response: Any) -> list[dict[str, Any]]:
    """Items of a list answer read with _preload_content=False (plain dicts, as on the wire)."""
    items: list[dict[str, Any]] = json.loads(response.data).get("items", [])
    return items


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    conditions = (crd.status and crd.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


@pytest.fixture(scope="module", name="cluster")
def cluster_fixture(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The local control plane, the emulator ($TESSERA_TEST_SERVER=emulator), or the cluster
    of $TESSERA_TEST_KUBECONFIG."""
    kubeconfig = os.environ.get(KUBECONFIG_ENV)
    server: EmulatorServer | None = None
    plane: ControlPlane | None = None
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif emulator_selected():
        server = EmulatorServer()
        configuration.host = server.start()
    else:
        plane = request.getfixturevalue("control_plane")
        configuration = plane.configuration()
    the_cluster = Cluster(configuration, emulated=server is not None, control_plane=plane)
    try:
        the_cluster.install_crds()
        yield the_cluster
    finally:
        the_cluster.api_client.close()
        if server is not None:
            server.stop()


@dataclass
class Namespace:
    """A test's own namespace, and the AcceleratorClasses it created (suffixed by its name)."""

    cluster: Cluster
    name: str
    classes: dict[str, str] = field(default_factory=dict)
    """Example class name -> the cluster-wide name this test created it under."""
    class_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Cluster-wide class name -> the spec it was created (or last patched) with."""

    def create_classes(self, *names: str, **overrides: dict[str, Any]) -> dict[str, str]:
        """Create example AcceleratorClasses under unique names; `overrides` patch their spec."""
        documents = {
            d["metadata"]["name"]: d for d in example_documents("accelerator-classes.yaml")
        }
        for name in names or tuple(documents):
            document = copy.deepcopy(documents[name])
            unique = f"{name}-{self.name}"
            document["metadata"] = {"name": unique}
            document["spec"].update(overrides.get(name, {}))
            self.cluster.custom.create_cluster_custom_object(
                GROUP, VERSION, "acceleratorclasses", document
            )
            self.classes[name] = unique
            self.class_specs[unique] = document["spec"]
        return dict(self.classes)

    def patch_class(self, name: str, spec: dict[str, Any]) -> None:
        """Merge-patch the spec of one of this test's classes (by its example name)."""
        unique = self.classes[name]
        self.cluster.custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            "acceleratorclasses",
            unique,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )
        self.class_specs[unique] = {**self.class_specs[unique], **spec}

    def offers(self, free: dict[str, int] | None = None) -> list[ClassOffer]:
        """This test's classes as the planner sees them (capacity unknown unless given)."""
        free = free or {}
        return [
            ClassOffer(name, AcceleratorClassSpec.model_validate(spec), free.get(name))
            for name, spec in sorted(self.class_specs.items())
        ]

    def chat_deployment(self, name: str = "chat", **spec: Any) -> dict[str, Any]:
        """The example chat ModelDeployment in this namespace, allowed this test's classes."""
        document = chat_deployment()
        document["metadata"] = {"name": name, "namespace": self.name}
        document["spec"]["hardware"]["acceleratorClasses"] = sorted(self.classes.values())
        document["spec"].update(spec)
        return document


@pytest.fixture(name="namespace")
def namespace_fixture(cluster: Cluster) -> Iterator[Namespace]:
    name = f"tessera-test-{secrets.token_hex(4)}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    ns = Namespace(cluster, name)
    try:
        yield ns
    finally:
        for unique in ns.classes.values():
            with contextlib.suppress(ApiException):
                cluster.custom.delete_cluster_custom_object(
                    GROUP, VERSION, "acceleratorclasses", unique
                )
        with contextlib.suppress(ApiException):
            cluster.core.delete_namespace(name)


class OperatorThread:
    """The real operator (kopf) in a thread, serving one namespace; stoppable and restartable."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        plan_scorer: PlanScorer | None = None,
        **options: Any,
    ) -> None:
        """`options` go to `run_operator` as they are (e.g. `agents`, `metrics_registry`)."""
        self.cluster = cluster
        self.namespace = namespace
        self.plan_scorer = plan_scorer
        self.options = options
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(
                run_operator(
                    self.cluster.configuration,
                    namespaces=[self.namespace],
                    standalone=True,
                    stop_flag=self._stop,
                    ready_flag=ready,
                    plan_scorer=self.plan_scorer,
                    **self.options,
                )
            )
        except BaseException as error:
            self._error = error
            ready.set()

    def start(self) -> OperatorThread:
        if self._thread is not None:
            raise RuntimeError("the operator is already running")
        ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="operator")
        self._thread.start()
        if not ready.wait(DEADLINE_S) or self._error is not None:
            raise RuntimeError(f"the operator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(DEADLINE_S)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise RuntimeError("the operator did not stop within the deadline")
        if self._error is not None:
            raise RuntimeError("the operator failed") from self._error


@pytest.fixture(name="operator")
def operator_fixture(cluster: Cluster, namespace: Namespace) -> Iterator[OperatorThread]:
    """The operator serving the test's namespace, stopped after the test."""
    running = OperatorThread(cluster, namespace.name).start()
    try:
        yield running
    finally:
        running.stop()
