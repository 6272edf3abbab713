"""A real Prometheus (Debian's `prometheus`, on loopback) scrapes `tessera serve` under load and
a node agent; every query of the chart's dashboards must return a series with a value.

The server's target carries `namespace="serving"`, as Kubernetes service discovery would label
a model's pods; the dashboards' `$namespace` and `$model` are filled with the served model's.
"""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from agent_support import start_sim_agent, wait_for
from conftest import SERVED_NAME, ServerProcess
from prometheus_support import PROMETHEUS, running_prometheus
from tessera.agents.metrics import AgentMetrics
from tessera.agents.sim_backend import SimBackend

DASHBOARDS = Path(__file__).resolve().parents[2] / "helm" / "tessera" / "dashboards"
NAMESPACE = "serving"
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus (apt install prometheus)")


ROWS_SCRAPED_ELSEWHERE = {"Power budgets": "tests/test_power_controller.py"}
"""Dashboard rows whose series another process exports (the operator's PowerBudget
controller), each checked against a real Prometheus by the test named."""


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target outside ROWS_SCRAPED_ELSEWHERE, Grafana's
    variables filled in."""
    values = {"namespace": NAMESPACE, "model": SERVED_NAME, "__rate_interval": "15s"}
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
        row = ""
        for panel in panels:
            if panel["type"] == "row":
                row = panel["title"]
            if row in ROWS_SCRAPED_ELSEWHERE:
                continue
            for target in panel.get("targets", []):
                expr = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], target["expr"])
                queries.append((f"{path.name}: {panel['title']} {target['refId']}", expr))
    return queries


@pytest.fixture
def agent_metrics_port() -> Iterator[int]:
    backend = SimBackend(device_count=2, node_name="node-a")
    metrics = AgentMetrics("node-a", backend.devices())
    agent = start_sim_agent("node-a", backend=backend)
    agent.sampler.add_listener(metrics.observe)
    port = metrics.serve("127.0.0.1", 0, healthy=agent.healthy)
    yield port
    metrics.close()
    agent.stop()


@pytest.fixture
def load(server: ServerProcess) -> Iterator[None]:
    """Short completions back to back while the test runs, so every rate has something."""
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                client.post(
                    f"{server.base_url}/v1/completions",
                    json={"prompt": "Hello there", "max_tokens": 6, "ignore_eos": True},
                )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


class NotReadyError(Exception):
    """Prometheus is still starting (503)."""


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    response = httpx.get(url, timeout=10)
    if response.status_code == 503:
        raise NotReadyError(response.text)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def test_every_dashboard_query_returns_a_series_from_a_real_prometheus(
    server: ServerProcess, agent_metrics_port: int, load: None, tmp_path: Path
) -> None:
    serve_target = server.base_url.removeprefix("http://")
    scrape = [
        {
            "job_name": "tessera-serve",
            "static_configs": [{"targets": [serve_target], "labels": {"namespace": NAMESPACE}}],
        },
        {
            "job_name": "tessera-agent",
            "static_configs": [{"targets": [f"127.0.0.1:{agent_metrics_port}"]}],
        },
    ]
    with running_prometheus(scrape, tmp_path) as prometheus:
        web_port = prometheus.port
        queries = dashboard_queries()
        assert len(queries) >= 15
        pending = dict(queries)

        def all_answered() -> bool:
            prometheus.check_alive()
            try:
                for title, expr in list(pending.items()):
                    values = [float(r["value"][1]) for r in query(web_port, expr)]
                    if any(math.isfinite(v) for v in values):
                        del pending[title]
            except (httpx.TransportError, NotReadyError):
                return False  # not listening or not ready yet
            return not pending

        try:
            wait_for(all_answered, "every dashboard query", timeout_s=60, every_s=0.5)
        except AssertionError as error:
            raise AssertionError(f"queries without a series: {pending}") from error
        namespaces = httpx.get(
            f"http://127.0.0.1:{web_port}/api/v1/label/namespace/values",
            params={"match[]": "vllm:num_requests_running"},
        ).json()["data"]
        assert namespaces == [NAMESPACE]
        running = query(web_port, "vllm:num_requests_running")
        assert {r["metric"]["model_name"] for r in running} == {SERVED_NAME}
        assert {r["metric"]["pool"] for r in running} == {"colocated-cpu"}
