"""The node agent's gRPC server: Telemetry (read) and Control (write), plus gRPC health checking.

Safety rules, in code rather than in deployment notes:
- Control is served only on the mutual-TLS endpoint (client certificates required and checked
  against the chart's CA); without TLS files the agent serves no Control at all.
- Telemetry and health are also served on a plaintext port only when one is configured
  (`telemetry_listen`, the chart's read-only telemetry switch).
- A control value outside the device's range is refused with INVALID_ARGUMENT before the device
  is touched; each backend error maps to one status code (STATUS_OF_ERROR).
- Every power limit and clock lock the agent set is put back to the default on shutdown, and
  optionally everything is reset at start, so that a crashed agent leaves no cap behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tessera.agents.backend import (
    BackendError,
    ClockLock,
    DeviceBackend,
    DeviceInfo,
    DeviceKind,
    DeviceNotFoundError,
    DeviceReading,
    DeviceUnavailableError,
    NotSupportedError,
    OutOfRangeError,
    PermissionDeniedError,
)
from tessera.agents.instance_stats import InstanceStats, InstanceStatsSource
from tessera.agents.sampler import Sampler, Snapshot
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

import tessera

log = logging.getLogger(__name__)

# Minor version of agent.proto this agent was built from (see the versioning notes there).
SCHEMA_VERSION = 1
TELEMETRY_SERVICE = "tessera.agent.v1.Telemetry"
CONTROL_SERVICE = "tessera.agent.v1.Control"

# Let clients ping every 5 s (tessera.agents.client.CHANNEL_OPTIONS pings every 10 s) so that
# a stream to a dead node fails fast; gRPC's default would answer such pings with GOAWAY.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Most specific first: the first matching type decides.
STATUS_OF_ERROR: tuple[tuple[type[BackendError], grpc.StatusCode], ...] = (
    (OutOfRangeError, grpc.StatusCode.INVALID_ARGUMENT),
    (DeviceNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotSupportedError, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (DeviceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BackendError, grpc.StatusCode.INTERNAL),
)

_KIND = {
    DeviceKind.GPU: agent_pb2.DEVICE_KIND_GPU,
    DeviceKind.NPU: agent_pb2.DEVICE_KIND_NPU,
    DeviceKind.CPU: agent_pb2.DEVICE_KIND_CPU,
}


def status_of(error: BackendError) -> grpc.StatusCode:
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


# -- conversions to the wire format ------------------------------------------------------------


def device_info_to_proto(info: DeviceInfo) -> agent_pb2.DeviceInfo:
    message = agent_pb2.DeviceInfo(
        uuid=info.uuid,
        index=info.index,
        kind=_KIND[info.kind],
        vendor=info.vendor,
        model=info.model,
        backend=info.backend,
        power_limit_settable=info.power_limit_settable,
        clocks_lockable=info.clocks_lockable,
    )
    _set_present(
        message,
        power_limit_min_w=info.power_limit_min_w,
        power_limit_max_w=info.power_limit_max_w,
        power_limit_default_w=info.power_limit_default_w,
        sm_clock_min_mhz=info.sm_clock_min_mhz,
        sm_clock_max_mhz=info.sm_clock_max_mhz,
        memory_total_bytes=info.memory_total_bytes,
    )
    return message


def _set_present(message: object, **fields: float | int | None) -> None:
    """Set the proto3 `optional` fields that were measured; leave the others absent."""
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)


def reading_to_proto(reading: DeviceReading, info: DeviceInfo | None) -> agent_pb2.DeviceSample:
    message = agent_pb2.DeviceSample(
        uuid=reading.uuid, index=reading.index, throttle_reasons=list(reading.throttle_reasons)
    )
    _set_present(
        message,
        power_w=reading.power_w,
        energy_j=reading.energy_j,
        power_limit_w=reading.power_limit_w,
        power_limit_min_w=info.power_limit_min_w if info else None,
        power_limit_max_w=info.power_limit_max_w if info else None,
        sm_clock_mhz=reading.sm_clock_mhz,
        memory_clock_mhz=reading.memory_clock_mhz,
        utilization_ratio=reading.utilization_ratio,
        memory_utilization_ratio=reading.memory_utilization_ratio,
        memory_used_bytes=reading.memory_used_bytes,
        memory_total_bytes=reading.memory_total_bytes,
        temperature_c=reading.temperature_c,
        locked_sm_clock_min_mhz=reading.locked_sm_clock_min_mhz,
        locked_sm_clock_max_mhz=reading.locked_sm_clock_max_mhz,
    )
    return message


def instance_to_proto(stats: InstanceStats) -> agent_pb2.InstanceSample:
    return agent_pb2.InstanceSample(
        instance_id=stats.instance_id,
        model=stats.model,
        role=stats.role,
        device_uuids=list(stats.device_uuids),
        queue_length=stats.queue_length,
        running_batch=stats.running_batch,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_free=stats.kv_blocks_free,
        tokens_per_s=stats.tokens_per_s,
        ttft_samples_s=list(stats.ttft_samples_s),
        tpot_samples_s=list(stats.tpot_samples_s),
        requests_completed_total=stats.requests_completed_total,
        tokens_generated_total=stats.tokens_generated_total,
    )


def merge_rounds(rounds: Sequence[Snapshot]) -> Snapshot:
    """The newest round, carrying the latency samples of the older ones, so that a stream that
    skips rounds (min_interval_ms, or a slow reader) still delivers every sample once."""
    newest = rounds[-1]
    if len(rounds) == 1:
        return newest
    ttft: dict[str, list[float]] = {}
    tpot: dict[str, list[float]] = {}
    for round_ in rounds:
        for stats in round_.instances:
            ttft.setdefault(stats.instance_id, []).extend(stats.ttft_samples_s)
            tpot.setdefault(stats.instance_id, []).extend(stats.tpot_samples_s)
    instances = tuple(
        InstanceStats(
            **{
                **stats.__dict__,
                "ttft_samples_s": tuple(ttft[stats.instance_id]),
                "tpot_samples_s": tuple(tpot[stats.instance_id]),
            }
        )
        for stats in newest.instances
    )
    return Snapshot(
        newest.sequence, newest.timestamp_s, newest.devices, instances, newest.device_errors
    )


# -- services ----------------------------------------------------------------------------------


class Controller:
    """Applies control requests to the backend and remembers what it changed, so that shutdown
    can put exactly that back."""

    def __init__(self, backend: DeviceBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._power_limit_set: set[str] = set()
        self._clocks_locked: set[str] = set()

    def set_power_limit(self, uuid: str, power_limit_w: float) -> float:
        in_force_w = self.backend.set_power_limit(uuid, power_limit_w)
        with self._lock:
            self._power_limit_set.add(uuid)
        log.info(
            "device %s: power limit %.1f W requested, %.1f W in force",
            uuid,
            power_limit_w,
            in_force_w,
        )
        return in_force_w

    def reset_power_limit(self, uuid: str) -> float:
        in_force_w = self.backend.reset_power_limit(uuid)
        with self._lock:
            self._power_limit_set.discard(uuid)
        return in_force_w

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> ClockLock:
        lock = self.backend.lock_sm_clocks(uuid, min_mhz, max_mhz)
        with self._lock:
            self._clocks_locked.add(uuid)
        log.info("device %s: SM clock locked to [%d, %d] MHz", uuid, min_mhz, max_mhz)
        return lock

    def reset_sm_clocks(self, uuid: str) -> ClockLock:
        lock = self.backend.reset_sm_clocks(uuid)
        with self._lock:
            self._clocks_locked.discard(uuid)
        return lock

    def restore(self, everything: bool = False) -> list[str]:
        """Put defaults back on the devices this agent changed (all devices if `everything`);
        return the failures, after trying every device."""
        failures: list[str] = []
        with self._lock:
            clocks = (
                {d.uuid for d in self.backend.devices() if d.clocks_lockable}
                if everything
                else set(self._clocks_locked)
            )
            limits = (
                {d.uuid for d in self.backend.devices() if d.power_limit_settable}
                if everything
                else set(self._power_limit_set)
            )
        for uuid in sorted(clocks):
            try:
                self.reset_sm_clocks(uuid)
            except BackendError as error:
                log.error("device %s: could not reset SM clocks: %s", uuid, error)
                failures.append(f"{uuid}: clocks: {error}")
        for uuid in sorted(limits):
            try:
                in_force_w = self.reset_power_limit(uuid)
                log.info(
                    "device %s: default power limit restored, %.1f W in force", uuid, in_force_w
                )
            except BackendError as error:
                log.error("device %s: could not restore the default power limit: %s", uuid, error)
                failures.append(f"{uuid}: power limit: {error}")
        return failures


class TelemetryServicer(agent_pb2_grpc.TelemetryServicer):
    def __init__(self, agent: AgentServer) -> None:
        self._agent = agent

    def GetInfo(
        self, request: agent_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentInfo:
        agent = self._agent
        return agent_pb2.AgentInfo(
            schema_version=SCHEMA_VERSION,
            node_name=agent.node_name,
            agent_version=tessera.__version__,
            devices=[device_info_to_proto(d) for d in agent.backend.devices()],
            control_enabled=agent.control_enabled,
            sampling_interval_ms=round(agent.sampler.interval_s * 1000),
        )

    def Watch(
        self, request: agent_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.TelemetrySnapshot]:
        agent = self._agent
        sampler = agent.sampler
        wanted = set(request.device_uuids)
        min_interval_s = request.min_interval_ms / 1000.0
        infos = {d.uuid: d for d in agent.backend.devices()}
        unknown = wanted - infos.keys()
        if unknown:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no such devices on {agent.node_name}: {sorted(unknown)}",
            )
        latest = sampler.latest()
        seen = latest.sequence - 1 if latest else 0  # start with the newest round, at once
        pending: list[Snapshot] = []
        last_sent_s = float("-inf")
        while context.is_active() and not sampler.stopped:
            rounds = sampler.wait_after(seen, timeout_s=0.5)
            if not rounds:
                continue
            seen = rounds[-1].sequence
            pending.extend(rounds)
            if pending[-1].timestamp_s - last_sent_s < min_interval_s:
                continue
            snapshot = merge_rounds(pending)
            pending.clear()
            last_sent_s = snapshot.timestamp_s
            yield agent_pb2.TelemetrySnapshot(
                schema_version=SCHEMA_VERSION,
                node_name=agent.node_name,
                agent_version=tessera.__version__,
                sequence=snapshot.sequence,
                timestamp_unix_ns=round(snapshot.timestamp_s * 1e9),
                devices=[
                    reading_to_proto(r, infos.get(r.uuid))
                    for r in snapshot.devices
                    if not wanted or r.uuid in wanted
                ],
                instances=[instance_to_proto(s) for s in snapshot.instances],
                device_errors=snapshot.device_errors,
            )


class ControlServicer(agent_pb2_grpc.ControlServicer):
    def __init__(self, agent: AgentServer) -> None:
        self._agent = agent

    def _run(self, rpc: str, context: grpc.ServicerContext, action: Callable[[], object]) -> object:
        try:
            result = action()
        except BackendError as error:
            code = status_of(error)
            self._agent.count_control(rpc, code)
            log.warning("%s refused with %s: %s", rpc, code.name, error)
            context.abort(code, str(error))
        self._agent.count_control(rpc, grpc.StatusCode.OK)
        return result

    def _power_response(self, uuid: str, in_force_w: float) -> agent_pb2.PowerLimitResponse:
        info = self._agent.backend.info(uuid)
        response = agent_pb2.PowerLimitResponse(
            schema_version=SCHEMA_VERSION, device_uuid=uuid, power_limit_w=in_force_w
        )
        _set_present(
            response,
            power_limit_min_w=info.power_limit_min_w,
            power_limit_max_w=info.power_limit_max_w,
            power_limit_default_w=info.power_limit_default_w,
        )
        return response

    def _clocks_response(self, uuid: str, lock: ClockLock) -> agent_pb2.ClocksResponse:
        response = agent_pb2.ClocksResponse(
            schema_version=SCHEMA_VERSION, device_uuid=uuid, locked=lock.locked
        )
        _set_present(
            response,
            sm_clock_min_mhz=lock.min_mhz,
            sm_clock_max_mhz=lock.max_mhz,
            sm_clock_mhz=lock.current_sm_clock_mhz,
        )
        return response

    def SetPowerLimit(
        self, request: agent_pb2.SetPowerLimitRequest, context: grpc.ServicerContext
    ) -> agent_pb2.PowerLimitResponse:
        controller = self._agent.controller
        in_force_w = self._run(
            "SetPowerLimit",
            context,
            lambda: controller.set_power_limit(request.device_uuid, request.power_limit_w),
        )
        assert isinstance(in_force_w, float)
        return self._power_response(request.device_uuid, in_force_w)

    def ResetPowerLimit(
        self, request: agent_pb2.ResetPowerLimitRequest, context: grpc.ServicerContext
    ) -> agent_pb2.PowerLimitResponse:
        controller = self._agent.controller
        in_force_w = self._run(
            "ResetPowerLimit", context, lambda: controller.reset_power_limit(request.device_uuid)
        )
        assert isinstance(in_force_w, float)
        return self._power_response(request.device_uuid, in_force_w)

    def LockClocks(
        self, request: agent_pb2.LockClocksRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ClocksResponse:
        controller = self._agent.controller
        lock = self._run(
            "LockClocks",
            context,
            lambda: controller.lock_sm_clocks(
                request.device_uuid, request.sm_clock_min_mhz, request.sm_clock_max_mhz
            ),
        )
        assert isinstance(lock, ClockLock)
        return self._clocks_response(request.device_uuid, lock)

    def ResetClocks(
        self, request: agent_pb2.ResetClocksRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ClocksResponse:
        controller = self._agent.controller
        lock = self._run(
            "ResetClocks", context, lambda: controller.reset_sm_clocks(request.device_uuid)
        )
        assert isinstance(lock, ClockLock)
        return self._clocks_response(request.device_uuid, lock)


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes for the mutual-TLS endpoint: the agent's certificate chain and key, and the CA
    that client certificates must chain to."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path) -> ServerTls:
        return cls(cert.read_bytes(), key.read_bytes(), client_ca.read_bytes())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=True,
        )


class AgentServer:
    """The agent: sampler, gRPC endpoints and the control bookkeeping, started and stopped as one.

    `listen` is the mutual-TLS endpoint when `tls` is given (Telemetry, Control, health), else a
    plaintext endpoint without Control. `telemetry_listen` adds a plaintext read-only endpoint
    (Telemetry and health). Port 0 picks a free port; the bound ports are in `port` and
    `telemetry_port` after `start`.
    """

    def __init__(
        self,
        backend: DeviceBackend,
        *,
        node_name: str,
        listen: str = "0.0.0.0:50051",
        tls: ServerTls | None = None,
        telemetry_listen: str | None = None,
        sources: Sequence[InstanceStatsSource] = (),
        interval_s: float = 1.0,
        reset_on_start: bool = False,
        on_control: Callable[[str, grpc.StatusCode], None] | None = None,
        max_workers: int = 16,
    ) -> None:
        self.backend = backend
        self.node_name = node_name
        self.sampler = Sampler(backend, sources, interval_s)
        self.controller = Controller(backend)
        self.control_enabled = tls is not None
        self.port: int | None = None
        self.telemetry_port: int | None = None
        self._listen, self._tls, self._telemetry_listen = listen, tls, telemetry_listen
        self._reset_on_start = reset_on_start
        self._on_control = on_control
        self._max_workers = max_workers
        self._health = health.HealthServicer()
        self._servers: list[grpc.Server] = []
        self._stopped = threading.Event()

    def count_control(self, rpc: str, code: grpc.StatusCode) -> None:
        if self._on_control is not None:
            self._on_control(rpc, code)

    def _server(self, with_control: bool) -> grpc.Server:
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="tessera-agent"
            ),
            options=SERVER_OPTIONS,
        )
        agent_pb2_grpc.add_TelemetryServicer_to_server(TelemetryServicer(self), server)
        if with_control:
            agent_pb2_grpc.add_ControlServicer_to_server(ControlServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    def start(self) -> None:
        if self._reset_on_start:
            self.controller.restore(everything=True)
        self.sampler.sample_once()  # the first stream gets data at once
        self.sampler.start()
        main = self._server(with_control=self.control_enabled)
        if self._tls is not None:
            self.port = main.add_secure_port(self._listen, self._tls.credentials())
        else:
            self.port = main.add_insecure_port(self._listen)
        self._servers.append(main)
        if self._telemetry_listen is not None:
            read_only = self._server(with_control=False)
            self.telemetry_port = read_only.add_insecure_port(self._telemetry_listen)
            self._servers.append(read_only)
        for server in self._servers:
            server.start()
        for service in (
            "",
            TELEMETRY_SERVICE,
            *([CONTROL_SERVICE] if self.control_enabled else []),
        ):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "agent %s serving %d devices (%s) on port %s (%s)%s",
            self.node_name,
            len(self.backend.devices()),
            self.backend.name,
            self.port,
            "mTLS, Control enabled" if self.control_enabled else "plaintext, Control disabled",
            f", read-only telemetry on port {self.telemetry_port}" if self.telemetry_port else "",
        )

    def stop(self, grace_s: float = 1.0) -> list[str]:
        """Stop serving, then restore the defaults this agent changed; return restore failures."""
        if self._stopped.is_set():
            return []
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self.sampler.stop()
        events = [server.stop(grace_s) for server in self._servers]
        for event in events:
            event.wait()
        failures = self.controller.restore()
        self.backend.close()
        return failures

    def healthy(self) -> tuple[bool, str]:
        """Whether the agent samples its devices (for the kubelet's probes, via /healthz)."""
        if self._stopped.is_set():
            return False, "stopping"
        latest = self.sampler.latest()
        if latest is None:
            return False, "no sampling round yet"
        age_s = self.sampler.clock() - latest.timestamp_s
        limit_s = 3 * self.sampler.interval_s + 5.0
        if age_s > limit_s:
            return False, f"last sampling round {age_s:.1f} s ago (limit {limit_s:.1f} s)"
        if latest.device_errors and len(latest.device_errors) == len(self.backend.devices()):
            return False, "no device could be read: " + "; ".join(latest.device_errors.values())
        return True, f"ok: {len(latest.devices)} devices, round {latest.sequence}"

    def wait(self) -> None:
        """Block until `stop` is called (from a signal handler, say)."""
        self._stopped.wait()
