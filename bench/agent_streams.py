"""Health.Check and GetInfo latency of one node agent while N idle Telemetry.Watch streams are
open: the case that exhausted the old 16-thread gRPC server (issue 11), on the grpc.aio server.

Each stream takes its first snapshot, then idles (one message per ten minutes); then 200
Health.Check and 200 GetInfo calls are timed one after another on the same channel. Simulated
devices, plaintext on 127.0.0.1. Prints the table, saves bench/results/agent_streams.json.

Run: python bench/agent_streams.py [--streams 0,64,256,1000]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent import futures
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.agents.client import AgentClient, insecure_channel
from tessera.agents.server import AgentServer
from tessera.agents.sim_backend import SimBackend
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "agent_streams.json"
CALLS = 200


def percentile_ms(samples_s: list[float], fraction: float) -> float:
    ordered = sorted(samples_s)
    return ordered[max(0, round(fraction * len(ordered)) - 1)] * 1e3


def measure(streams: int) -> dict[str, float]:
    agent = AgentServer(
        SimBackend(device_count=2, node_name="bench"),
        node_name="bench",
        listen="127.0.0.1:0",
        interval_s=0.1,
        max_watch_streams_per_client=streams + 1,
    )
    agent.start()
    channel = insecure_channel(f"127.0.0.1:{agent.port}")
    try:
        telemetry = agent_pb2_grpc.TelemetryStub(channel)
        request = agent_pb2.WatchRequest(min_interval_ms=600_000)
        calls = [telemetry.Watch(request, timeout=600) for _ in range(streams)]
        with futures.ThreadPoolExecutor(max_workers=64) as readers:
            list(readers.map(next, calls))  # every stream has its first snapshot
        health = health_pb2_grpc.HealthStub(channel)
        client = AgentClient(channel, timeout_s=5)
        check_s, info_s = [], []
        for _ in range(CALLS):
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            check_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.info()
            info_s.append(time.perf_counter() - started)
        for call in calls:
            call.cancel()
    finally:
        channel.close()
        agent.stop(grace_s=0)
    return {
        "idle_streams": streams,
        "health_check_p50_ms": percentile_ms(check_s, 0.5),
        "health_check_p99_ms": percentile_ms(check_s, 0.99),
        "get_info_p50_ms": percentile_ms(info_s, 0.5),
        "get_info_p99_ms": percentile_ms(info_s, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="0,64,256,1000", help="comma-separated counts")
    counts = [int(n) for n in parser.parse_args().streams.split(",")]
    rows = [measure(n) for n in counts]
    print(
        f"{'idle streams':>12} {'Check p50':>10} {'Check p99':>10} {'Info p50':>9} {'Info p99':>9}"
    )
    for row in rows:
        print(
            f"{row['idle_streams']:>12} {row['health_check_p50_ms']:>8.2f}ms "
            f"{row['health_check_p99_ms']:>8.2f}ms {row['get_info_p50_ms']:>7.2f}ms "
            f"{row['get_info_p99_ms']:>7.2f}ms"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
