"""Throwaway mutual-TLS material for agents on loopback: a CA and leaf certificates, made with
the openssl binary (tests/agent_support.py builds its identities with it; bench/power_gpu_run.py
its one agent and operator pair). Certificates live two days; nothing here is for production,
where the chart's cert-manager issues them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class OpenSslMissingError(RuntimeError):
    """There is no openssl binary on PATH."""


def openssl(*args: str, cwd: Path) -> None:
    """Run openssl in `cwd`; raises OpenSslMissingError without the binary and
    CalledProcessError (with openssl's output) when it fails."""
    if shutil.which("openssl") is None:
        raise OpenSslMissingError("the openssl binary is needed to make certificates")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(name: str, folder: Path) -> None:
    """`folder/name.pem` and `.key`: a self-signed P-256 CA."""
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def make_leaf(name: str, ca: str, extensions: str, folder: Path, common_name: str = "") -> None:
    """`folder/name.pem` and `.key` signed by the CA `ca`, with `extensions` (openssl extfile
    lines: subjectAltName, extendedKeyUsage)."""
    (folder / f"{name}.ext").write_text(extensions)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name or name}",
        cwd=folder,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip
