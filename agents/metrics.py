"""The agent's Prometheus exporter: device gauges with DCGM-like names, and the serving
instances' latency histograms and counters.

Device metrics are read from the newest sampling round at scrape time (a custom collector), so a
device that stops answering drops out instead of repeating its last value. Names follow
Prometheus conventions, base units in the name and `_total` on counters; the device ones mirror
NVIDIA's DCGM exporter fields so that dashboards translate one to one:

| Tessera                               | DCGM exporter                    |
|---------------------------------------|----------------------------------|
| tessera_device_power_watts            | DCGM_FI_DEV_POWER_USAGE          |
| tessera_device_energy_joules_total    | DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION (mJ there) |
| tessera_device_power_limit_watts      | DCGM_FI_DEV_POWER_MGMT_LIMIT     |
| tessera_device_sm_clock_hertz         | DCGM_FI_DEV_SM_CLOCK (MHz there) |
| tessera_device_memory_clock_hertz     | DCGM_FI_DEV_MEM_CLOCK (MHz there)|
| tessera_device_utilization_ratio      | DCGM_FI_DEV_GPU_UTIL (% there)   |
| tessera_device_memory_used_bytes      | DCGM_FI_DEV_FB_USED (MiB there)  |
| tessera_device_temperature_celsius    | DCGM_FI_DEV_GPU_TEMP             |
| tessera_device_throttled              | DCGM_FI_DEV_CLOCK_THROTTLE_REASONS (bitmask there) |

Every device series carries `node`, `uuid`, `device` (index) and `model` labels; instance series
carry `instance_id`, `model` and `role` (not `instance`, which Prometheus sets to the target).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from tessera.agents.backend import THROTTLE_REASONS, DeviceInfo, DeviceKind, DeviceReading
from tessera.agents.sampler import Snapshot

DEVICE_LABELS = ("node", "uuid", "device", "model")
INSTANCE_LABELS = ("node", "instance_id", "model", "role")
# Latency buckets around interactive-serving SLOs (TTFT in the 0.1-2 s range, TPOT 10-100 ms).
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
TPOT_BUCKETS_S = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.5,
    1.0,
)


class _SnapshotCollector(Collector):
    def __init__(self, exporter: AgentMetrics) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        return self._exporter.collect_snapshot()


class AgentMetrics:
    """The metrics of one agent in a registry of its own (tests run several in one process)."""

    def __init__(
        self,
        node_name: str,
        devices: Iterable[DeviceInfo],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.node_name = node_name
        self.devices = {d.uuid: d for d in devices}
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._latest: Snapshot | None = None
        self.ttft = Histogram(
            "tessera_request_ttft_seconds",
            "Time to first token of finished requests.",
            INSTANCE_LABELS,
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "tessera_request_tpot_seconds",
            "Time per output token (after the first) of finished requests.",
            INSTANCE_LABELS,
            buckets=TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.control_requests = Counter(
            "tessera_agent_control_requests",
            "Control RPCs served, by RPC and gRPC status code.",
            ("node", "rpc", "code"),
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe(self, snapshot: Snapshot) -> None:
        """Take a sampling round (a Sampler listener): keep it for scrapes, record latencies."""
        with self._lock:
            self._latest = snapshot
        for stats in snapshot.instances:
            labels = (self.node_name, stats.instance_id, stats.model, stats.role)
            for ttft_s in stats.ttft_samples_s:
                self.ttft.labels(*labels).observe(ttft_s)
            for tpot_s in stats.tpot_samples_s:
                self.tpot.labels(*labels).observe(tpot_s)

    def count_control(self, rpc: str, code: grpc.StatusCode) -> None:
        self.control_requests.labels(self.node_name, rpc, code.name).inc()

    def _device_labels(self, reading: DeviceReading) -> list[str]:
        info = self.devices.get(reading.uuid)
        return [self.node_name, reading.uuid, str(reading.index), info.model if info else ""]

    def collect_snapshot(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._latest
        if snapshot is None:
            return

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=DEVICE_LABELS)

        power = gauge("tessera_device_power_watts", "Power drawn by the device.")
        limit = gauge("tessera_device_power_limit_watts", "Power limit in force on the device.")
        limit_min = gauge("tessera_device_power_limit_min_watts", "Lowest settable power limit.")
        limit_max = gauge("tessera_device_power_limit_max_watts", "Highest settable power limit.")
        sm_clock = gauge("tessera_device_sm_clock_hertz", "SM (graphics) clock.")
        mem_clock = gauge("tessera_device_memory_clock_hertz", "Memory clock.")
        util = gauge("tessera_device_utilization_ratio", "Fraction of time a kernel ran, 0-1.")
        mem_used = gauge("tessera_device_memory_used_bytes", "Device memory in use.")
        mem_total = gauge("tessera_device_memory_total_bytes", "Device memory in all.")
        temperature = gauge("tessera_device_temperature_celsius", "Device temperature.")
        energy = CounterMetricFamily(
            "tessera_device_energy_joules",
            "Energy used by the device (monotonic counter).",
            labels=DEVICE_LABELS,
        )
        throttled = GaugeMetricFamily(
            "tessera_device_throttled",
            "1 while clocks are held down for this reason, else 0.",
            labels=[*DEVICE_LABELS, "reason"],
        )
        for reading in snapshot.devices:
            labels = self._device_labels(reading)
            info = self.devices.get(reading.uuid)
            for family, value, scale in (
                (power, reading.power_w, 1.0),
                (limit, reading.power_limit_w, 1.0),
                (limit_min, info.power_limit_min_w if info else None, 1.0),
                (limit_max, info.power_limit_max_w if info else None, 1.0),
                (sm_clock, reading.sm_clock_mhz, 1e6),
                (mem_clock, reading.memory_clock_mhz, 1e6),
                (util, reading.utilization_ratio, 1.0),
                (mem_used, reading.memory_used_bytes, 1.0),
                (mem_total, reading.memory_total_bytes, 1.0),
                (temperature, reading.temperature_c, 1.0),
                (energy, reading.energy_j, 1.0),
            ):
                if value is not None:
                    family.add_metric(labels, float(value) * scale)
            if info is not None and info.kind == DeviceKind.GPU:
                for reason in THROTTLE_REASONS:
                    throttled.add_metric(
                        [*labels, reason], 1.0 if reason in reading.throttle_reasons else 0.0
                    )
        device_families = (power, energy, limit, limit_min, limit_max, sm_clock, mem_clock, util)
        # A field no device measured is left out rather than exported without samples.
        yield from (
            f for f in (*device_families, mem_used, mem_total, temperature, throttled) if f.samples
        )

        def instance_gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=INSTANCE_LABELS)

        queue = instance_gauge(
            "tessera_instance_queued_requests", "Requests waiting to be scheduled."
        )
        batch = instance_gauge(
            "tessera_instance_running_requests", "Requests in the running batch."
        )
        kv_used = instance_gauge("tessera_instance_kv_blocks_used", "KV-cache blocks in use.")
        kv_free = instance_gauge("tessera_instance_kv_blocks_free", "KV-cache blocks free.")
        tokens = instance_gauge(
            "tessera_instance_tokens_per_second", "Output tokens per second now."
        )
        requests = CounterMetricFamily(
            "tessera_requests", "Requests finished.", labels=INSTANCE_LABELS
        )
        generated = CounterMetricFamily(
            "tessera_generated_tokens", "Output tokens generated.", labels=INSTANCE_LABELS
        )
        for stats in snapshot.instances:
            labels = [self.node_name, stats.instance_id, stats.model, stats.role]
            queue.add_metric(labels, stats.queue_length)
            batch.add_metric(labels, stats.running_batch)
            kv_used.add_metric(labels, stats.kv_blocks_used)
            kv_free.add_metric(labels, stats.kv_blocks_free)
            tokens.add_metric(labels, stats.tokens_per_s)
            requests.add_metric(labels, stats.requests_completed_total)
            generated.add_metric(labels, stats.tokens_generated_total)
        yield from (
            f for f in (queue, batch, kv_used, kv_free, tokens, requests, generated) if f.samples
        )

    def serve(
        self, host: str, port: int, healthy: Callable[[], tuple[bool, str]] | None = None
    ) -> int:
        """Serve /metrics, and /healthz for the kubelet's probes, on host:port (0 picks a
        port); return the bound port. /healthz answers 503 while `healthy` says no."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, why = healthy() if healthy is not None else (True, "ok")
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [why.encode() + b"\n"]
            return metrics_app(environ, start_response)

        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="tessera-metrics", daemon=True
        )
        thread.start()
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join()
            self._http = None


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape and probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
