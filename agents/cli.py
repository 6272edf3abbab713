"""`tessera agent`: run the node agent (the Helm chart's DaemonSet runs this on every node).

The options also come from the environment variables the chart sets (NODE_NAME,
TESSERA_AGENT_GRPC_PORT, TESSERA_AGENT_METRICS_PORT, TESSERA_AGENT_CONTROL, TESSERA_TLS_DIR,
TESSERA_LOG_LEVEL).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import click
from tessera.agents.backend import BackendError, DeviceBackend

log = logging.getLogger("tessera.agents")


def make_backend(kind: str, node_name: str, sim_devices: int) -> DeviceBackend:
    """The backend named by `kind`; for "auto" the first of NVML, npu-smi, powercap that works."""
    if kind == "sim":
        from tessera.agents.sim_backend import SimBackend

        return SimBackend(device_count=sim_devices, node_name=node_name)
    factories = {
        "nvml": ("tessera.agents.nvml_backend", "NvmlBackend"),
        "npu-smi": ("tessera.agents.npu_backend", "NpuSmiBackend"),
        "powercap": ("tessera.agents.powercap_backend", "PowercapBackend"),
    }
    names = list(factories) if kind == "auto" else [kind]
    reasons = []
    for name in names:
        module_name, class_name = factories[name]
        module = __import__(module_name, fromlist=[class_name])
        try:
            backend: DeviceBackend = getattr(module, class_name)()
        except BackendError as error:
            reasons.append(f"{name}: {error}")
            continue
        return backend
    raise click.ClickException("no device backend works on this node: " + "; ".join(reasons))


_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("agent")
@click.option(
    "--backend",
    type=click.Choice(["auto", "nvml", "npu-smi", "powercap", "sim"]),
    default="auto",
    show_default=True,
    envvar="TESSERA_AGENT_BACKEND",
    help="Device backend; auto tries nvml, npu-smi, powercap in turn.",
)
@click.option("--node-name", default=socket.gethostname, envvar="NODE_NAME", help="Node name.")
@click.option("--bind", default="0.0.0.0", show_default=True, envvar="TESSERA_AGENT_BIND")
@click.option(
    "--grpc-port", type=int, default=50051, show_default=True, envvar="TESSERA_AGENT_GRPC_PORT"
)
@click.option(
    "--control/--no-control",
    default=False,
    show_default=True,
    envvar="TESSERA_AGENT_CONTROL",
    help="Serve Control (power limits, clock locks) over mutual TLS on the gRPC port; needs "
    "--tls-dir. Without it the gRPC port serves read-only telemetry in plaintext.",
)
@click.option(
    "--tls-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="TESSERA_TLS_DIR",
    help="Folder with tls.crt, tls.key and ca.crt (a cert-manager Secret mounted).",
)
@click.option(
    "--telemetry-port",
    type=int,
    default=None,
    envvar="TESSERA_AGENT_TELEMETRY_PORT",
    help="With --control: also serve read-only telemetry in plaintext on this port.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=9400,
    show_default=True,
    envvar="TESSERA_AGENT_METRICS_PORT",
    help="Prometheus /metrics and the probes' /healthz.",
)
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True)
@click.option("--sim-devices", type=int, default=2, show_default=True)
@click.option(
    "--reset-on-start/--no-reset-on-start",
    default=True,
    show_default=True,
    help="Reset power limits and clocks at start, so that a crashed agent leaves no cap behind "
    "(only with --control).",
)
@click.option("--log-level", default="INFO", show_default=True, envvar="TESSERA_LOG_LEVEL")
def agent_command(
    backend: str,
    node_name: str,
    bind: str,
    grpc_port: int,
    control: bool,
    tls_dir: Path | None,
    telemetry_port: int | None,
    metrics_port: int,
    interval_s: float,
    sim_devices: int,
    reset_on_start: bool,
    log_level: str,
) -> None:
    """Run the node agent: telemetry and control of this node's accelerators over gRPC."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from tessera.agents.metrics import AgentMetrics
    from tessera.agents.server import AgentServer, ServerTls

    tls = None
    if control:
        if tls_dir is None:
            raise click.UsageError("--control needs mutual TLS: give --tls-dir")
        tls = ServerTls.from_files(tls_dir / "tls.crt", tls_dir / "tls.key", tls_dir / "ca.crt")
    host = f"[{bind}]" if ":" in bind else bind
    device_backend = make_backend(backend, node_name, sim_devices)
    metrics = AgentMetrics(node_name, device_backend.devices())
    server = AgentServer(
        device_backend,
        node_name=node_name,
        listen=f"{host}:{grpc_port}",
        tls=tls,
        telemetry_listen=f"{host}:{telemetry_port}"
        if control and telemetry_port is not None
        else None,
        interval_s=interval_s,
        reset_on_start=reset_on_start and control,
        on_control=metrics.count_control,
    )
    server.sampler.add_listener(metrics.observe)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    bound_metrics_port = metrics.serve(bind, metrics_port, healthy=server.healthy)
    click.echo(
        f"tessera agent {node_name}: grpc port {server.port}, telemetry port "
        f"{server.telemetry_port}, metrics port {bound_metrics_port}",
        err=True,
    )
    stop.wait()
    failures = server.stop()
    metrics.close()
    if failures:
        raise click.ClickException("could not restore defaults: " + "; ".join(failures))
