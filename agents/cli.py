"""`tessera agent`: run the node agent (the Helm chart's DaemonSet runs this on every node).

The options also come from the environment variables the chart sets (NODE_NAME,
TESSERA_AGENT_GRPC_PORT, TESSERA_AGENT_METRICS_PORT, TESSERA_AGENT_CONTROL, TESSERA_TLS_DIR,
TESSERA_AGENT_CONTROL_ALLOWED_SANS, TESSERA_LOG_LEVEL).

Every option is checked before anything starts: a bad value is a usage error (exit code 2) whose
one error line names the option and its valid range; options that only mean something with
--control are refused without it rather than ignored. An address that cannot be bound is an
error naming it (exit code 1).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import urllib.parse
from pathlib import Path
from types import FrameType

import click
from tessera.agents.backend import BackendError, DeviceBackend
from tessera.agents.identity import parse_san

from tessera.cli_params import FiniteFloatRange, ParsedText

TLS_FILES = ("tls.crt", "tls.key", "ca.crt")
_PORT = click.IntRange(0, 65535)
# A round at least once a minute: /healthz fails after three missed rounds plus 5 s, and the
# operator's power decisions need fresh readings; below 10 ms reading the devices is all it does.
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.01, 60.0
MAX_SIM_DEVICES = 64
_NODE_NAME_MAX_LENGTH = 253  # a DNS-1123 subdomain, as Kubernetes node names are

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


def parse_bind(text: str) -> str:
    """An IPv4 or IPv6 address to listen on (gRPC takes no host names here)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address (e.g. 0.0.0.0 or ::)") from None


def parse_node_name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > _NODE_NAME_MAX_LENGTH or any(c.isspace() for c in name):
        raise ValueError(
            f"{text!r} is not a node name (1 to {_NODE_NAME_MAX_LENGTH} characters, no spaces)"
        )
    return name


def parse_allowed_sans(text: str) -> tuple[str, ...]:
    """Comma-separated SANs: URI SANs (spiffe://...) and DNS names, at least one."""
    entries = tuple(entry.strip() for entry in text.split(",") if entry.strip())
    if not entries:
        raise ValueError("give at least one URI or DNS SAN, comma-separated")
    for entry in entries:
        parse_san(entry)
    return entries


def _check_tls_dir(tls_dir: Path) -> None:
    missing = [name for name in TLS_FILES if not (tls_dir / name).is_file()]
    if missing:
        raise click.BadParameter(
            f"{tls_dir} lacks {', '.join(missing)} (it must hold {', '.join(TLS_FILES)})",
            param_hint="--tls-dir",
        )


def _check_options(
    control: bool,
    tls_dir: Path | None,
    allowed_sans: tuple[str, ...] | None,
    ports: dict[str, int | None],
) -> None:
    """The checks between options, as usage errors naming them."""
    if control:
        if tls_dir is None:
            raise click.UsageError("--control needs mutual TLS: give --tls-dir")
        _check_tls_dir(tls_dir)
        if allowed_sans is None:
            raise click.UsageError(
                "--control needs --control-allowed-sans: the URI or DNS SANs of the client "
                "certificates that may call Control, e.g. "
                "spiffe://cluster.local/ns/<namespace>/sa/<operator service account>"
            )
    else:
        for flag, given in (
            ("--control-allowed-sans", allowed_sans is not None),
            ("--telemetry-port", ports["--telemetry-port"] is not None),
        ):
            if given:
                raise click.UsageError(
                    f"{flag} takes effect only with --control; without it the gRPC port "
                    "serves read-only telemetry to every client"
                )
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port:
            if port in seen:
                raise click.UsageError(f"{flag} {port} is also {seen[port]}'s: give another port")
            seen[port] = flag


