"""Engine metrics (what the node agent reads), stop conditions and sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts, write_checkpoint
from tessera.agents.engine import (
    Engine,
    EngineConfig,
    EngineRole,
    FinishReason,
    SamplingParams,
    SchedulerConfig,
)
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.weights import load_llama_weights


class FakeClock:
    """Advances only when told, so latencies are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-stats")
    write_checkpoint(path, seed=21)
    return path


def engine(folder: Path, clock: FakeClock, role: EngineRole = EngineRole.COLOCATED) -> Engine:
    config = LlamaConfig.from_pretrained(folder)
    weights = load_llama_weights(folder, config, dtype=torch.float32)
    engine_config = EngineConfig(
        role=role,
        block_size=4,
        num_kv_blocks=33,
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32),
    )
    return Engine(config, weights, engine_config, clock=clock)


def test_snapshot_tracks_queue_batch_blocks_and_latency(folder: Path) -> None:
    clock = FakeClock()
    e = engine(folder, clock)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for prompt in random_prompts([6, 5, 9], 128):
        e.add_request(prompt, params)
    snap = e.stats_snapshot()
    assert (snap.queue_length, snap.running_batch, snap.kv_blocks_used) == (3, 0, 0)
    assert snap.kv_blocks_total == 32 and snap.kv_blocks_free == 32
    assert snap.role == "colocated"

    clock.now += 0.5
    e.step()  # max_num_seqs=2: two prompts admitted (6 + 5 tokens), one waits
    snap = e.stats_snapshot()
    assert (snap.queue_length, snap.running_batch) == (1, 2)
    assert snap.kv_blocks_used == 2 + 2
    assert snap.ttft_ms == (500.0, 500.0)
    assert snap.prompt_tokens_total == 11 and snap.generated_tokens_total == 2

    for _ in range(2):
        clock.now += 0.02
        e.step()
    snap = e.stats_snapshot(drain=True)
    assert snap.requests_finished_total == 2
    assert snap.tpot_ms == pytest.approx((20.0, 20.0))
    assert snap.generated_tokens_total == 6
    # 11 prompt and 6 generated tokens in the 0.54 s the engine has run.
    assert snap.generated_tokens_per_s == pytest.approx(6 / 0.54)
    assert snap.prompt_tokens_per_s == pytest.approx(11 / 0.54)
    assert e.stats_snapshot().ttft_ms == ()  # drained
    e.run_until_idle()
    snap = e.stats_snapshot()
    assert (snap.queue_length, snap.running_batch, snap.kv_blocks_used) == (0, 0, 0)
    assert snap.requests_finished_total == 3
    assert dataclasses.is_dataclass(snap)


def test_prefill_role_reports_parked_requests(folder: Path) -> None:
    e = engine(folder, FakeClock(), EngineRole.PREFILL)
    e.add_request(random_prompts([7], 128)[0], SamplingParams(max_new_tokens=4))
    outputs = e.step()
    assert outputs[0].parked and not outputs[0].finished
    snap = e.stats_snapshot()
    assert (snap.parked_requests, snap.running_batch, snap.kv_blocks_used) == (1, 0, 2)
    e.export_kv(outputs[0].request_id)
    snap = e.stats_snapshot()
    assert (snap.parked_requests, snap.kv_blocks_used, snap.kv_exports_total) == (0, 0, 1)


def test_stop_conditions(folder: Path) -> None:
    e = engine(folder, FakeClock())
    [prompt] = random_prompts([8], 128, seed=9)
    [free_run] = e.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert free_run.finish_reason is FinishReason.LENGTH
    assert len(free_run.output_token_ids) == 12
    stop_at = free_run.output_token_ids[4]
    first = free_run.output_token_ids.index(stop_at)
    [stopped] = e.generate(
        [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,))
    )
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.output_token_ids == free_run.output_token_ids[: first + 1]
    # The checkpoint's EOS (id 2) ends a request unless ignore_eos is set.
    e.config = dataclasses.replace(e.config, eos_token_ids=(stop_at,))
    [eos] = e.generate([prompt], SamplingParams(max_new_tokens=12))
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids[-1] == stop_at


def test_sampling_is_seeded_and_temperature_zero_is_greedy(folder: Path) -> None:
    e = engine(folder, FakeClock())
    prompts = random_prompts([6], 128, seed=10)
    greedy = e.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    top1 = e.generate(
        prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_k=1)
    )[0]
    assert top1.output_token_ids == greedy.output_token_ids
    runs = {
        seed: e.generate(
            prompts,
            SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=2.0, seed=seed),
        )[0].output_token_ids
        for seed in (1, 1, 2, 3)
    }
    again = e.generate(
        prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=2.0, seed=1)
    )[0].output_token_ids
    assert again == runs[1]
    assert len({tuple(tokens) for tokens in runs.values()}) > 1
    assert any(tokens != greedy.output_token_ids for tokens in runs.values())
