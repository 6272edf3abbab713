"""The engine's logits against Hugging Face transformers' LlamaForCausalLM (CPU, float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, reference_logits, write_checkpoint
from tessera.agents.engine import (
    Engine,
    EngineConfig,
    LlamaConfig,
    SamplingParams,
    SchedulerConfig,
    UnsupportedModelError,
)

LENGTHS = [3, 5, 9, 13, 17]
NEW_TOKENS = 17  # the prefill's token, then 16 decode steps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, write_checkpoint(folder)


def make_engine(folder: Path, budget: int = 256, blocks: int = 128, **kwargs: Any) -> Engine:
    return Engine.from_pretrained(
        folder,
        EngineConfig(
            block_size=4,
            num_kv_blocks=blocks,
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, **kwargs),
        ),
    )


def logits_params() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)


def assert_matches_reference(model: Any, prompt: list[int], output: list[int], logits: Any) -> None:
    ours = torch.stack(logits)
    assert ours.shape == (NEW_TOKENS, 128)
    # Teacher-forced: row i is the distribution the i-th generated token was drawn from.
    ref = reference_logits(model, prompt + output[:-1])[len(prompt) - 1 :]
    scale = ref.abs().max().item()
    assert scale > 1.0, "logits too flat to tell implementations apart"
    assert (ours - ref).abs().max().item() < 1e-4 * scale
    assert output == ref.argmax(-1).tolist()


def test_batched_prefill_and_decode_match_transformers(checkpoint: tuple[Path, Any]) -> None:
    folder, model = checkpoint
    engine = make_engine(folder)
    prompts = random_prompts(LENGTHS, 128)
    ids = [engine.add_request(p, logits_params()) for p in prompts]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    # One step prefills all five prompts together, then each step decodes all five at once.
    assert steps == NEW_TOKENS
    for request_id, prompt in zip(ids, prompts, strict=True):
        done = engine.pop_finished(request_id)
        assert len(done.output_token_ids) == NEW_TOKENS
        # 3 + 17 tokens and up cross several 4-token blocks.
        assert_matches_reference(model, prompt, done.output_token_ids, done.logits)


def test_chunked_prefill_matches_whole_prefill(checkpoint: tuple[Path, Any]) -> None:
    folder, model = checkpoint
    prompts = random_prompts([23, 6, 14], 128, seed=2)
    whole = make_engine(folder).generate(prompts, logits_params())
    chunked_engine = make_engine(folder, budget=7)
    budgets: list[int] = []
    partial_chunks = 0
    schedule = chunked_engine.scheduler.schedule

    def observed() -> Any:
        nonlocal partial_chunks
        plan = schedule()
        budgets.append(plan.num_tokens)
        partial_chunks += sum(count < seq.num_pending_tokens for seq, count in plan.prefills)
        return plan

    chunked_engine.scheduler.schedule = observed  # type: ignore[method-assign]
    chunked = chunked_engine.generate(prompts, logits_params())
    assert max(budgets) <= 7
    assert partial_chunks >= 3  # the 23-token prompt alone needs four chunks
    for a, b, prompt in zip(whole, chunked, prompts, strict=True):
        assert a.output_token_ids == b.output_token_ids
        assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max().item() < 1e-4
        assert_matches_reference(model, prompt, b.output_token_ids, b.logits)


def test_preemption_recomputes_to_the_same_tokens(checkpoint: tuple[Path, Any]) -> None:
    folder, _ = checkpoint
    prompts = random_prompts([9, 11, 7, 10], 128, seed=3)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    roomy = make_engine(folder).generate(prompts, params)
    # 16 blocks of 4 tokens hold 64 tokens; four requests of ~21 tokens need ~24 blocks.
    tight = make_engine(folder, blocks=17)
    done = tight.generate(prompts, params)
    assert tight.stats_snapshot().preemptions_total > 0
    assert [d.output_token_ids for d in done] == [r.output_token_ids for r in roomy]
    assert tight.kv_cache.allocator.num_used == 0


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    model = write_checkpoint(tmp_path, seed=5, rope_parameters=rope)
    config = LlamaConfig.from_pretrained(tmp_path)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    engine = make_engine(tmp_path)
    [prompt] = random_prompts([60], 128, seed=4)
    [done] = engine.generate([prompt], logits_params())
    assert_matches_reference(model, prompt, done.output_token_ids, done.logits)


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "mistral"},
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
        {"hidden_act": "gelu"},
        {"attention_bias": True},
    ],
)
def test_unsupported_configs_are_refused(change: dict[str, Any]) -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    with pytest.raises(UnsupportedModelError):
        LlamaConfig.from_dict({**base, **change})
