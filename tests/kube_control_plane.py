"""A real Kubernetes control plane on loopback for the operator suite.

etcd, kube-apiserver (RBAC on, client-certificate and service-account authentication),
kube-controller-manager (garbage collector, namespace, deployment, replicaset and service-account
token controllers) and kube-scheduler, as child processes of the test run, in a temporary folder.
The binaries are built from Debian's `kubernetes` source package by tools/install-kube.sh (run by
tools/install-dev.sh), which caches them outside the clone; this module only finds and starts
them. No kubelet runs: pods are scheduled (bound to Nodes) but never run. A test that needs
Running pods or ready Deployments writes their status itself, playing the kubelet, and says so.

Certificates are made with the openssl binary: one CA for clients and serving, an admin client
(group system:masters) for the tests, one client per controller, and the service-account key pair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "tools" / "install-kube.sh"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
START_DEADLINE_S = 90.0
SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = "garbagecollector,namespace,deployment,replicaset,serviceaccount,serviceaccount-token"


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are missing or a component did not come up."""


def find_binaries() -> Path:
    """The folder holding the cached control-plane binaries (tools/install-kube.sh --bin-dir)."""
    given = os.environ.get("TESSERA_KUBE_BIN_DIR")
    if given:
        folder = Path(given)
    else:
        answer = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), "--bin-dir"], capture_output=True, text=True, check=False
        )
        if answer.returncode != 0:
            raise ControlPlaneUnavailable(
                f"no control plane built ({answer.stderr.strip()}); "
                "run tools/install-dev.sh as root"
            )
        folder = Path(answer.stdout.strip().splitlines()[-1])
    missing = [name for name in BINARIES if not (folder / name).is_file()]
    if missing or shutil.which("etcd") is None or shutil.which("openssl") is None:
        raise ControlPlaneUnavailable(
            f"missing {missing or ''} in {folder}, or etcd/openssl not on PATH; "
            "run tools/install-dev.sh as root"
        )
    return folder


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class Pki:
    """A CA and the certificates the control plane and its clients present."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=tessera-test-ca", "-keyout", "ca.key", "-out", "ca.crt",
            cwd=self.folder,
        )  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=self.folder)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.folder)
        self.leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
        )

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def leaf(self, name: str, subject: str, extensions: str = "") -> tuple[Path, Path]:
        """A key and certificate signed by the CA; client certificates unless told otherwise."""
        ext = self.folder / f"{name}.ext"
        ext.write_text(extensions or "extendedKeyUsage=clientAuth\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=self.folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt",
            cwd=self.folder,
        )  # fmt: skip
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"


def kubeconfig_document(
    server: str, ca: Path, *, cert: Path | None = None, key: Path | None = None, token: str = ""
) -> dict[str, object]:
    """A kubeconfig for one user of the server: a client certificate or a bearer token."""
    user: dict[str, str] = {"token": token} if token else {}
    if cert is not None and key is not None:
        user = {"client-certificate": str(cert), "client-key": str(key)}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tessera-test",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "tessera-test", "user": "user"}}],
        "current-context": "test",
    }


@dataclass
class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1."""

    folder: Path
    bin_dir: Path = field(default_factory=find_binaries)
    port: int = 0
    started_in_s: float = 0.0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.folder / "admin.kubeconfig"

    def configuration(self) -> client.Configuration:
        """A client configuration authenticated as the admin (system:masters)."""
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.pki.ca)
        configuration.cert_file = str(self.folder / "pki" / "admin.crt")
        configuration.key_file = str(self.folder / "pki" / "admin.key")
        return configuration

    def start(self) -> ControlPlane:
        began = time.monotonic()
        self.pki = Pki(self.folder / "pki")
        self._start_etcd()
        self._start_apiserver()
        self._wait_ready()
        for component, subject in (
            ("admin", "/O=system:masters/CN=tessera-test-admin"),
            ("controller-manager", "/CN=system:kube-controller-manager"),
            ("scheduler", "/CN=system:kube-scheduler"),
        ):
            cert, key = self.pki.leaf(component, subject)
            document = kubeconfig_document(self.server, self.pki.ca, cert=cert, key=key)
            (self.folder / f"{component}.kubeconfig").write_text(yaml.safe_dump(document))
        self._start_controllers()
        self.started_in_s = time.monotonic() - began
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _start_etcd(self) -> None:
        self.etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                "etcd",
                "--data-dir", str(self.folder / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level", "warn",
            ],
        )  # fmt: skip

    def _start_apiserver(self) -> None:
        self.port = free_port()
        pki = self.folder / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
                "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                "--secure-port", str(self.port),
                "--insecure-port", "0",
                "--authorization-mode", "RBAC",
                "--client-ca-file", str(pki / "ca.crt"),
                "--tls-cert-file", str(pki / "apiserver.crt"),
                "--tls-private-key-file", str(pki / "apiserver.key"),
                "--service-account-key-file", str(pki / "sa.pub"),
                "--service-account-signing-key-file", str(pki / "sa.key"),
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--api-audiences", "https://kubernetes.default.svc",
                "--service-cluster-ip-range", SERVICE_CIDR,
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
        )  # fmt: skip

    def _start_controllers(self) -> None:
        pki = self.folder / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                "--kubeconfig", str(self.folder / "controller-manager.kubeconfig"),
                "--controllers", CONTROLLERS,
                "--service-account-private-key-file", str(pki / "sa.key"),
                "--root-ca-file", str(pki / "ca.crt"),
                # Each controller as its own ServiceAccount, with its bootstrap role, as
                # kubeadm-made clusters run them.
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--port", "0",
                "--secure-port", "0",
                "--concurrent-gc-syncs", "5",
                "--v=1",
            ],
        )  # fmt: skip
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                "--kubeconfig", str(self.folder / "scheduler.kubeconfig"),
                "--leader-elect=false",
                "--port", "0",
                "--secure-port", "0",
                "--v=1",
            ],
        )  # fmt: skip

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ControlPlaneUnavailable(f"{name} exited with {process.returncode}:\n{log}")

    def _wait_ready(self) -> None:
        context = ssl.create_default_context(cafile=str(self.folder / "pki" / "ca.crt"))
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            self._check_alive()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=2),
            ):
                return
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(f"kube-apiserver not ready in {START_DEADLINE_S} s")
            time.sleep(0.2)

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each component now (from /proc), for the notes."""
        sizes: dict[str, float] = {}
        for name, process in self.processes.items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes[name] = int(line.split()[1]) / 1024
        return sizes

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()
