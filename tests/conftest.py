"""Session-wide fixtures: the local Kubernetes control plane, started once for all modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kube_control_plane import ControlPlane, ControlPlaneUnavailable


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1.

    Fails (does not skip) when the binaries are missing: the operator suite is meant to run
    against a real server, and tools/install-dev.sh builds one."""
    try:
        plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    except ControlPlaneUnavailable as error:
        pytest.fail(f"the local control plane did not start: {error}")
    if os.environ.get("TESSERA_TEST_REPORT_CONTROL_PLANE"):
        print(f"\ncontrol plane started in {plane.started_in_s:.1f} s")
    try:
        yield plane
    finally:
        if os.environ.get("TESSERA_TEST_REPORT_CONTROL_PLANE"):
            sizes = ", ".join(f"{k} {v:.0f} MiB" for k, v in plane.memory_mib().items())
            print(f"\ncontrol plane memory at the end: {sizes}")
        plane.stop()
