"""Bad sampling parameters are refused by name, and a request whose step fails fails alone.

A NaN temperature used to pass SamplingParams and add_request; the step that sampled it raised,
after every request in the batch had been advanced past the token it never got, so the engine
raised on every step after, for every request, even once the bad one was aborted.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, rebuilt_package, write_checkpoint
from tessera.agents.engine import (
    Engine,
    EngineConfig,
    EngineRole,
    FinishReason,
    InvalidSamplingParamsError,
    KVPackage,
    SamplingParams,
    SchedulerConfig,
)
from tessera.agents.engine.sampling import SamplingFailure, sample

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-bad-input")
    write_checkpoint(path, seed=31)
    return path


def make_engine(folder: Path, role: EngineRole = EngineRole.COLOCATED, blocks: int = 33) -> Engine:
    config = EngineConfig(
        role=role,
        block_size=4,
        num_kv_blocks=blocks,
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
    )
    return Engine.from_pretrained(folder, config)


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("temperature", math.nan, ">= 0"),
        ("temperature", math.inf, ">= 0"),
        ("temperature", -0.5, ">= 0"),
        ("temperature", "0.7", ">= 0"),
        ("top_p", math.nan, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", 0, ">= 1"),
        ("top_k", 2.5, ">= 1"),
        ("top_k", True, ">= 1"),
        ("max_new_tokens", 0, ">= 1"),
        ("max_new_tokens", 3.0, ">= 1"),
        ("max_new_tokens", math.nan, ">= 1"),
        ("seed", 1.5, "integer"),
        ("seed", "7", "integer"),
        ("stop_token_ids", (-1,), ">= 0"),
        ("stop_token_ids", ("a",), ">= 0"),
        ("ignore_eos", "no", "true or false"),
    ],
)
def test_bad_sampling_parameters_are_refused_by_name(name: str, value: Any, valid: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} .*{re.escape(valid)}") as raised:
        SamplingParams(**{name: value})
    assert isinstance(raised.value, InvalidSamplingParamsError)
    assert raised.value.field == name
    with pytest.raises(InvalidSamplingParamsError, match=name):
        SamplingParams.from_dict({**SamplingParams().to_dict(), name: value})


def test_unknown_sampling_fields_are_refused_by_name() -> None:
    with pytest.raises(InvalidSamplingParamsError, match=r"^temprature is not a sampling"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_nan_temperature_is_refused_and_the_engine_keeps_serving(folder: Path) -> None:
    prompts = random_prompts([7, 5], 128, seed=4)
    expected = make_engine(folder).generate(prompts, SEEDED)
    e = make_engine(folder)
    first = e.add_request(prompts[0], SEEDED)
    e.step()
    with pytest.raises(InvalidSamplingParamsError, match="temperature"):
        e.add_request(prompts[1], SamplingParams(temperature=math.nan))
    second = e.add_request(prompts[1], SEEDED)
    e.run_until_idle(max_steps=50)
    assert e.pop_finished(first).output_token_ids == expected[0].output_token_ids
    assert e.pop_finished(second).output_token_ids == expected[1].output_token_ids
    assert e.kv_cache.allocator.num_free == e.kv_cache.allocator.capacity


@pytest.mark.parametrize("bad_token", [1.5, True, -1, 128])
def test_bad_prompt_token_ids_are_refused(folder: Path, bad_token: Any) -> None:
    e = make_engine(folder)
    with pytest.raises(ValueError, match=r"prompt_token_ids .*\[0, 128\)"):
        e.add_request([5, bad_token, 7], GREEDY)
    assert not e.requests and not e.has_unfinished()


def test_a_tiny_temperature_draws_the_argmax() -> None:
    """1e-300 is a valid temperature; logits / 1e-300 overflowed to inf, softmax gave NaN and
    the draw raised."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1e-300, seed=row) for row in range(3)]
    generator = torch.Generator().manual_seed(0)
    assert sample(logits, params, [0, 1, 2], generator) == logits.argmax(dim=-1).tolist()


