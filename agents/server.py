"""The node agent's gRPC server: Telemetry (read) and Control (write), plus gRPC health checking.

The servers are grpc.aio servers on one event loop, on a thread of the agent's own: an open
Watch stream is a suspended coroutine, not a worker thread, so any number of idle streams leaves
health checking and GetInfo answering (a thread pool of 16 was exhausted by 16 idle streams).
Blocking device calls (Control) run on the loop's executor, never on the loop itself; /healthz
asks the loop, with a deadline, whether every server still serves.

Safety rules, in code rather than in deployment notes:
- Control is served only on the mutual-TLS endpoint (client certificates required and checked
  against the chart's CA); without TLS files the agent serves no Control at all.
- A client certificate from that CA is not enough: Control also requires one of the allowed
  SANs (tessera.agents.identity), else PERMISSION_DENIED; Telemetry and health stay open to
  every client the TLS handshake admits.
- Each client address may hold at most `max_watch_streams_per_client` Watch streams; one more
  is refused with RESOURCE_EXHAUSTED, so that one client cannot exhaust the agent's memory.
- Telemetry and health are also served on a plaintext port only when one is configured
  (`telemetry_listen`, the chart's read-only telemetry switch).
- A control value outside the device's range is refused with INVALID_ARGUMENT before the device
  is touched; each backend error maps to one status code (STATUS_OF_ERROR).
- Every power limit and clock lock the agent set is put back to the default on shutdown, and
  optionally everything is reset at start, so that a crashed agent leaves no cap behind.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tessera.agents.backend import (
    BackendError,
    ClockLock,
    DeviceBackend,
    DeviceNotFoundError,
    DeviceUnavailableError,
    NotSupportedError,
    OutOfRangeError,
    PermissionDeniedError,
)
from tessera.agents.identity import AllowedSans, describe_peer
from tessera.agents.instance_stats import InstanceStatsSource
from tessera.agents.proto_mapping import (
    SCHEMA_VERSION,
    clocks_response,
    device_info_to_proto,
    instance_to_proto,
    power_limit_response,
    reading_to_proto,
)
from tessera.agents.sampler import Sampler, Snapshot
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

import tessera

log = logging.getLogger(__name__)
T = TypeVar("T")

TELEMETRY_SERVICE = "tessera.agent.v1.Telemetry"
CONTROL_SERVICE = "tessera.agent.v1.Control"

# Let clients ping every 5 s (tessera.agents.client.CHANNEL_OPTIONS pings every 10 s) so that
# a stream to a dead node fails fast; gRPC's default would answer such pings with GOAWAY.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

# /healthz's question to the gRPC loop must be answered within this, well inside the kubelet's
# probe timeout (the chart's timeoutSeconds is 3).
HEALTH_PROBE_TIMEOUT_S = 1.0
# Starting (binding the ports) and stopping the servers, beyond the stop's grace period.
LOOP_CALL_TIMEOUT_S = 30.0
# Streams one client address may hold: the operator's collector holds one per agent; the
# headroom covers restarts and tools, and a client past it gets RESOURCE_EXHAUSTED.
MAX_WATCH_STREAMS_PER_CLIENT = 64

# Most specific first: the first matching type decides.
STATUS_OF_ERROR: tuple[tuple[type[BackendError], grpc.StatusCode], ...] = (
    (OutOfRangeError, grpc.StatusCode.INVALID_ARGUMENT),
    (DeviceNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotSupportedError, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (DeviceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BackendError, grpc.StatusCode.INTERNAL),
)


def status_of(error: BackendError) -> grpc.StatusCode:
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


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
        dataclasses.replace(
            stats,
            ttft_samples_s=tuple(ttft[stats.instance_id]),
            tpot_samples_s=tuple(tpot[stats.instance_id]),
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


class RoundSignal:
    """Wakes the streams on the gRPC loop when the sampler publishes a round.

    The sampler runs on a thread of its own and cannot await; its listener hands the wake-up
    to the loop. A stream takes `current()` before it looks for new rounds, so a round
    published after its look sets the event it then awaits: no round is slept through.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def wake(self) -> None:
        """On the loop: wake every stream waiting now."""
        self._event.set()
        self._event = asyncio.Event()

    def wake_threadsafe(self, snapshot: Snapshot | None = None) -> None:
        """From any thread (a Sampler listener)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.wake)


def client_address(peer: str) -> str:
    """The client's address without its port, from gRPC's peer string (ipv4:1.2.3.4:5678,
    ipv6:[::1]:5678, unix:...), so that one client's streams count together."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return f"{kind}:{host}"
    return peer


