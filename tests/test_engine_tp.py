"""Tensor parallelism in the engine (CPU, gloo): TP2 in two rank processes against TP1.

The tiny checkpoint has a vocabulary of 127, which two ranks split unevenly (64 + 63 rows of
the LM head), so the padded logits gather is exercised too. Prompts are chunked (a 16-token
budget) so that steps mix decode tokens with prefill chunks that attend to cached blocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    process_running,
    random_prompts,
    running_tensor_parallel,
    wait_until,
    write_checkpoint,
)
from tessera.agents.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig
from tessera.agents.engine.config import LlamaConfig, TensorParallelSizeError
from tessera.agents.engine.parallel import TensorParallelShard
from tessera.agents.engine.request import RequestOutput
from tessera.agents.engine.tp_engine import (
    EngineDeadError,
    TensorParallelEngine,
    start_tensor_parallel_engine,
)
from tessera.agents.engine.weights import load_llama_weights

VOCAB = 127
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-tp")
    write_checkpoint(path, vocab_size=VOCAB)
    return path


def engine_config() -> EngineConfig:
    return EngineConfig(
        device="cpu",
        block_size=4,
        num_kv_blocks=96,
        scheduler=SchedulerConfig(max_num_batched_tokens=16),
    )


@pytest.fixture()
def tp2(folder: Path) -> Iterator[TensorParallelEngine]:
    with running_tensor_parallel(folder, engine_config(), 2) as engine:
        yield engine


def run_to_end(engine: Any, prompts: list[list[int]], params: SamplingParams) -> tuple[Any, int]:
    """Step `engine` (an Engine or its TP handle) until idle; the completions and step count."""
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    steps = 0
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
        steps += 1
    assert {o.request_id for o in outputs if o.finished} == set(ids)
    return [engine.pop_finished(request_id) for request_id in ids], steps


def test_tp2_matches_tp1_tokens_and_logits(folder: Path, tp2: TensorParallelEngine) -> None:
    prompts = random_prompts([3, 9, 17, 30], VOCAB, seed=3)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, return_logits=True)
    reference, reference_steps = run_to_end(
        Engine.from_pretrained(folder, engine_config()), prompts, params
    )
    ours, steps = run_to_end(tp2, prompts, params)
    # The same schedule ran: rank 0's scheduler is the single-device one.
    assert steps == reference_steps > 12
    for ref, got in zip(reference, ours, strict=True):
        assert len(got.output_token_ids) == 12
        assert got.output_token_ids == ref.output_token_ids
        ref_logits, got_logits = torch.stack(ref.logits), torch.stack(got.logits)
        assert got_logits.shape == (12, VOCAB)
        scale = ref_logits.abs().max().item()
        assert scale > 1.0, "logits too flat to tell the shards apart"
        assert (got_logits - ref_logits).abs().max().item() < 1e-4 * scale
    # Each rank holds half the KV heads (2 -> 1) of the cache's 96 blocks.
    assert tp2.info.kv_cache_shape == (2, 2, 96, 4, 1, 16)
    assert not tp2.has_unfinished() and tp2.scheduler.num_waiting == 0
    assert tp2.stats_snapshot().kv_blocks_used == 0


def test_engine_errors_cross_to_the_caller_and_leave_it_serving(
    tp2: TensorParallelEngine,
) -> None:
    with pytest.raises(ValueError, match=r"prompt_token_ids holds ids outside the vocabulary"):
        tp2.add_request([1, VOCAB + 5])
    with pytest.raises(KeyError, match="no request 'nope'"):
        tp2.pop_finished("nope")
    tp2.add_request([5, 6, 7], SamplingParams(max_new_tokens=3), request_id="a")
    assert tp2.has_unfinished() and tp2.scheduler.num_waiting == 1
    with pytest.raises(ValueError, match="already in the engine"):
        tp2.add_request([5], request_id="a")
    tp2.run_until_idle()
    assert len(tp2.pop_finished("a").output_token_ids) == 3


def test_shards_are_slices_of_the_checkpoint(folder: Path) -> None:
    config = LlamaConfig.from_pretrained(folder)
    full = load_llama_weights(folder, config, dtype=torch.float32)
    shards = [
        load_llama_weights(folder, config, dtype=torch.float32, shard=TensorParallelShard(r, 2))
        for r in range(2)
    ]
    half = config.tensor_parallel_shard(2)
    q, kv = config.q_size, config.kv_size
    for rank, shard in enumerate(shards):
        layer, whole = shard.layers[1], full.layers[1]
        assert layer.qkv.shape == (half.q_size + 2 * half.kv_size, config.hidden_size)
        qs, ks = (
            slice(rank * q // 2, (rank + 1) * q // 2),
            slice(rank * kv // 2, (rank + 1) * kv // 2),
        )
        expected_qkv = torch.cat(
            [whole.qkv[:q][qs], whole.qkv[q : q + kv][ks], whole.qkv[q + kv :][ks]]
        )
        assert torch.equal(layer.qkv, expected_qkv)
        assert torch.equal(layer.o, whole.o[:, qs])
        inter = config.intermediate_size
        ms = slice(rank * inter // 2, (rank + 1) * inter // 2)
        assert torch.equal(
            layer.gate_up, torch.cat([whole.gate_up[:inter][ms], whole.gate_up[inter:][ms]])
        )
        assert torch.equal(layer.down, whole.down[:, ms])
        assert torch.equal(shard.embed, full.embed)
    # 127 rows of LM head: 64 on rank 0, 63 on rank 1, together the whole.
    assert [s.lm_head.shape[0] for s in shards] == [64, 63]
    assert torch.equal(torch.cat([s.lm_head for s in shards]), full.lm_head)


@pytest.mark.parametrize(
    ("size", "field"), [(3, "num_attention_heads"), (4, "num_key_value_heads")]
)
def test_a_degree_that_does_not_divide_the_heads_is_refused_by_name(
    folder: Path, size: int, field: str
) -> None:
    started = time.monotonic()
    with pytest.raises(TensorParallelSizeError) as caught:
        start_tensor_parallel_engine(folder, engine_config(), size)
    message = str(caught.value)
    assert "\n" not in message
    assert f"tensor_parallel_size {size} does not divide {field}" in message
    assert message.endswith("valid sizes: 1, 2")
    assert time.monotonic() - started < 2.0, "refused before any rank process starts"


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_rank_ends_the_others(folder: Path, victim: int) -> None:
    deaths: list[str] = []
    engine = start_tensor_parallel_engine(folder, engine_config(), 2, on_death=deaths.append)
    try:
        engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=50, ignore_eos=True))
        engine.step()
        pids = engine.info.pids
        os.kill(pids[victim], signal.SIGKILL)
        other = pids[1 - victim]
        assert wait_until(lambda: not process_running(other)), f"a rank outlived rank {victim}"
        assert wait_until(lambda: bool(deaths))
        assert deaths == [engine.death]
        assert f"rank {victim}" in deaths[0] and "status -9" in deaths[0]
        assert not engine.has_unfinished()
        with pytest.raises(EngineDeadError, match=f"rank {victim}"):
            engine.step()
    finally:
        engine.close()


def test_a_rank_killed_mid_generation_fails_the_call_naming_it(folder: Path) -> None:
    engine = start_tensor_parallel_engine(folder, engine_config(), 2)
    try:
        outcome: list[BaseException | None] = []
        params = SamplingParams(max_new_tokens=240, ignore_eos=True)

        def generate() -> None:
            try:
                engine.generate(random_prompts([5, 7, 9], VOCAB), params)
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        caller = threading.Thread(target=generate)
        caller.start()
        os.kill(engine.info.pids[1], signal.SIGKILL)
        caller.join(DEADLINE_S)
        assert outcome and isinstance(outcome[0], EngineDeadError), outcome
        assert "rank 1" in str(outcome[0])
        assert wait_until(lambda: not process_running(engine.info.pids[0]))
    finally:
        engine.close()


SUPERVISOR = textwrap.dedent(
    """
    import sys
    from tessera.agents.engine import EngineConfig
    from tessera.agents.engine.tp_engine import start_tensor_parallel_engine

    if __name__ == "__main__":
        config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=32)
        engine = start_tensor_parallel_engine(sys.argv[1], config, 2)
        print(*engine.info.pids, flush=True)
        sys.stdin.read()  # until the test kills this process
    """
)


def test_ranks_end_when_their_supervisor_is_killed(folder: Path, tmp_path: Path) -> None:
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    supervisor = subprocess.Popen(
        [sys.executable, str(script), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    try:
        assert supervisor.stdout is not None
        pids = [int(pid) for pid in supervisor.stdout.readline().split()]
        assert len(pids) == 2 and all(process_running(pid) for pid in pids)
        supervisor.kill()
        supervisor.wait(DEADLINE_S)
        assert wait_until(lambda: not any(process_running(pid) for pid in pids)), "orphaned ranks"
    finally:
        supervisor.kill()
        supervisor.wait(DEADLINE_S)


@pytest.mark.slow
def test_tp_bench_runs_its_smoke_mode_and_writes_every_section(tmp_path: Path) -> None:
    """bench/tp_bench.py on the CPU (gloo, tiny shape): the script the multi-GPU run will use
    runs end to end, and each decode row carries the roofline and the model's prediction."""
    out = tmp_path / "tp_bench.json"
    bench = Path(__file__).resolve().parent.parent / "bench" / "tp_bench.py"
    args = ["--smoke", "--tp", "1,2", "--batches", "2", "--contexts", "20"]
    result = subprocess.run(
        [sys.executable, str(bench), *args, "--prefill-tokens", "24", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["tp"] for r in report["results"]] == [1, 2]
    for degree in report["results"]:
        assert degree["errors"] == {}
        (row,) = degree["decode"]
        assert row["fits"] and row["step_ms"] > 0
        assert row["model_ms"] > 0 and row["roofline_ms"] > 0
        assert degree["prefill"]["model_ms"] > 0
    tp2 = report["results"][1]
    assert tp2["shard"]["lm_head_rows"] == 500 and tp2["step_message_ms"] > 0
    assert set(tp2["allreduce_ms"]) == {"2", "24"}
    assert [(r["tp"], r["batch"]) for r in report["scaling"]] == [(2, 2)]
    assert "model" in result.stdout and "speedup" in result.stdout
