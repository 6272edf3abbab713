"""The operator's view of the fleet: one telemetry stream per node agent, one current snapshot.

Controllers read `Collector.snapshot()`, a frozen `FleetSnapshot` of plain dataclasses
(`DeviceTelemetry`, `InstanceStats`, mapped from the wire by `agents.proto_mapping`): the
PowerBudget controller (operator/power_controller.py) each round, to turn into the device views
`policies.power` decides on, so the policies never see gRPC, protobuf or Kubernetes. (The
RebalancePolicy controller reads the API server, not the agents.) The collector:
- discovers agents with a pluggable function (`kubernetes_discovery` lists the agent pods by
  label selector; tests pass a static list) and rediscovers periodically;
- keeps one Telemetry.Watch stream per agent on a thread of its own;
- reconnects with exponential backoff and jitter (tenacity), reset once a stream delivered data;
- marks an agent STALE as soon as its stream breaks, or when nothing arrived for
  `stale_after_s` although the stream looks open; UNKNOWN until the first message arrives.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import tenacity
from tessera.agents.client import ClientTls, insecure_channel
from tessera.agents.instance_stats import InstanceStats
from tessera.agents.proto_mapping import (
    SCHEMA_VERSION,
    DeviceTelemetry,
    device_from_proto,
    instance_from_proto,
)
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentEndpoint:
    """Where one agent listens. `name` (the pod name) identifies it across reconnects."""

    name: str
    address: str
    node_name: str = ""


Discovery = Callable[[], Sequence[AgentEndpoint]]
ChannelFactory = Callable[[str], grpc.Channel]


def static_discovery(endpoints: Sequence[AgentEndpoint]) -> Discovery:
    """Always the same agents (tests, or agents outside Kubernetes)."""
    fixed = tuple(endpoints)
    return lambda: fixed


def kubernetes_discovery(
    namespace: str, label_selector: str, port: int, core_api: Any = None
) -> Discovery:
    """The running agent pods matching `label_selector` in `namespace`, dialled by pod IP.

    `core_api` is a kubernetes.client.CoreV1Api (built from the in-cluster or local config when
    None).
    """
    if core_api is None:
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        core_api = kubernetes.client.CoreV1Api()

    def discover() -> Sequence[AgentEndpoint]:
        pods = core_api.list_namespaced_pod(namespace, label_selector=label_selector)
        endpoints = []
        for pod in pods.items:
            ip = pod.status.pod_ip if pod.status else None
            if not ip or pod.status.phase != "Running" or pod.metadata.deletion_timestamp:
                continue
            host = f"[{ip}]" if ":" in ip else ip
            endpoints.append(
                AgentEndpoint(pod.metadata.name, f"{host}:{port}", pod.spec.node_name or "")
            )
        return endpoints

    return discover


def dns_discovery(service_host: str, port: int) -> Discovery:
    """The addresses a headless Service's name resolves to: one per ready agent pod.

    This is what the Helm chart wires (TESSERA_AGENT_SERVICE names the agents' headless
    Service), and it needs no API permission. Agents are named by IP; their node names arrive
    with their telemetry.
    """

    def discover() -> Sequence[AgentEndpoint]:
        try:
            infos = socket.getaddrinfo(service_host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno == socket.EAI_NONAME:
                return []  # no agent pod is ready yet
            raise
        addresses = sorted({str(info[4][0]) for info in infos})
        return [
            AgentEndpoint(ip, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}") for ip in addresses
        ]

    return discover


class AgentStatus(enum.StrEnum):
    UNKNOWN = "Unknown"  # no message yet
    FRESH = "Fresh"
    STALE = "Stale"  # stream broken, or silent for longer than stale_after_s


InstanceTelemetry = InstanceStats
"""The collector's older name for the one instance type (`agents.instance_stats.InstanceStats`),
kept for its importers."""


@dataclass(frozen=True)
class AgentView:
    endpoint: AgentEndpoint
    status: AgentStatus
    node_name: str
    agent_version: str
    schema_version: int
    sequence: int
    age_s: float | None  # since the last message; None before the first
    devices: tuple[DeviceTelemetry, ...]
    instances: tuple[InstanceStats, ...]
    """Latency samples: the most recent ones the agent sent (`sample_window` per instance)."""
    device_errors: Mapping[str, str]
    reconnects: int
    last_error: str | None


@dataclass(frozen=True)
class FleetSnapshot:
    agents: Mapping[str, AgentView]

    def with_status(self, status: AgentStatus) -> list[AgentView]:
        return [a for a in self.agents.values() if a.status == status]

    def fresh_devices(self) -> list[tuple[AgentView, DeviceTelemetry]]:
        """Every device of every FRESH agent: what a policy may act on."""
        return [
            (a, d) for a in self.agents.values() if a.status == AgentStatus.FRESH for d in a.devices
        ]


@dataclass
class _AgentRecord:
    endpoint: AgentEndpoint
    status: AgentStatus = AgentStatus.UNKNOWN
    last_message: agent_pb2.TelemetrySnapshot | None = None
    received_at: float | None = None
    reconnects: int = 0
    last_error: str | None = None
    ttft: dict[str, collections.deque[float]] = field(default_factory=dict)
    tpot: dict[str, collections.deque[float]] = field(default_factory=dict)


class _StreamFailed(Exception):
    """A stream broke before delivering anything: retry after a backoff."""


class _AgentWatch:
    """The thread that keeps one agent's stream open."""

    def __init__(self, collector: Collector, endpoint: AgentEndpoint) -> None:
        self.collector = collector
        self.endpoint = endpoint
        self.stopping = threading.Event()
        self._call: Any = None
        self._call_lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._run, name=f"tessera-watch-{endpoint.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()

    def _run(self) -> None:
        c = self.collector
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_StreamFailed),
            # Exponential from backoff_initial_s up to backoff_max_s, plus up to one initial
            # step of jitter so that agents restarted together are not redialled in lockstep.
            wait=tenacity.wait_exponential(multiplier=c.backoff_initial_s, max=c.backoff_max_s)
            + tenacity.wait_random(0, c.backoff_initial_s),
            stop=tenacity.stop_when_event_set(self.stopping),
            sleep=self._sleep,
            before_sleep=lambda state: log.info(
                "agent %s: reconnecting (attempt %d) after: %s",
                self.endpoint.name,
                state.attempt_number,
                state.outcome.exception() if state.outcome else None,
            ),
            reraise=True,
        )
        while not self.stopping.is_set():
            try:
                retrying(self._stream_once)
            except _StreamFailed:
                break  # only when stopping: tenacity gave up because the event is set

    def _sleep(self, seconds: float) -> None:
        """Backoff that ends early when the watch is stopped."""
        self.stopping.wait(seconds)

    def _stream_once(self) -> None:
        """Follow one stream; return after it delivered data and ended, raise if it never did."""
        if self.stopping.is_set():
            return
        c = self.collector
        delivered = False
        channel = c.channel_factory(self.endpoint.address)
        try:
            stub = agent_pb2_grpc.TelemetryStub(channel)
            request = agent_pb2.WatchRequest(
                schema_version=SCHEMA_VERSION, min_interval_ms=c.min_interval_ms
            )
            with self._call_lock:
                if self.stopping.is_set():
                    return
                self._call = stub.Watch(request)
            for message in self._call:
                delivered = True
                c._received(self.endpoint, message)
            reason = "the agent ended the stream"
        except grpc.RpcError as error:
            if self.stopping.is_set():
                return
            reason = f"{error.code().name}: {error.details()}"
        finally:
            with self._call_lock:
                self._call = None
            channel.close()
        if self.stopping.is_set():
            return
        c._disconnected(self.endpoint, reason)
        if not delivered:
            raise _StreamFailed(reason)


