"""Re-sharding KV on receipt (kv_reshard.py), and KV export/import across TP degrees and dtypes.

The pure functions run on synthetic blocks with 4 KV heads, so that degrees 1, 2 and 4 all
split them; the engine tests run the tiny checkpoint on the CPU: a TP=2 engine (two gloo rank
processes) hands a request to a TP=1 engine and back, and each continuation must be exactly
the colocated greedy tokens; a float32 engine's KV enters a bfloat16 engine as its cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts, running_tensor_parallel, write_checkpoint
from tessera.agents.engine import Engine, EngineConfig, SamplingParams
from tessera.agents.engine.kv_reshard import (
    KVReshardError,
    gather_heads,
    rank_geometry,
    reblock,
    reshard,
    split_heads,
)
from tessera.agents.engine.kv_transfer import (
    KVChecksumError,
    KVGeometry,
    KVPackage,
    KVTransferError,
)
from tessera.agents.engine.tp_engine import TensorParallelEngine

GEOMETRY = KVGeometry("llama:test:0123", 2, 4, 8, 4, "float32")
TOKENS = 10  # 3 blocks of 4 slots, the last one half used


def package(geometry: KVGeometry = GEOMETRY, blocks: torch.Tensor | None = None) -> KVPackage:
    if blocks is None:
        generator = torch.Generator().manual_seed(3)
        shape = (3, *geometry.block_shape)
        blocks = torch.randn(shape, generator=generator).to(geometry.torch_dtype)
    return KVPackage.build(
        request_id="r1",
        geometry=geometry,
        prompt_token_ids=list(range(3, 3 + TOKENS)),
        output_token_ids=[7],
        num_computed_tokens=TOKENS,
        sampling={"max_new_tokens": 4},
        blocks=blocks,
    )


def shards(whole: KVPackage, degree: int) -> list[KVPackage]:
    return [reshard(whole, rank_geometry(whole.geometry, degree, r)) for r in range(degree)]


# ---- pure functions ----------------------------------------------------------------------


def test_tp1_to_2_to_1_round_trips_exactly() -> None:
    whole = package()
    halves = shards(whole, 2)
    assert [p.geometry.kv_head_start for p in halves] == [0, 2]
    assert all(p.geometry.num_kv_heads == 2 and p.geometry.total_kv_heads == 4 for p in halves)
    assert torch.equal(halves[1].blocks, whole.blocks[:, :, :, :, 2:4])
    back = reshard(gather_heads(list(reversed(halves))), GEOMETRY)
    assert back.geometry == GEOMETRY
    assert torch.equal(back.blocks, whole.blocks)


def test_tp2_shards_gather_for_a_tp1_receiver() -> None:
    """Two ranks' own packages (checksummed, as each rank would send its slice)."""
    whole = package()
    sources = [
        package(rank_geometry(GEOMETRY, 2, r), part)
        for r, part in enumerate(split_heads(whole.blocks, 2))
    ]
    tp1 = reshard(gather_heads(sources), GEOMETRY)
    assert torch.equal(tp1.blocks, whole.blocks)
    assert tp1.geometry.tensor_parallel_size == 1


def test_tp1_to_4_splits_whole_heads_in_rank_order() -> None:
    whole = package()
    quarters = shards(whole, 4)
    for rank, part in enumerate(quarters):
        assert torch.equal(part.blocks, whole.blocks[:, :, :, :, rank : rank + 1])
    assert torch.equal(torch.cat([p.blocks for p in quarters], dim=4), whole.blocks)


