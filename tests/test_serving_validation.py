"""bench/serving_validation.py: its real-time driver serves every request in each mode on a
tiny CPU engine, and its report simulates exactly the requests the engine served. Timing
itself is the bench's business (it runs on a GPU), never asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from engine_helpers import TINY

ROOT = Path(__file__).resolve().parent.parent

torch = pytest.importorskip("torch")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "serving_validation", ROOT / "bench" / "serving_validation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serving_validation"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def tiny_engine(mode: object) -> object:
    from tessera.agents.engine.config import LlamaConfig
    from tessera.agents.engine.weights import random_llama_weights

    config = LlamaConfig.from_dict({**TINY, "max_position_embeddings": 512})
    weights = random_llama_weights(config, "cpu", torch.float32, seed=0)
    scheduler = bench.engine_scheduler(mode, "h100", config.max_position_embeddings)
    return bench.build_engine(mode, config, weights, kv_blocks=96, scheduler=scheduler)


def served(mode: object, count: int = 12) -> object:
    rng = np.random.default_rng(3)
    arrival = np.sort(rng.uniform(0.0, 0.3, count)).tolist()
    prompts = rng.integers(1, 80, count).tolist()
    outputs = rng.integers(1, 12, count).tolist()
    return bench.Served(mode, 40.0, 0.3, arrival, prompts, outputs)


@pytest.mark.parametrize("mode", ["chunked", "whole", "prefill", "decode"])
def test_every_request_is_served_and_timed_in_order(mode: str) -> None:
    mode_ = bench.Mode(mode)
    engine = tiny_engine(mode_)
    source = bench.kv_source_for(engine, 80)
    driver = bench.RealTimeDriver(engine, mode_, source, drain_s=120.0)
    result = driver.serve(served(mode_))
    arrival = np.array(result.arrival_s)
    first = np.array(result.first_token_s)
    finish = np.array(result.finish_s)
    assert np.isfinite(first).all() and np.isfinite(finish).all()
    assert (first >= arrival).all() and (finish >= first).all()
    assert result.steps > 0
    assert not engine.requests and not engine.has_unfinished()
    if mode_ is bench.Mode.PREFILL:  # a prefill replica stops at the first token
        np.testing.assert_allclose(finish, first)
    else:  # longer outputs take longer after their first token, at least one step each
        long = np.array(result.output_tokens) > 1
        assert (finish[long] > first[long]).all()


def test_a_deadline_leaves_unserved_requests_as_misses() -> None:
    mode = bench.Mode.CHUNKED
    engine = tiny_engine(mode)
    many = bench.Served(mode, 1e4, 0.001, [0.0] * 40, [60] * 40, [200] * 40)
    result = bench.RealTimeDriver(engine, mode, drain_s=0.0).serve(many)
    assert math.isinf(max(result.finish_s))
    assert not engine.requests  # the cut-off requests were taken out of the engine
    ttft, tpot = bench.latencies(mode, *result.arrays())
    assert bench.attainment(mode, bench.Slo(10.0, 10.0, 0.9), ttft, tpot) < 1.0


def test_the_report_simulates_the_served_requests(tmp_path: Path) -> None:
    mode = bench.Mode.CHUNKED
    points = []
    for rate, count in ((2.0, 10), (40.0, 60)):
        result = served(mode, count)
        result.rate_per_s = rate
        result.first_token_s = [a + 0.01 for a in result.arrival_s]
        result.finish_s = [
            a + 0.01 + 0.02 * n for a, n in zip(result.arrival_s, result.output_tokens, strict=True)
        ]
        points.append(result)
    record = {
        "mode": "chunked",
        "device": "cpu",
        "deployment": str(bench.DEFAULT_DEPLOYMENT.relative_to(ROOT)),
        "accelerator_class": "h100",
        "kv_blocks": 4000,
        "block_size": 16,
        "points": [bench.asdict(p) for p in points],
    }
    path = tmp_path / "chunked.json"
    path.write_text(json.dumps(record))
    out = tmp_path / "report.json"
    bench.main(["report", str(path), "--out", str(out)])
    report = json.loads(out.read_text())["modes"]["chunked"]
    assert [p["requests"] for p in report["points"]] == [10, 60]
    assert all(0.0 <= p["sim_attainment"] <= 1.0 for p in report["points"])
    assert all(p["engine_attainment"] == 1.0 for p in report["points"])


def test_each_mode_runs_the_scheduler_its_pool_records() -> None:
    chunked = bench.engine_scheduler(bench.Mode.CHUNKED, "h100", 4096)
    assert chunked == {
        "max_num_seqs": 256,
        "max_num_batched_tokens": 512,
        "enable_chunked_prefill": True,
    }
    for mode in (bench.Mode.WHOLE, bench.Mode.PREFILL, bench.Mode.DECODE):
        whole = bench.engine_scheduler(mode, "h100", 4096)
        assert whole["max_num_batched_tokens"] == 4096 and not whole["enable_chunked_prefill"]


def test_prepare_writes_the_requests_the_engine_serves(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    bench.main(["prepare", "--modes", "chunked", "--duration", "5", "--out", str(out)])
    plan = json.loads(out.read_text())
    assert plan["model"]["num_key_value_heads"] == 40 and plan["kv_capacity_tokens"] > 0
    assert plan["modes"]["chunked"]["scheduler"]["enable_chunked_prefill"]
    points = plan["modes"]["chunked"]["points"]
    rates = [p["rate_per_s"] for p in points]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    goodput = plan["modes"]["chunked"]["sim_goodput"]
    assert rates[0] < goodput < rates[-1]
    for point in points:
        assert len(point["arrival_s"]) == len(point["prompt_tokens"]) > 0
        assert max(point["arrival_s"]) < 5


def test_goodput_is_interpolated_where_attainment_crosses_the_target() -> None:
    assert bench.crossing([(1.0, 1.0), (2.0, 0.8)], 0.9) == pytest.approx(1.5)
    assert bench.crossing([(1.0, 0.5), (2.0, 0.4)], 0.9) is None
    assert bench.crossing([(1.0, 1.0), (2.0, 0.95)], 0.9) == 2.0


def test_the_best_split_balances_prefill_and_decode() -> None:
    per_gpu, x, y = bench.best_split(18.0, 6.0)
    assert (x, y) == (1, 3) and per_gpu == pytest.approx(4.5)
