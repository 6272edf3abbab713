"""Prometheus metrics of the operator's telemetry collector (tessera.operator.collector).

Read from the collector's snapshot at scrape time, so they always match what policies see:
agents by status, each agent's freshness and reconnects, and the fleet's power as the operator
knows it (fresh agents only: a stale agent's last reading is not the fleet's power now).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PrometheusCollector
from tessera.operator.collector import AgentStatus, Collector

AGENT_LABELS = ("agent", "node")


class CollectorMetrics(PrometheusCollector):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        snapshot = self._collector.snapshot()
        by_status = GaugeMetricFamily(
            "tessera_collector_agents",
            "Node agents known to the operator, by status.",
            labels=["status"],
        )
        for status in AgentStatus:
            by_status.add_metric([status.value], len(snapshot.with_status(status)))
        up = GaugeMetricFamily(
            "tessera_collector_agent_up",
            "1 while the agent's telemetry is fresh, else 0.",
            labels=AGENT_LABELS,
        )
        age = GaugeMetricFamily(
            "tessera_collector_agent_age_seconds",
            "Time since the agent's last telemetry message.",
            labels=AGENT_LABELS,
        )
        reconnects = CounterMetricFamily(
            "tessera_collector_agent_disconnects",
            "Telemetry streams to the agent that broke or ended.",
            labels=AGENT_LABELS,
        )
        for name, agent in snapshot.agents.items():
            labels = [name, agent.node_name]
            up.add_metric(labels, 1.0 if agent.status == AgentStatus.FRESH else 0.0)
            if agent.age_s is not None:
                age.add_metric(labels, agent.age_s)
            reconnects.add_metric(labels, agent.reconnects)
        power = GaugeMetricFamily(
            "tessera_fleet_power_watts",
            "Power drawn by the devices of fresh agents, summed.",
            labels=[],
        )
        power.add_metric([], sum(d.power_w or 0.0 for _, d in snapshot.fresh_devices()))
        return [by_status, up, age, reconnects, power]


def register_collector_metrics(
    collector: Collector, registry: CollectorRegistry = REGISTRY
) -> CollectorMetrics:
    """Export `collector`'s state from `registry` (the operator's default registry by default)."""
    metrics = CollectorMetrics(collector)
    registry.register(metrics)
    return metrics
