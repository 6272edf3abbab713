"""Attention offload (CPU, two processes): the dense layers in the test process, the KV cache
and attention in an attention worker process, exchanged per layer over a socket.

The invariant: the offloaded engine samples exactly the greedy tokens of the colocated engine,
with decode batches split into two pipelined sub-batches and with prompts chunked (a 16-token
budget) so that steps mix decode tokens with prefill chunks over cached blocks; the worker's
decode attention runs on its thread pool with SDPA (head_dim 16) and with the C kernel
(head_dim 32, host_attention.py). KV export from
the offloaded engine and import into a colocated one (and back) moves the worker's blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import process_running, random_prompts, wait_until, write_checkpoint
from tessera.agents.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig
from tessera.agents.engine.attention import AttentionMetadata, consecutive_first_blocks
from tessera.agents.engine.attention_offload import (
    AttentionClient,
    connect,
    offloaded_engine,
    sub_batch_cuts,
)
from tessera.agents.engine.attention_worker import (
    AttentionWorkerError,
    LocalAttentionWorker,
    WorkerSpec,
    start_attention_worker,
)
from tessera.agents.engine.checkpoint_identity import checkpoint_identity
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.weights import load_llama_weights

BLOCKS = 96
BLOCK_SIZE = 4
LENGTHS = [5, 17, 9, 30, 12, 3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-offload")
    write_checkpoint(path, seed=5)
    return path


def engine_config() -> EngineConfig:
    return EngineConfig(
        device="cpu",
        block_size=BLOCK_SIZE,
        num_kv_blocks=BLOCKS,
        scheduler=SchedulerConfig(max_num_batched_tokens=16),
    )


@pytest.fixture()
def worker(folder: Path) -> Iterator[LocalAttentionWorker]:
    spec = WorkerSpec(LlamaConfig.from_pretrained(folder), BLOCKS, BLOCK_SIZE, torch.float32)
    with start_attention_worker(spec) as started:
        yield started


def offloaded(folder: Path, worker: LocalAttentionWorker, sub_batches: int = 2) -> Engine:
    config = LlamaConfig.from_pretrained(folder)
    weights = load_llama_weights(folder, config, device="cpu", dtype=torch.float32)
    client = AttentionClient(connect(worker.address), config, torch.float32, weights.device)
    identity = checkpoint_identity(folder, config)  # as Engine.from_pretrained's
    return offloaded_engine(config, weights, client, engine_config(), sub_batches, identity)


def colocated(folder: Path) -> Engine:
    return Engine.from_pretrained(folder, engine_config())


def test_offloaded_decode_gives_the_colocated_greedy_tokens(
    folder: Path, worker: LocalAttentionWorker
) -> None:
    prompts = random_prompts(LENGTHS, vocab=128, seed=3)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [c.output_token_ids for c in colocated(folder).generate(prompts, params)]
    engine = offloaded(folder, worker)
    assert engine.warm_up().decode_kernel_variants == 0  # no device attention to compile
    got = [c.output_token_ids for c in engine.generate(prompts, params)]
    assert got == expected
    client = engine.model.client  # type: ignore[attr-defined]
    # Every layer of every step went to the worker, decode steps as two sub-batches.
    layers = engine.config.num_hidden_layers
    assert client.times.exchanges > layers * client.times.steps
    stats = client.worker_stats()
    assert stats["steps"] == client.times.steps
    assert float(stats["attention_s"]) > 0  # type: ignore[arg-type]
    assert stats["kernel"] == "sdpa"  # head_dim 16 is outside the C kernel's limits
    client.close()


def test_the_c_kernel_worker_gives_the_colocated_greedy_tokens(tmp_path: Path) -> None:
    """head_dim 32 (hidden 128 over 4 heads): the worker scans with the C kernel."""
    folder = tmp_path / "tiny-llama-d32"
    write_checkpoint(folder, seed=6, hidden_size=128)
    prompts = random_prompts(LENGTHS, vocab=128, seed=4)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = [c.output_token_ids for c in colocated(folder).generate(prompts, params)]
    spec = WorkerSpec(LlamaConfig.from_pretrained(folder), BLOCKS, BLOCK_SIZE, torch.float32)
    with start_attention_worker(spec) as started:
        engine = offloaded(folder, started)
        got = [c.output_token_ids for c in engine.generate(prompts, params)]
        client = engine.model.client  # type: ignore[attr-defined]
        assert client.worker_stats()["kernel"] == "c"
        client.close()
    assert got == expected


def test_one_sub_batch_and_a_second_session_give_the_same_tokens(
    folder: Path, worker: LocalAttentionWorker
) -> None:
    """A worker serves sessions one after another; the rotation does not change tokens."""
    prompts = random_prompts([7, 11, 4], vocab=128, seed=8)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first = offloaded(folder, worker, sub_batches=2)
    two = [c.output_token_ids for c in first.generate(prompts, params)]
    first.model.client.close()  # type: ignore[attr-defined]
    second = offloaded(folder, worker, sub_batches=1)
    one = [c.output_token_ids for c in second.generate(prompts, params)]
    second.model.client.close()  # type: ignore[attr-defined]
    assert one == two == [c.output_token_ids for c in colocated(folder).generate(prompts, params)]


def test_kv_moves_between_an_offloaded_and_a_colocated_engine(
    folder: Path, worker: LocalAttentionWorker
) -> None:
    """Export reads the worker's blocks; import writes them there: tokens continue exactly."""
    prompt = random_prompts([13], vocab=128, seed=9)[0]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = colocated(folder).generate([prompt], params)[0].output_token_ids
    engine = offloaded(folder, worker)
    request = engine.add_request(prompt, params)
    for _ in range(4):
        engine.step()
    package = engine.export_kv(request)
    other = colocated(folder)
    other.import_kv(package)
    for _ in range(3):
        other.step()
    back = other.export_kv(request)
    engine.import_kv(back)
    engine.run_until_idle()
    assert engine.pop_finished(request).output_token_ids == expected
    engine.model.client.close()  # type: ignore[attr-defined]


