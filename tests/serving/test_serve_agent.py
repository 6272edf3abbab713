"""The node agent reads a running `tessera serve` (its HTTP instance source): the engine's load
and latencies join the agent's telemetry, which the operator's collector reads."""

from __future__ import annotations

import queue

import httpx2 as httpx
import pytest
from agent_support import start_sim_agent, wait_for
from click.testing import CliRunner
from conftest import SERVED_NAME, ServerProcess
from tessera.agents.engine_source import HttpInstanceSource, parse_instance_stats
from tessera.agents.sampler import Snapshot

from tessera.cli import main


def test_the_agents_telemetry_carries_the_servers_load_and_latencies(
    server: ServerProcess,
) -> None:
    source = HttpInstanceSource(server.base_url)
    source.instance_stats()  # drain what earlier tests left
    agent = start_sim_agent("node-serve", sources=[source], interval_s=0.05)
    rounds: queue.Queue[Snapshot] = queue.Queue()
    agent.sampler.add_listener(rounds.put)
    try:
        first = wait_for(lambda: rounds.get(timeout=5), "a telemetry round").instances
        assert [i.model for i in first] == [SERVED_NAME]
        completed_before = first[0].requests_completed_total
        for _ in range(3):
            response = httpx.post(
                f"{server.base_url}/v1/completions",
                json={"prompt": "Hello there", "max_tokens": 5, "ignore_eos": True},
                timeout=30,
            )
            assert response.status_code == 200
        ttft: list[float] = []

        def all_three() -> bool:
            instance = rounds.get(timeout=5).instances[0]
            ttft.extend(instance.ttft_samples_s)
            return instance.requests_completed_total - completed_before == 3 and len(ttft) >= 3

        wait_for(all_three, "three requests in the agent's telemetry", timeout_s=20)
        instance = rounds.get(timeout=5).instances[0]
        assert instance.role == "colocated" and instance.instance_id
        assert instance.kv_blocks_used + instance.kv_blocks_free > 0
        assert len(ttft) == 3 and all(0 < s < 10 for s in ttft)  # each sample handed out once
    finally:
        agent.stop()


def test_an_engine_that_does_not_answer_contributes_nothing() -> None:
    assert HttpInstanceSource("http://127.0.0.1:9", timeout_s=0.2).instance_stats() == []


def test_malformed_instance_stats_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        parse_instance_stats([1, 2])
    with pytest.raises(ValueError, match="ttft_samples_s"):
        parse_instance_stats({"instance_id": "a", "model": "m", "role": "r", "ttft_samples_s": 3})
    with pytest.raises(ValueError, match="instance stats"):
        parse_instance_stats({"model": "m"})
    stats = parse_instance_stats({"instance_id": "a", "model": "m", "role": "r", "new": 1})
    assert (stats.instance_id, stats.queue_length) == ("a", 0)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h:1", "http://h:1/v1"])
def test_the_agent_refuses_an_engine_url_that_is_not_one(url: str) -> None:
    result = CliRunner().invoke(main, ["agent", "--backend=sim", f"--engine-url={url}"])
    assert result.exit_code == 2
    assert "--engine-url" in result.stderr