class TelemetryServicer(agent_pb2_grpc.TelemetryServicer):
    def __init__(self, agent: AgentServer) -> None:
        self._agent = agent

    async def GetInfo(
        self, request: agent_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
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

    async def Watch(
        self, request: agent_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.TelemetrySnapshot]:
        agent = self._agent
        infos = {d.uuid: d for d in agent.backend.devices()}
        wanted = set(request.device_uuids)
        unknown = wanted - infos.keys()
        if unknown:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no such devices on {agent.node_name}: {sorted(unknown)}",
            )
        client = client_address(context.peer())
        if not agent.open_watch_stream(client):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{client} already holds {agent.max_watch_streams_per_client} Watch streams "
                f"(the most one client may hold); close one first",
            )
        try:
            async for snapshot in self._snapshots(request.min_interval_ms / 1000.0):
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
        finally:
            agent.close_watch_stream(client)

    async def _snapshots(self, min_interval_s: float) -> AsyncIterator[Snapshot]:
        """The sampler's rounds from the newest on, at most one per `min_interval_s` (skipped
        rounds merged into the next), until the sampler stops."""
        sampler, signal = self._agent.sampler, self._agent.rounds
        latest = sampler.latest()
        seen = latest.sequence - 1 if latest else 0  # start with the newest round, at once
        pending: list[Snapshot] = []
        last_sent_s = float("-inf")
        while not sampler.stopped:
            woken = signal.current()
            rounds = sampler.wait_after(seen, timeout_s=0)
            if not rounds:
                await woken.wait()
                continue
            seen = rounds[-1].sequence
            pending.extend(rounds)
            if pending[-1].timestamp_s - last_sent_s < min_interval_s:
                continue
            snapshot = merge_rounds(pending)
            pending.clear()
            last_sent_s = snapshot.timestamp_s
            yield snapshot