def test_a_worker_of_another_model_is_refused(folder: Path, tmp_path: Path) -> None:
    other = LlamaConfig.from_pretrained(folder)
    spec = WorkerSpec(
        LlamaConfig(**{**vars(other), "num_hidden_layers": 3}), BLOCKS, BLOCK_SIZE, torch.float32
    )
    with start_attention_worker(spec) as wrong:
        config = LlamaConfig.from_pretrained(folder)
        with pytest.raises(AttentionWorkerError, match="num_layers 3 \\(model: 2\\)"):
            AttentionClient(connect(wrong.address), config, torch.float32, torch.device("cpu"))


def test_a_dead_worker_fails_the_step_and_leaves_no_process(
    folder: Path, worker: LocalAttentionWorker
) -> None:
    engine = offloaded(folder, worker)
    engine.add_request(random_prompts([6], vocab=128)[0], SamplingParams(max_new_tokens=50))
    engine.step()
    worker.process.kill()
    with pytest.raises(AttentionWorkerError, match="gone"):
        for _ in range(5):
            engine.step()
    assert wait_until(lambda: not process_running(worker.pid))


def test_sub_batches_split_decode_rows_and_keep_prefill_steps_whole() -> None:
    decode = AttentionMetadata(slot_mapping=torch.zeros(5, dtype=torch.long), num_decode_tokens=5)
    assert sub_batch_cuts(decode, 5, 2) == [(0, 2), (2, 5)]
    assert sub_batch_cuts(decode, 5, 1) == [(0, 5)]
    single = AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.long), num_decode_tokens=1)
    assert sub_batch_cuts(single, 1, 2) == [(0, 1)]


def test_rows_of_consecutive_blocks_are_read_through_views_and_others_gathered() -> None:
    tables = torch.tensor([[1, 2, 3, 0], [5, 7, 8, 0], [9, 10, 0, 0], [4, 0, 0, 0]])
    # Block size 4: 9 tokens take 3 blocks, 5 take 2; padding past a row's blocks is ignored.
    assert consecutive_first_blocks(tables, [9, 9, 5, 2], 4) == [1, None, 9, 4]
    assert consecutive_first_blocks(tables[:, :1], [3, 3, 3, 3], 4) == [1, 5, 9, 4]
