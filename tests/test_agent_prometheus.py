"""The agents' Prometheus exporters: the text format they serve, /healthz, and a real Prometheus
(Debian's `prometheus` package, started here on loopback) scraping two agents."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from agent_support import make_certs, start_sim_agent, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_support import PROMETHEUS, running_prometheus
from tessera.agents.client import AgentClient
from tessera.agents.instance_stats import InstanceStats
from tessera.agents.metrics import AgentMetrics
from tessera.agents.server import AgentServer
from tessera.agents.sim_backend import SimBackend


class OneRequestEngine:
    """A test double of the engine: one finished request per round."""

    def instance_stats(self) -> Sequence[InstanceStats]:
        return [
            InstanceStats(
                instance_id="prefill-0",
                model="llama-3-8b",
                role="prefill",
                ttft_samples_s=(0.12,),
                tpot_samples_s=(0.03,),
                requests_completed_total=7,
            )
        ]


def start_exported_agent(
    node_name: str, **options: object
) -> tuple[AgentServer, AgentMetrics, int]:
    backend = SimBackend(device_count=2, node_name=node_name)
    metrics = AgentMetrics(node_name, backend.devices())
    agent = start_sim_agent(node_name, backend=backend, **options)  # type: ignore[arg-type]
    agent.sampler.add_listener(metrics.observe)
    port = metrics.serve("127.0.0.1", 0, healthy=agent.healthy)
    return agent, metrics, port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def exported() -> Iterator[list[tuple[AgentServer, AgentMetrics, int]]]:
    agents = [start_exported_agent(name) for name in ("node-a", "node-b")]
    yield agents
    for agent, metrics, _ in agents:
        agent.stop(grace_s=0)
        metrics.close()


def test_exporter_serves_device_metrics_with_units(exported: list) -> None:
    agent, _, port = exported[0]

    def scrape() -> dict | None:
        families = {
            f.name: f
            for f in text_string_to_metric_families(get(f"http://127.0.0.1:{port}/metrics")[1])
        }
        return families if "tessera_device_power_watts" in families else None

    families = wait_for(scrape, "device metrics after the first listened round")
    power = {s.labels["uuid"]: s.value for s in families["tessera_device_power_watts"].samples}
    expected = {
        d.uuid: agent.backend.operating_point(d.uuid).power_w for d in agent.backend.devices()
    }
    assert power == pytest.approx(expected)
    [sample] = [
        s for s in families["tessera_device_sm_clock_hertz"].samples if s.labels["device"] == "0"
    ]
    assert sample.value == agent.backend.read("SIM-node-a-0").sm_clock_mhz * 1e6
    assert sample.labels["node"] == "node-a" and "(simulated)" in sample.labels["model"]
    assert families["tessera_device_energy_joules"].type == "counter"
    limits = {s.value for s in families["tessera_device_power_limit_watts"].samples}
    assert limits == {700.0}
    throttled = {s.labels["reason"] for s in families["tessera_device_throttled"].samples}
    assert "sw_power_cap" in throttled
    assert "tessera_device_temperature_celsius" not in families  # not simulated, not invented


def test_engine_latencies_become_histograms_and_counters() -> None:
    agent, metrics, port = start_exported_agent("node-e", sources=[OneRequestEngine()])
    try:

        def scrape() -> dict | None:
            text = get(f"http://127.0.0.1:{port}/metrics")[1]
            families = {f.name: f for f in text_string_to_metric_families(text)}
            ttft = families.get("tessera_request_ttft_seconds")
            return (
                families
                if ttft and any(s.name.endswith("_count") and s.value >= 2 for s in ttft.samples)
                else None
            )

        families = wait_for(scrape, "two TTFT observations")
        ttft = families["tessera_request_ttft_seconds"]
        assert ttft.type == "histogram"
        buckets = {s.labels["le"]: s.value for s in ttft.samples if s.name.endswith("_bucket")}
        count = next(s.value for s in ttft.samples if s.name.endswith("_count"))
        assert buckets["0.1"] == 0 and buckets["0.2"] == count  # every sample is 0.12 s
        [requests] = families["tessera_requests"].samples
        assert requests.name == "tessera_requests_total" and requests.value == 7
        assert (
            requests.labels["role"] == "prefill" and requests.labels["instance_id"] == "prefill-0"
        )
    finally:
        agent.stop(grace_s=0)
        metrics.close()


def test_control_requests_are_counted(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    backend = SimBackend(device_count=1, node_name="node-c")
    metrics = AgentMetrics("node-c", backend.devices())
    agent = AgentServer(
        backend,
        node_name="node-c",
        listen="127.0.0.1:0",
        tls=certs.server_tls(),
        on_control=metrics.count_control,
    )
    agent.start()
    try:
        with certs.client_tls().channel(f"127.0.0.1:{agent.port}") as channel:
            client = AgentClient(channel)
            client.set_power_limit("SIM-node-c-0", 400)
            with pytest.raises(Exception):  # noqa: B017 - refused with INVALID_ARGUMENT
                client.set_power_limit("SIM-node-c-0", 40)
        counts = {
            (s.labels["rpc"], s.labels["code"]): s.value
            for f in text_string_to_metric_families(metrics_text(metrics))
            if f.name == "tessera_agent_control_requests"
            for s in f.samples
            if s.name.endswith("_total")
        }
        assert counts == {("SetPowerLimit", "OK"): 1.0, ("SetPowerLimit", "INVALID_ARGUMENT"): 1.0}
    finally:
        agent.stop(grace_s=0)


def metrics_text(metrics: AgentMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_healthz_follows_the_agent(exported: list) -> None:
    agent, _, port = exported[0]
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and body.startswith("ok")
    agent.stop(grace_s=0)
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and "stopping" in body


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_real_prometheus_scrapes_two_agents_and_answers_each_devices_power(
    exported: list, tmp_path: Path
) -> None:
    targets = [f"127.0.0.1:{port}" for _, _, port in exported]
    scrape = [{"job_name": "tessera-agent", "static_configs": [{"targets": targets}]}]
    with running_prometheus(scrape, tmp_path) as prometheus:
        query = urllib.parse.urlencode({"query": "tessera_device_power_watts"})

        def all_devices() -> list | None:
            prometheus.check_alive()
            try:
                status, body = get(f"http://127.0.0.1:{prometheus.port}/api/v1/query?{query}")
            except (urllib.error.URLError, ConnectionError):
                return None  # not listening yet
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return result if len(result) == 4 else None

        result = wait_for(
            all_devices, "4 device power series in Prometheus", timeout_s=60, every_s=0.25
        )
        got = {(r["metric"]["node"], r["metric"]["uuid"]): float(r["value"][1]) for r in result}
        expected = {
            (agent.node_name, d.uuid): agent.backend.operating_point(d.uuid).power_w
            for agent, _, _ in exported
            for d in agent.backend.devices()
        }
        assert got == pytest.approx(expected)
        assert {r["metric"]["instance"] for r in result} == set(targets)
