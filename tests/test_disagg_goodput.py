"""bench/disagg_goodput.py's pure parts: a client's records to TTFT / TPOT / attainment, goodput
interpolated between rates, the requests drawn per rate, the KV blocks of a memory share, and
the report's simulator call (one prefill and one decode replica sharing one H200). The GPU run
itself is the bench's business; its CPU smoke (`run --smoke`) starts real processes and is not
run here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import disagg_goodput as bench  # noqa: E402
from poisson_client import Record  # noqa: E402
from serving_validation import Slo  # noqa: E402

SLO = Slo(ttft_s=0.5, tpot_s=0.05, target=0.9)


def record(index: int, ttft_s: float, tpot_s: float, tokens: int = 11) -> Record:
    """A finished request that arrived at `index` seconds."""
    first = index + ttft_s
    return Record(
        index,
        float(index),
        100,
        tokens,
        index + 0.001,
        first,
        first + tpot_s * (tokens - 1),
        tokens,
    )


def test_records_give_ttft_from_the_scheduled_arrival_and_tpot_over_the_later_tokens() -> None:
    finished = record(3, ttft_s=0.2, tpot_s=0.03)
    cut = Record(4, 4.0, 100, 11, 4.0, 4.1, math.inf, 5, "cut at the point's deadline")
    short = Record(5, 5.0, 100, 11, 5.0, 5.1, 5.5, 7)  # ended before its tokens: missed
    never = Record(6, 6.0, 100, 11, error="HTTP 502")
    ttft, tpot = bench.engine_latencies([finished, cut, short, never])
    assert ttft[0] == pytest.approx(0.2) and tpot[0] == pytest.approx(0.03)
    assert ttft[1] == pytest.approx(0.1) and math.isinf(tpot[1])
    assert math.isinf(tpot[2]) and math.isinf(ttft[3]) and math.isinf(tpot[3])
    row = bench.point_row(SLO, 1.0, (ttft, tpot), (ttft, tpot))
    assert row["engine_attainment"] == row["sim_attainment"] == 0.25
    assert row["engine_p50_ttft_ms"] == pytest.approx(150.0)


def test_a_record_survives_json_with_its_infinities() -> None:
    cut = Record(1, 0.5, 10, 4, 0.5, 0.7, math.inf, 2, "cut")
    data = cut.as_dict()
    assert data["finish_s"] is None
    assert Record.from_dict(data) == cut


def rate_records(meeting: int, total: int = 20) -> list[Record]:
    """`meeting` of `total` requests within both SLOs, the rest late to their first token."""
    return [record(i, 0.1 if i < meeting else 0.9, 0.02) for i in range(total)]


def test_goodput_is_interpolated_where_attainment_falls_through_the_target() -> None:
    rows = []
    for rate, engine_meeting, sim_meeting in ((1.0, 20, 20), (2.0, 19, 20), (3.0, 10, 17)):
        engine = bench.engine_latencies(rate_records(engine_meeting))
        sim = bench.engine_latencies(rate_records(sim_meeting))
        rows.append(bench.point_row(SLO, rate, engine, sim))
    assert [r["engine_attainment"] for r in rows] == [1.0, 0.95, 0.5]
    found = bench.goodputs(rows, SLO.target)
    assert found["engine"] == pytest.approx(2 + 0.05 / 0.45)
    assert found["sim"] == pytest.approx(2 + 0.1 / 0.15)
    assert found["sim_over_engine"] == pytest.approx(found["sim"] / found["engine"])
    below = [{**r, "engine_attainment": 0.5} for r in rows]
    assert bench.goodputs(below, SLO.target)["engine"] is None  # misses even the lowest rate
    assert bench.goodputs(below, SLO.target)["sim_over_engine"] is None


def test_every_rate_serves_the_same_requests_sooner() -> None:
    prompts = np.arange(1, 1001, dtype=np.int64)
    outputs = prompts + 5
    slow = bench.draw_requests(prompts, outputs, 5.0, 30.0, seed=0)
    fast = bench.draw_requests(prompts, outputs, 10.0, 30.0, seed=0)
    assert 100 <= len(slow[0]) <= 200 and 240 <= len(fast[0]) <= 360
    shared = len(slow[0])
    assert fast[1][:shared] == slow[1] and fast[2][:shared] == slow[2]
    assert np.allclose(np.array(fast[0][:shared]) * 2, slow[0])
    assert all(0 <= a < 30.0 for a in fast[0]) and fast[0] == sorted(fast[0])
    assert all(o == p + 5 for p, o in zip(fast[1], fast[2], strict=True))  # rows stay whole
    assert bench.draw_requests(prompts, outputs, 10.0, 30.0, seed=1)[1] != fast[1]


def test_trace_lengths_fit_the_context() -> None:
    prompts, outputs = bench.trace_lengths(bench.GPU_LAYOUT, bench.BUNDLED_TRACE)
    assert len(prompts) > 2_000 and (prompts + outputs).max() <= 8192
    small_prompts, small_outputs = bench.trace_lengths(bench.SMOKE_LAYOUT, bench.BUNDLED_TRACE)
    assert (small_prompts + small_outputs).max() <= 512 and small_outputs.min() >= 2


LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
}


def test_a_memory_share_holds_the_weights_the_reserve_and_the_rest_as_kv_blocks() -> None:
    assert bench.llama_weight_bytes(LLAMA3_8B) == 2 * 8_030_261_248  # Llama-3-8B's parameters
    assert bench.kv_bytes_per_token(LLAMA3_8B) == 128 * 1024
    total = 140 * 2**30
    blocks = bench.kv_blocks_for_share(total, 0.45, LLAMA3_8B)
    left = 0.45 * total - bench.llama_weight_bytes(LLAMA3_8B) - bench.ACTIVATION_RESERVE_BYTES
    assert blocks == int(left // (2 * 2**20))
    assert bench.kv_blocks_for_share(total, 0.9, LLAMA3_8B) > 2 * blocks
    with pytest.raises(ValueError, match=r"memory fraction 0\.1"):
        bench.kv_blocks_for_share(total, 0.1, LLAMA3_8B)


def test_the_report_simulates_the_runs_requests_on_one_shared_h200() -> None:
    pytest.importorskip("pydantic")
    spec, accelerator = bench.deployment_inputs()
    prompts, outputs = bench.trace_lengths(bench.GPU_LAYOUT, bench.BUNDLED_TRACE)
    scheduler = {
        "max_num_seqs": 256,
        "max_num_batched_tokens": 2048,
        "enable_chunked_prefill": True,
    }
    tokens = {"prefill": 300_000, "decode": 300_000}

    def simulated(rate: float) -> float:
        arrival, p, o = bench.draw_requests(prompts, outputs, rate, 10.0, seed=0)
        workload = bench.workload_of(arrival, p, o, 10.0)
        result = bench.simulate_shared(spec, accelerator, workload, tokens, scheduler)
        ttft, _ = bench.sim_latencies_of(result)
        assert len(ttft) == len(arrival) and np.isfinite(ttft).all()
        return float(np.median(ttft))

    light, heavy = simulated(1.0), simulated(40.0)
    assert light < 0.5 < heavy  # one shared GPU cannot prefill 40 chat prompts a second in time


def test_probes_split_a_points_cpu_by_thread_per_token_and_give_the_servers_tpot() -> None:
    import os

    import serving_probes

    before = {
        "decode": {
            "pid": 10,
            "cpu": {10: 1.0, 11: 5.0, 12: 0.5},
            "samples": {
                "vllm:request_time_per_output_token_seconds_sum": 1.0,
                "vllm:request_time_per_output_token_seconds_count": 10.0,
            },
        },
        "router": {"pid": 20, "cpu": {20: 2.0}, "samples": {}},
    }
    after = {
        "decode": {
            "pid": 10,
            "cpu": {10: 3.0, 11: 9.0, 12: 0.7, 13: 0.3},  # thread 13 started during the point
            "samples": {
                "vllm:request_time_per_output_token_seconds_sum": 1.6,
                "vllm:request_time_per_output_token_seconds_count": 40.0,
            },
        },
        "router": {"pid": 20, "cpu": {20: 3.0}, "samples": {}},
    }
    found = serving_probes.difference(before, after, tokens=10_000)
    decode = found["decode"]
    assert decode["event_loop_cpu_us_per_token"] == 200.0
    assert decode["busiest_thread_cpu_us_per_token"] == 400.0
    assert decode["other_threads_cpu_us_per_token"] == pytest.approx(50.0)
    assert decode["server_tpot_mean_ms"] == 20.0  # 0.6 s over 30 requests
    assert found["router"]["event_loop_cpu_us_per_token"] == 100.0
    assert "server_tpot_mean_ms" not in found["router"]
    mine = serving_probes.thread_cpu_s(os.getpid())
    assert os.getpid() in mine and mine[os.getpid()] > 0
    assert serving_probes.thread_cpu_s(2**22 + 7) == {}  # past pid_max: no such process