def test_a_degree_only_relabel_is_no_copy_and_an_equal_layout_is_the_package() -> None:
    whole = package()
    assert reshard(whole, GEOMETRY) is whole
    tp2 = dataclasses.replace(GEOMETRY, tensor_parallel_size=2)
    relabeled = reshard(whole, tp2)
    assert relabeled.geometry == tp2 and relabeled.blocks is whole.blocks
    relabeled.check_compatible(tp2)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("float32", "bfloat16"),
        ("float32", "float16"),
        ("bfloat16", "float16"),
        ("float16", "float32"),
        ("bfloat16", "float32"),
    ],
)
def test_dtype_casts_are_the_torch_cast(source: str, target: str) -> None:
    whole = package(dataclasses.replace(GEOMETRY, dtype=source))
    into = dataclasses.replace(GEOMETRY, dtype=target)
    cast = reshard(whole, into)
    assert cast.blocks.dtype == into.torch_dtype
    assert torch.equal(cast.blocks, whole.blocks.to(into.torch_dtype))
    cast.check_compatible(into)


def test_reblocking_keeps_every_computed_token_and_round_trips() -> None:
    whole = package()
    eight = reshard(whole, dataclasses.replace(GEOMETRY, block_size=8))
    assert eight.num_blocks == 2  # 10 tokens in blocks of 8
    tokens = whole.blocks.permute(1, 2, 0, 3, 4, 5).reshape(2, 2, 12, 4, 8)[:, :, :TOKENS]
    again = eight.blocks.permute(1, 2, 0, 3, 4, 5).reshape(2, 2, 16, 4, 8)
    assert torch.equal(again[:, :, :TOKENS], tokens)
    assert not again[:, :, TOKENS:].any()
    back = reshard(eight, GEOMETRY)
    assert torch.equal(back.blocks.reshape(3, 2, 2, 4, 4, 8)[:2], whole.blocks[:2])
    assert torch.equal(back.blocks[2, :, :, :2], whole.blocks[2, :, :, :2])


def test_reblocking_refuses_a_partial_request() -> None:
    with pytest.raises(KVReshardError, match="whole request's blocks"):
        reblock(package().blocks[:2], TOKENS, 4, 8)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"head_dim": 16}, "head_dim"),
        ({"num_layers": 3}, "num_layers"),
        ({"num_kv_heads": 8}, "total_kv_heads"),
        ({"model_signature": "llama:other:4567"}, "model_signature"),
    ],
)
def test_impossible_layouts_are_refused_naming_the_field(
    change: dict[str, object], field: str
) -> None:
    with pytest.raises(KVReshardError, match=f"field {field} ") as raised:
        reshard(package(), dataclasses.replace(GEOMETRY, **change))
    assert "\n" not in str(raised.value)


def test_a_shard_cannot_serve_heads_it_does_not_hold() -> None:
    low = shards(package(), 2)[0]
    with pytest.raises(KVReshardError, match=r"holds KV heads 0\.\.1, the receiver needs 0\.\.3"):
        reshard(low, GEOMETRY)


def test_gather_refuses_a_missing_or_repeated_shard() -> None:
    halves = shards(package(), 2)
    with pytest.raises(KVReshardError, match="hold 2 of the model's 4 KV heads"):
        gather_heads(halves[:1])
    with pytest.raises(KVReshardError, match="missing or repeated"):
        gather_heads([halves[0], halves[0]])


def test_a_corrupted_package_is_refused_before_it_is_resharded() -> None:
    whole = package()
    whole.blocks[0, 0, 0, 0, 0, 0] += 1.0
    with pytest.raises(KVChecksumError, match="block 0 fails its checksum"):
        reshard(whole, dataclasses.replace(GEOMETRY, dtype="bfloat16"))


def test_a_shard_layout_travels_in_the_header() -> None:
    whole = package()
    low, high = split_heads(whole.blocks, 2)
    shard = package(rank_geometry(GEOMETRY, 2, 1), high)
    received = KVPackage.from_bytes(shard.to_bytes())
    assert received.geometry == shard.geometry
    assert (received.geometry.kv_head_start, received.geometry.total_kv_heads) == (2, 4)
    assert torch.equal(
        gather_heads([received, package(rank_geometry(GEOMETRY, 2, 0), low)]).blocks, whole.blocks
    )