def test_a_row_with_nan_logits_fails_alone() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    logits[1, 17] = math.nan
    generator = torch.Generator().manual_seed(0)
    for params in ([SEEDED] * 3, [GREEDY] * 3):
        drawn = sample(logits, params, [0, 0, 0], generator)
        assert isinstance(drawn[1], SamplingFailure) and "not finite" in drawn[1].reason
        assert all(isinstance(token, int) for token in (drawn[0], drawn[2]))
    greedy = sample(logits, [GREEDY] * 3, [0, 0, 0], generator)
    argmax = logits.argmax(dim=-1).tolist()
    assert (greedy[0], greedy[2]) == (argmax[0], argmax[2])


def _prefilled(folder: Path, prompts: list[list[int]], params: SamplingParams) -> list[KVPackage]:
    prefill = make_engine(folder, EngineRole.PREFILL)
    ids = [prefill.add_request(prompt, params) for prompt in prompts]
    prefill.run_until_idle()
    return [prefill.export_kv(request_id) for request_id in ids]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_whose_step_fails_is_failed_alone_and_frees_its_blocks(
    folder: Path, params: SamplingParams
) -> None:
    """The bad condition is real: KV whose values are NaN (a faulty peer; the checksums match
    the bytes it sent) gives NaN attention and NaN logits for that request only. Greedy used to
    emit garbage tokens from them and sampling raised for the whole batch."""
    prompts = random_prompts([9, 6, 11], 128, seed=6)
    expected = make_engine(folder).generate(prompts, params)
    packages = _prefilled(folder, prompts, params)
    poisoned = rebuilt_package(packages[1], blocks=torch.full_like(packages[1].blocks, math.nan))
    decode = make_engine(folder, EngineRole.DECODE)
    free_before = decode.kv_cache.allocator.num_free
    for package in (packages[0], poisoned, packages[2]):
        decode.import_kv(package)
    outputs = decode.step()
    failed = [out for out in outputs if out.finish_reason is FinishReason.ERROR]
    assert [out.request_id for out in failed] == [poisoned.request_id]
    assert failed[0].finished and failed[0].error and "not finite" in failed[0].error
    assert poisoned.request_id not in {s.request_id for s in decode.scheduler.running}
    decode.run_until_idle(max_steps=50)
    done = decode.pop_finished(poisoned.request_id)
    assert done.finish_reason is FinishReason.ERROR and done.error == failed[0].error
    for index in (0, 2):
        ours = decode.pop_finished(packages[index].request_id)
        assert ours.finish_reason is FinishReason.LENGTH
        assert ours.output_token_ids == expected[index].output_token_ids
    assert decode.kv_cache.allocator.num_free == free_before


def test_a_step_that_raises_changes_no_request(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampling used to run after every request in the batch had been advanced: when it raised,
    they were left with no pending token and every later step failed. No real input makes the
    sampler raise any more (bad rows fail alone), so the fault is injected, once."""
    import tessera.agents.engine.engine as engine_module

    prompts = random_prompts([7, 5, 9], 128, seed=8)
    expected = make_engine(folder).generate(prompts, SEEDED)
    e = make_engine(folder)
    ids = [e.add_request(prompt, SEEDED) for prompt in prompts]
    e.step()
    e.step()
    real_sample = engine_module.sample

    def failing(*args: Any) -> Any:
        monkeypatch.setattr(engine_module, "sample", real_sample)
        raise RuntimeError("device fault while sampling")

    monkeypatch.setattr(engine_module, "sample", failing)
    with pytest.raises(RuntimeError, match="device fault"):
        e.step()
    e.run_until_idle(max_steps=50)
    for request_id, reference in zip(ids, expected, strict=True):
        assert e.pop_finished(request_id).output_token_ids == reference.output_token_ids
    assert e.kv_cache.allocator.num_free == e.kv_cache.allocator.capacity
