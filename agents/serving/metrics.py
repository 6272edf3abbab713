"""Prometheus metrics of one `tessera serve` process, under vLLM's names where vLLM has one.

Dashboards and autoscalers written for vLLM read these unchanged (`vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, `vllm:time_to_first_token_seconds`, ...). Every series carries
`model_name` (vLLM's label) and Tessera's `pool` and `role`, so one query can compare the pools
of a plan. Names vLLM lacks are `tessera:`-prefixed.

The engine-side values (queue, batch, KV use, token counters, TTFT and TPOT samples) are
written on the serving loop's thread from `EngineStatsSnapshot`s; request outcomes and
end-to-end latency are written by the HTTP handlers.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tessera.agents.engine.stats import EngineStatsSnapshot
from tessera.agents.instance_stats import InstanceStats

LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
LABELS = ("model_name", "pool", "role")
MAX_AGENT_SAMPLES = 4096
"""Latency samples kept for the node agent between its reads (it reads every second)."""


class ServingMetrics:
    """The metrics of one served model, in their own registry."""

    def __init__(self, model_name: str, pool: str, role: str) -> None:
        self.registry = registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "pool": pool, "role": role}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, LABELS + extra, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use.")
        self.kv_blocks = gauge("tessera:kv_cache_blocks", "KV-cache blocks in the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens computed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.preemptions = counter("vllm:num_preemptions", "Requests preempted (recomputed).")
        self.success = counter(
            "vllm:request_success", "Requests finished, by reason.", ("finished_reason",)
        )
        self.rejected = counter(
            "tessera:requests_rejected",
            "Requests answered with an error, by reason (queue_full, invalid, timeout, "
            "aborted, error).",
            ("reason",),
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS_S
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per request: mean time per output token after the first.",
            TOKEN_LATENCY_BUCKETS_S,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
            LATENCY_BUCKETS_S,
        )  # fmt: skip
        self._last: EngineStatsSnapshot | None = None
        self._baseline: EngineStatsSnapshot | None = None
        """The warm-up's totals, left out of the agent's counters."""
        self._lock = threading.Lock()
        self._ttft_s: deque[float] = deque(maxlen=MAX_AGENT_SAMPLES)
        self._tpot_s: deque[float] = deque(maxlen=MAX_AGENT_SAMPLES)
        self._children: dict[Any, Any] = {}
        """Each metric's child with this server's labels: `observe_engine` runs on the engine
        thread every step, where a `labels(**...)` lookup per metric is time off the step."""

    def _mine(self, metric: Any) -> Any:
        child = self._children.get(metric)
        if child is None:
            child = self._children[metric] = metric.labels(**self.labels)
        return child

    def observe_engine(self, snapshot: EngineStatsSnapshot) -> None:
        """Write one (drained) engine snapshot; counters advance by what changed since the last."""
        self._mine(self.running).set(snapshot.running_batch)
        self._mine(self.waiting).set(snapshot.queue_length)
        total = max(snapshot.kv_blocks_total, 1)
        self._mine(self.kv_usage).set(snapshot.kv_blocks_used / total)
        self._mine(self.kv_blocks).set(snapshot.kv_blocks_total)
        last = self._last
        for counter, now, before in (
            (self.prompt_tokens, snapshot.prompt_tokens_total, last and last.prompt_tokens_total),
            (
                self.generation_tokens,
                snapshot.generated_tokens_total,
                last and last.generated_tokens_total,
            ),
            (self.preemptions, snapshot.preemptions_total, last and last.preemptions_total),
        ):
            if now > (before or 0):
                self._mine(counter).inc(now - (before or 0))
        for ms in snapshot.ttft_ms:
            self._mine(self.ttft).observe(ms / 1e3)
        for ms in snapshot.tpot_ms:
            self._mine(self.tpot).observe(ms / 1e3)
        with self._lock:
            self._ttft_s.extend(ms / 1e3 for ms in snapshot.ttft_ms)
            self._tpot_s.extend(ms / 1e3 for ms in snapshot.tpot_ms)
            self._last = snapshot

    def instance_stats(self, instance_id: str) -> InstanceStats:
        """What the node agent's source reads (`INSTANCE_STATS_PATH`): the engine now, and the
        latency samples since the previous call (each handed out once)."""
        with self._lock:
            last, base = self._last, self._baseline
            ttft, tpot = tuple(self._ttft_s), tuple(self._tpot_s)
            self._ttft_s.clear()
            self._tpot_s.clear()
        stats = InstanceStats(
            instance_id=instance_id,
            model=self.labels["model_name"],
            role=self.labels["role"],
            ttft_samples_s=ttft,
            tpot_samples_s=tpot,
        )
        if last is None:
            return stats
        return dataclasses.replace(
            stats,
            queue_length=last.queue_length,
            running_batch=last.running_batch,
            kv_blocks_used=last.kv_blocks_used,
            kv_blocks_free=last.kv_blocks_free,
            tokens_per_s=last.generated_tokens_per_s,
            requests_completed_total=last.requests_finished_total
            - (base.requests_finished_total if base else 0),
            tokens_generated_total=last.generated_tokens_total
            - (base.generated_tokens_total if base else 0),
        )

    def start_from(self, snapshot: EngineStatsSnapshot) -> None:
        """Count from `snapshot` on (the warm-up before serving is not traffic)."""
        with self._lock:
            self._last = self._baseline = snapshot

    def finished(self, reason: str, e2e_s: float) -> None:
        self.success.labels(**self.labels, finished_reason=reason).inc()
        self.e2e.labels(**self.labels).observe(e2e_s)

    def reject(self, reason: str) -> None:
        self.rejected.labels(**self.labels, reason=reason).inc()

    def touch(self) -> None:
        """Create every labelled series at zero, so dashboards have data before traffic."""
        labels = self.labels
        for metric in (self.running, self.waiting, self.kv_usage, self.kv_blocks):
            metric.labels(**labels)
        for counter in (self.prompt_tokens, self.generation_tokens, self.preemptions):
            counter.labels(**labels)
        for histogram in (self.ttft, self.tpot, self.e2e):
            histogram.labels(**labels)
        for reason in ("stop", "length"):
            self.success.labels(**labels, finished_reason=reason)
        for reason in ("queue_full", "invalid", "timeout", "aborted", "error"):
            self.rejected.labels(**labels, reason=reason)