def _engine_url(url: str) -> str:
    """An engine server's base URL: http(s)://host:port, nothing after it."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise click.BadParameter(
            f"{url!r} is not an engine's base URL (http://HOST:PORT)", param_hint="--engine-url"
        )
    return url


@click.command("agent")
@click.option(
    "--backend",
    type=click.Choice(["auto", "nvml", "npu-smi", "powercap", "sim"]),
    default="auto",
    show_default=True,
    envvar="TESSERA_AGENT_BACKEND",
    help="Device backend; auto tries nvml, npu-smi, powercap in turn.",
)
@click.option(
    "--node-name",
    type=ParsedText("node name", parse_node_name),
    default=socket.gethostname,
    envvar="NODE_NAME",
    help="Node name.",
)
@click.option(
    "--bind",
    type=ParsedText("address", parse_bind),
    default="0.0.0.0",
    show_default=True,
    envvar="TESSERA_AGENT_BIND",
    help="IPv4 or IPv6 address to listen on.",
)
@click.option(
    "--grpc-port",
    type=_PORT,
    default=50051,
    show_default=True,
    envvar="TESSERA_AGENT_GRPC_PORT",
    help="0 picks a free port.",
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
    "--control-allowed-sans",
    "allowed_sans",
    type=ParsedText("SAN list", parse_allowed_sans),
    default=None,
    envvar="TESSERA_AGENT_CONTROL_ALLOWED_SANS",
    help="With --control: comma-separated SANs of the client certificates that may call Control "
    "(URI SANs such as spiffe://cluster.local/ns/NS/sa/SA, or DNS names); a client of the same "
    "CA without one of them is refused with PERMISSION_DENIED.",
)
@click.option(
    "--telemetry-port",
    type=_PORT,
    default=None,
    envvar="TESSERA_AGENT_TELEMETRY_PORT",
    help="With --control: also serve read-only telemetry in plaintext on this port.",
)
@click.option(
    "--metrics-port",
    type=_PORT,
    default=9400,
    show_default=True,
    envvar="TESSERA_AGENT_METRICS_PORT",
    help="Prometheus /metrics and the probes' /healthz.",
)
@click.option(
    "--interval",
    "interval_s",
    type=FiniteFloatRange(MIN_INTERVAL_S, MAX_INTERVAL_S),
    default=1.0,
    show_default=True,
    help="Seconds between sampling rounds.",
)
@click.option(
    "--sim-devices",
    type=click.IntRange(1, MAX_SIM_DEVICES),
    default=2,
    show_default=True,
    help="Devices of --backend sim.",
)
@click.option(
    "--reset-on-start/--no-reset-on-start",
    default=True,
    show_default=True,
    help="Reset power limits and clocks at start, so that a crashed agent leaves no cap behind "
    "(only with --control).",
)
@click.option(
    "--engine-url",
    "engine_urls",
    multiple=True,
    callback=lambda ctx, param, urls: tuple(_engine_url(url) for url in urls),
    help="Base URL of a `tessera serve` on this node (repeatable); its load and latencies join "
    "the telemetry.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="TESSERA_LOG_LEVEL",
)
def agent_command(
    backend: str,
    node_name: str,
    bind: str,
    grpc_port: int,
    control: bool,
    tls_dir: Path | None,
    allowed_sans: tuple[str, ...] | None,
    telemetry_port: int | None,
    metrics_port: int,
    interval_s: float,
    sim_devices: int,
    reset_on_start: bool,
    engine_urls: tuple[str, ...],
    log_level: str,
) -> None:
    """Run the node agent: telemetry and control of this node's accelerators over gRPC."""
    _check_options(
        control,
        tls_dir,
        allowed_sans,
        {
            "--grpc-port": grpc_port,
            "--telemetry-port": telemetry_port,
            "--metrics-port": metrics_port,
        },
    )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from tessera.agents.engine_source import HttpInstanceSource
    from tessera.agents.metrics import AgentMetrics
    from tessera.agents.server import AgentServer, ServerTls

    tls = None
    if control:
        assert tls_dir is not None and allowed_sans is not None  # _check_options
        tls = ServerTls.from_files(
            *(tls_dir / name for name in TLS_FILES), allowed_client_sans=allowed_sans
        )
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
        sources=[HttpInstanceSource(url) for url in engine_urls],
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
    try:
        server.start()
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        raise click.ClickException(f"cannot serve gRPC (--bind, --grpc-port): {error}") from None
    try:
        bound_metrics_port = metrics.serve(bind, metrics_port, healthy=server.healthy)
    except OSError as error:
        server.stop(grace_s=0)
        raise click.ClickException(
            f"cannot serve /metrics on {host}:{metrics_port} (--bind, --metrics-port): {error}"
        ) from None
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