def test_a_header_whose_heads_exceed_the_model_is_refused() -> None:
    outside = dataclasses.replace(rank_geometry(GEOMETRY, 2, 1), kv_head_start=3)
    data = package(outside, split_heads(package().blocks, 2)[1]).to_bytes()
    with pytest.raises(KVTransferError, match="outside the model's total_kv_heads 4"):
        KVPackage.from_bytes(data)


# ---- engines across degrees and dtypes -------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-reshard")
    write_checkpoint(path, vocab_size=127)
    return path


def engine_config(dtype: torch.dtype | None = None) -> EngineConfig:
    return EngineConfig(device="cpu", dtype=dtype, block_size=4, num_kv_blocks=64)


@pytest.fixture(scope="module")
def tp2(folder: Path) -> Iterator[TensorParallelEngine]:
    with running_tensor_parallel(folder, engine_config(), 2) as engine:
        yield engine


PARAMS = SamplingParams(max_new_tokens=10, temperature=0.0)
PROMPTS = random_prompts([9, 14, 5], vocab=127, seed=4)


def first_token_export(engine: Engine | TensorParallelEngine, prompt: list[int]) -> KVPackage:
    """The request's KV once its prompt is computed and its first token sampled."""
    request_id = engine.add_request(prompt, PARAMS)
    for _ in range(100):
        if any(o.request_id == request_id for o in engine.step()):
            return engine.export_kv(request_id)
    raise AssertionError("no first token within 100 steps")


def continued(engine: Engine | TensorParallelEngine, package: KVPackage) -> list[int]:
    request_id = engine.import_kv(reshard(package, engine.kv_geometry))
    engine.run_until_idle()
    return engine.pop_finished(request_id).output_token_ids


def test_tp2_and_tp1_engines_continue_each_others_requests_exactly(
    folder: Path, tp2: TensorParallelEngine
) -> None:
    tp1 = Engine.from_pretrained(folder, engine_config())
    expected = [c.output_token_ids for c in tp1.generate(PROMPTS, PARAMS)]
    assert tp2.kv_geometry.model_signature == tp1.kv_geometry.model_signature
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        from_tp2 = first_token_export(tp2, prompt)
        assert from_tp2.geometry.tensor_parallel_size == 2
        assert from_tp2.geometry.num_kv_heads == 2  # both ranks' heads, gathered
        assert continued(tp1, from_tp2) == tokens
        assert continued(tp2, first_token_export(tp1, prompt)) == tokens


def test_tp2_export_gathers_the_heads_a_tp1_engine_computes(
    folder: Path, tp2: TensorParallelEngine
) -> None:
    tp1 = Engine.from_pretrained(folder, engine_config())
    ours, theirs = first_token_export(tp1, PROMPTS[1]), first_token_export(tp2, PROMPTS[1])
    torch.testing.assert_close(theirs.blocks, ours.blocks, rtol=1e-4, atol=1e-5)


def test_fp32_prefill_kv_enters_a_bf16_decode_engine_as_its_cast(folder: Path) -> None:
    fp32 = Engine.from_pretrained(folder, engine_config(torch.float32))
    bf16 = Engine.from_pretrained(folder, engine_config(torch.bfloat16))
    exported = first_token_export(fp32, PROMPTS[0])
    with pytest.raises(ValueError, match="dtype 'float32'"):
        bf16.import_kv(exported)  # as it came: refused, never silently cast
    request_id = bf16.import_kv(reshard(exported, bf16.kv_geometry))
    seq = bf16.requests[request_id]
    held = bf16.kv_cache.read_blocks(seq.block_ids[: exported.num_blocks])
    assert held.dtype == torch.bfloat16
    assert torch.equal(held, exported.blocks.to(torch.bfloat16))
    bf16.run_until_idle()
    assert len(bf16.pop_finished(request_id).output_token_ids) == PARAMS.max_new_tokens