class Collector:
    """Streams from every discovered agent into one snapshot; start() once, stop() at exit."""

    def __init__(
        self,
        discover: Discovery,
        *,
        channel_factory: ChannelFactory = insecure_channel,
        stale_after_s: float = 5.0,
        rediscover_interval_s: float = 10.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        min_interval_ms: int = 0,
        sample_window: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discover = discover
        self.channel_factory = channel_factory
        self.stale_after_s = stale_after_s
        self.rediscover_interval_s = rediscover_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.min_interval_ms = min_interval_ms
        self.sample_window = sample_window
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _AgentRecord] = {}
        self._watches: dict[str, _AgentWatch] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.rediscover()
        self._thread = threading.Thread(
            target=self._discovery_loop, name="tessera-discovery", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.stop()
        for watch in watches:
            watch.thread.join()

    def _discovery_loop(self) -> None:
        while not self._stop.wait(self.rediscover_interval_s):
            self.rediscover()

    def rediscover(self) -> None:
        """Start streams to new agents and drop the ones discovery no longer lists."""
        try:
            endpoints = {e.name: e for e in self.discover()}
        except Exception:  # keep following the agents we know; try again next round
            log.exception("agent discovery failed; keeping the %d known agents", len(self._watches))
            return
        started, stopped = [], []
        with self._lock:
            for name, watch in list(self._watches.items()):
                if endpoints.get(name) != watch.endpoint:
                    stopped.append(self._watches.pop(name))
                    self._records.pop(name, None)
            for name, endpoint in endpoints.items():
                if name not in self._watches:
                    self._records[name] = _AgentRecord(endpoint)
                    self._watches[name] = watch = _AgentWatch(self, endpoint)
                    started.append(watch)
        for watch in stopped:
            watch.stop()
        for watch in started:
            watch.start()
        if started or stopped:
            log.info(
                "agents: +%s -%s",
                [w.endpoint.name for w in started],
                [w.endpoint.name for w in stopped],
            )

    # -- stream events --------------------------------------------------------------------------

    def _received(self, endpoint: AgentEndpoint, message: agent_pb2.TelemetrySnapshot) -> None:
        with self._lock:
            record = self._records.get(endpoint.name)
            if record is None or record.endpoint != endpoint:
                return  # dropped by discovery meanwhile
            if record.status != AgentStatus.FRESH:
                log.info("agent %s: fresh (sequence %d)", endpoint.name, message.sequence)
            record.status = AgentStatus.FRESH
            record.last_message = message
            record.received_at = self._clock()
            record.last_error = None
            for instance in message.instances:
                for window, samples in (
                    (record.ttft, instance.ttft_samples_s),
                    (record.tpot, instance.tpot_samples_s),
                ):
                    window.setdefault(
                        instance.instance_id, collections.deque(maxlen=self.sample_window)
                    ).extend(samples)

    def _disconnected(self, endpoint: AgentEndpoint, reason: str) -> None:
        with self._lock:
            record = self._records.get(endpoint.name)
            if record is None or record.endpoint != endpoint:
                return
            if record.status == AgentStatus.FRESH:
                log.warning("agent %s: stale, stream lost (%s)", endpoint.name, reason)
                record.status = AgentStatus.STALE
            record.reconnects += 1
            record.last_error = reason

    # -- what policies read ---------------------------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        now = self._clock()
        with self._lock:
            views = {name: self._view(record, now) for name, record in self._records.items()}
        return FleetSnapshot(agents=views)

    def _view(self, record: _AgentRecord, now: float) -> AgentView:
        message = record.last_message
        age_s = now - record.received_at if record.received_at is not None else None
        status = record.status
        if status == AgentStatus.FRESH and age_s is not None and age_s > self.stale_after_s:
            status = AgentStatus.STALE
        devices: tuple[DeviceTelemetry, ...] = ()
        instances: tuple[InstanceStats, ...] = ()
        if message is not None:
            devices = tuple(device_from_proto(d) for d in message.devices)
            instances = tuple(
                instance_from_proto(
                    i,
                    tuple(record.ttft.get(i.instance_id, ())),
                    tuple(record.tpot.get(i.instance_id, ())),
                )
                for i in message.instances
            )
        return AgentView(
            endpoint=record.endpoint,
            status=status,
            node_name=message.node_name if message else record.endpoint.node_name,
            agent_version=message.agent_version if message else "",
            schema_version=message.schema_version if message else 0,
            sequence=message.sequence if message else 0,
            age_s=age_s,
            devices=devices,
            instances=instances,
            device_errors=dict(message.device_errors) if message else {},
            reconnects=record.reconnects,
            last_error=record.last_error,
        )


AGENT_SERVICE_ENV = "TESSERA_AGENT_SERVICE"

COLLECTOR_ENVIRONMENT = (
    AGENT_SERVICE_ENV,
    "TESSERA_AGENT_GRPC_PORT",
    "TESSERA_AGENT_CONTROL",
    "TESSERA_TLS_DIR",
    "TESSERA_AGENT_TLS_SERVER_NAME",
)
"""Every variable `collector_from_environment` reads (the chart's contract is checked on it)."""


def collector_from_environment(environ: Mapping[str, str] = os.environ) -> Collector:
    """The collector the Helm chart configures through the operator's environment.

    TESSERA_AGENT_SERVICE (the agents' headless Service) and TESSERA_AGENT_GRPC_PORT say where
    agents are; with TESSERA_AGENT_CONTROL=true the agents speak mutual TLS and the client
    certificate is read from TESSERA_TLS_DIR (tls.crt, tls.key, ca.crt). The agents' certificate
    must be issued for TESSERA_AGENT_TLS_SERVER_NAME, by default the Service's name.
    """
    try:
        service = environ[AGENT_SERVICE_ENV]
        port = int(environ.get("TESSERA_AGENT_GRPC_PORT", "50051"))
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"agent discovery needs TESSERA_AGENT_SERVICE and a port: {error}"
        ) from error
    channel_factory: ChannelFactory = insecure_channel
    if environ.get("TESSERA_AGENT_CONTROL", "false").lower() == "true":
        tls_dir = environ.get("TESSERA_TLS_DIR")
        if not tls_dir:
            raise ValueError("TESSERA_AGENT_CONTROL=true needs TESSERA_TLS_DIR (mutual TLS)")
        folder = Path(tls_dir)
        tls = ClientTls.from_files(
            folder / "ca.crt",
            folder / "tls.crt",
            folder / "tls.key",
            server_name=environ.get("TESSERA_AGENT_TLS_SERVER_NAME", service),
        )
        channel_factory = tls.channel
    return Collector(dns_discovery(service, port), channel_factory=channel_factory)