class ControlServicer(agent_pb2_grpc.ControlServicer):
    def __init__(self, agent: AgentServer, allowed: AllowedSans) -> None:
        self._agent = agent
        self._allowed = allowed

    async def _run(self, rpc: str, context: grpc.aio.ServicerContext, action: Callable[[], T]) -> T:
        """Authorise the caller, then run `action` on the loop's executor (device calls block)."""
        peer = context.auth_context()
        if not self._allowed.admits(peer):
            self._agent.count_control(rpc, grpc.StatusCode.PERMISSION_DENIED)
            log.warning(
                "%s refused with PERMISSION_DENIED: the client's certificate has %s; allowed: %s",
                rpc,
                describe_peer(peer),
                ", ".join(self._allowed.names()),
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rpc}: the client certificate's SANs are not among those allowed to call "
                "Control (the agent's --control-allowed-sans)",
            )
        try:
            result = await asyncio.to_thread(action)
        except BackendError as error:
            code = status_of(error)
            self._agent.count_control(rpc, code)
            log.warning("%s refused with %s: %s", rpc, code.name, error)
            await context.abort(code, str(error))
        self._agent.count_control(rpc, grpc.StatusCode.OK)
        return result

    def _power_response(self, uuid: str, in_force_w: float) -> agent_pb2.PowerLimitResponse:
        return power_limit_response(uuid, in_force_w, self._agent.backend.info(uuid))

    def _clocks_response(self, uuid: str, lock: ClockLock) -> agent_pb2.ClocksResponse:
        return clocks_response(uuid, lock)

    async def SetPowerLimit(
        self, request: agent_pb2.SetPowerLimitRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.PowerLimitResponse:
        controller = self._agent.controller
        in_force_w = await self._run(
            "SetPowerLimit",
            context,
            lambda: controller.set_power_limit(request.device_uuid, request.power_limit_w),
        )
        return self._power_response(request.device_uuid, in_force_w)

    async def ResetPowerLimit(
        self, request: agent_pb2.ResetPowerLimitRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.PowerLimitResponse:
        controller = self._agent.controller
        in_force_w = await self._run(
            "ResetPowerLimit", context, lambda: controller.reset_power_limit(request.device_uuid)
        )
        return self._power_response(request.device_uuid, in_force_w)

    async def LockClocks(
        self, request: agent_pb2.LockClocksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ClocksResponse:
        controller = self._agent.controller
        lock = await self._run(
            "LockClocks",
            context,
            lambda: controller.lock_sm_clocks(
                request.device_uuid, request.sm_clock_min_mhz, request.sm_clock_max_mhz
            ),
        )
        return self._clocks_response(request.device_uuid, lock)

    async def ResetClocks(
        self, request: agent_pb2.ResetClocksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ClocksResponse:
        controller = self._agent.controller
        lock = await self._run(
            "ResetClocks", context, lambda: controller.reset_sm_clocks(request.device_uuid)
        )
        return self._clocks_response(request.device_uuid, lock)


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes for the mutual-TLS endpoint: the agent's certificate chain and key, the CA
    that client certificates must chain to, and the client identities that may call Control."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes
    allowed_clients: AllowedSans

    @classmethod
    def from_files(
        cls, cert: Path, key: Path, client_ca: Path, *, allowed_client_sans: Iterable[str]
    ) -> ServerTls:
        """Raises ValueError naming the entry when an allowed SAN is malformed or none is given."""
        return cls(
            cert.read_bytes(),
            key.read_bytes(),
            client_ca.read_bytes(),
            AllowedSans.parse(allowed_client_sans),
        )

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
    `telemetry_port` after `start`, the servers in `grpc_servers` (in that order).
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
        max_watch_streams_per_client: int = MAX_WATCH_STREAMS_PER_CLIENT,
    ) -> None:
        if max_watch_streams_per_client < 1:
            raise ValueError(
                "max_watch_streams_per_client must be at least 1, "
                f"got {max_watch_streams_per_client}"
            )
        self.backend = backend
        self.node_name = node_name
        self.sampler = Sampler(backend, sources, interval_s)
        self.controller = Controller(backend)
        self.control_enabled = tls is not None
        self.max_watch_streams_per_client = max_watch_streams_per_client
        self.port: int | None = None
        self.telemetry_port: int | None = None
        self.grpc_servers: list[grpc.aio.Server] = []
        self._listen, self._tls, self._telemetry_listen = listen, tls, telemetry_listen
        self._reset_on_start = reset_on_start
        self._on_control = on_control
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._rounds: RoundSignal | None = None
        self._health: health.aio.HealthServicer | None = None
        self._watch_streams: collections.Counter[str] = collections.Counter()
        self._terminated_ports: set[int] = set()
        self._background: set[asyncio.Task[None]] = set()

    def count_control(self, rpc: str, code: grpc.StatusCode) -> None:
        if self._on_control is not None:
            self._on_control(rpc, code)

    @property
    def rounds(self) -> RoundSignal:
        assert self._rounds is not None, "the agent is not started"
        return self._rounds

    def open_watch_stream(self, client: str) -> bool:
        """Count a new stream of `client` (on the loop); False when it holds the most already."""
        if self._watch_streams[client] >= self.max_watch_streams_per_client:
            return False
        self._watch_streams[client] += 1
        return True

    def close_watch_stream(self, client: str) -> None:
        self._watch_streams[client] -= 1
        if self._watch_streams[client] <= 0:
            del self._watch_streams[client]

    # -- the loop --------------------------------------------------------------------------

    def call_on_grpc_loop(self, coroutine: Coroutine[Any, Any, T]) -> futures.Future[T]:
        """Run `coroutine` on the servers' event loop (from any other thread)."""
        if self._loop is None or self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("the agent's gRPC loop is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._rounds = RoundSignal(loop)
        self._loop_thread = threading.Thread(
            target=loop.run_forever, name="tessera-agent-grpc", daemon=True
        )
        self._loop_thread.start()

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def _server(self, with_control: bool) -> grpc.aio.Server:
        assert self._health is not None
        server = grpc.aio.server(options=SERVER_OPTIONS)
        agent_pb2_grpc.add_TelemetryServicer_to_server(TelemetryServicer(self), server)
        if with_control:
            assert self._tls is not None
            control = ControlServicer(self, self._tls.allowed_clients)
            agent_pb2_grpc.add_ControlServicer_to_server(control, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    async def _serve(self) -> None:
        """On the loop: bind and start every server, then report them SERVING."""
        self._health = health.aio.HealthServicer()
        main = self._server(with_control=self.control_enabled)
        if self._tls is not None:
            self.port = main.add_secure_port(self._listen, self._tls.credentials())
        else:
            self.port = main.add_insecure_port(self._listen)
        endpoints = [(main, self.port)]
        if self._telemetry_listen is not None:
            read_only = self._server(with_control=False)
            self.telemetry_port = read_only.add_insecure_port(self._telemetry_listen)
            endpoints.append((read_only, self.telemetry_port))
        for server, port in endpoints:
            await server.start()
            self.grpc_servers.append(server)
            task = asyncio.get_running_loop().create_task(self._note_termination(server, port))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        for service in (
            "",
            TELEMETRY_SERVICE,
            *([CONTROL_SERVICE] if self.control_enabled else []),
        ):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _note_termination(self, server: grpc.aio.Server, port: int) -> None:
        await server.wait_for_termination()
        self._terminated_ports.add(port)
        if not self._stopped.is_set():
            log.error("gRPC server on port %d has stopped", port)

    async def _shutdown(self, grace_s: float) -> None:
        """On the loop: stop the servers (in-flight calls get `grace_s`), then the executor."""
        await asyncio.gather(*(server.stop(grace_s) for server in self.grpc_servers))
        for task in list(self._background):
            await task
        await asyncio.get_running_loop().shutdown_default_executor()

    async def _grpc_problem(self) -> str | None:
        """On the loop: why the gRPC servers do not serve, or None."""
        stopped = [
            port for port in (self.port, self.telemetry_port) if port in self._terminated_ports
        ]
        if stopped:
            return "; ".join(f"gRPC server on port {port} has stopped" for port in stopped)
        assert self._health is not None
        check = await self._health.Check(health_pb2.HealthCheckRequest(service=""), None)
        if check.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
            return f"gRPC health says {name}"
        return None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling and serving; raises RuntimeError naming the address if one cannot be
        bound (the agent is then stopped again)."""
        if self._reset_on_start:
            self.controller.restore(everything=True)
        self._start_loop()
        self.sampler.add_listener(self.rounds.wake_threadsafe)
        self.sampler.sample_once()  # the first stream gets data at once
        self.sampler.start()
        try:
            self.call_on_grpc_loop(self._serve()).result(timeout=LOOP_CALL_TIMEOUT_S)
        except BaseException:
            self.stop(grace_s=0)
            raise
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
        if self._health is not None:
            shutdown = self._health.enter_graceful_shutdown()
            self.call_on_grpc_loop(shutdown).result(timeout=LOOP_CALL_TIMEOUT_S)
        self.sampler.stop()
        if self._loop is not None:
            self.rounds.wake_threadsafe()  # the streams see the sampler stopped and end
            stopping = self.call_on_grpc_loop(self._shutdown(grace_s))
            stopping.result(timeout=grace_s + LOOP_CALL_TIMEOUT_S)
            self._close_loop()
        failures = self.controller.restore()
        self.backend.close()
        return failures

    def healthy(self) -> tuple[bool, str]:
        """Whether the agent serves gRPC and samples its devices (the kubelet's probes, via
        /healthz). The gRPC question is asked on the servers' loop: a loop that does not answer
        within HEALTH_PROBE_TIMEOUT_S would not answer an RPC either."""
        if self._stopped.is_set():
            return False, "stopping"
        if self._loop is None:
            return False, "not started"
        probe = self.call_on_grpc_loop(self._grpc_problem())
        try:
            problem = probe.result(timeout=HEALTH_PROBE_TIMEOUT_S)
        except futures.TimeoutError:
            probe.cancel()
            return False, f"gRPC event loop did not answer within {HEALTH_PROBE_TIMEOUT_S} s"
        if problem is not None:
            return False, problem
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
