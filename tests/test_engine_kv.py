"""Paged KV: the block allocator, and KV export/import between engines (P->D, migration)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, rebuilt_package, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.agents.engine import (
    Engine,
    EngineConfig,
    EngineRole,
    KVChecksumError,
    KVPackage,
    KVTransferError,
    OutOfKVBlocksError,
    RoleError,
    SamplingParams,
    SchedulerConfig,
)
from tessera.agents.engine.kv_cache import RESERVED_BLOCKS, BlockAllocator, BlockOwnershipError
from tessera.agents.engine.kv_transfer import MAGIC


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(2, 40),
    operations=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60),
)
def test_allocator_never_hands_out_a_block_twice(
    num_blocks: int, operations: list[tuple[bool, int]]
) -> None:
    allocator = BlockAllocator(num_blocks)
    held: list[list[int]] = []
    for allocate, amount in operations:
        if allocate:
            if amount > allocator.num_free:
                with pytest.raises(OutOfKVBlocksError):
                    allocator.allocate(amount)
                continue
            blocks = allocator.allocate(amount)
            owned = {b for group in held for b in group}
            assert not owned & set(blocks)
            assert all(RESERVED_BLOCKS <= b < num_blocks for b in blocks)
            held.append(blocks)
        elif held:
            allocator.free(held.pop(amount % len(held)))
        assert allocator.num_used + allocator.num_free == allocator.capacity
        assert allocator.num_used == sum(len(group) for group in held)
    for group in held:
        allocator.free(group)
    assert allocator.num_free == allocator.capacity


def test_allocator_refuses_double_and_foreign_frees() -> None:
    allocator = BlockAllocator(8)
    blocks = allocator.allocate(3)
    allocator.free(blocks[:1])
    with pytest.raises(BlockOwnershipError):
        allocator.free(blocks[:1])
    with pytest.raises(BlockOwnershipError):
        allocator.free([0])  # the reserved block is never allocated
    with pytest.raises(BlockOwnershipError):
        allocator.free([blocks[1], blocks[1]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-kv")
    write_checkpoint(path, seed=11)
    return path


def engine(folder: Path, role: EngineRole = EngineRole.COLOCATED, **kwargs: Any) -> Engine:
    config = EngineConfig(
        role=role,
        block_size=4,
        num_kv_blocks=kwargs.pop("blocks", 96),
        scheduler=SchedulerConfig(max_num_batched_tokens=kwargs.pop("budget", 64)),
        **kwargs,
    )
    return Engine.from_pretrained(folder, config)


PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True, return_logits=True)
SAMPLED = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.9, top_k=40, seed=7)


def test_blocks_are_all_free_after_requests_finish_or_abort(folder: Path) -> None:
    e = engine(folder)
    e.generate(random_prompts([5, 12, 9], 128), PARAMS)
    assert e.kv_cache.allocator.num_used == 0
    request = e.add_request(random_prompts([10], 128)[0], PARAMS)
    e.step()
    assert e.kv_cache.allocator.num_used == 3  # 10 tokens in blocks of 4
    e.abort(request)
    assert e.kv_cache.allocator.num_used == 0
    assert e.kv_cache.allocator.num_free == e.kv_cache.allocator.capacity


@pytest.mark.parametrize("params", [PARAMS, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_prefill_export_then_decode_import_equals_colocated(
    folder: Path, params: SamplingParams
) -> None:
    prompts = random_prompts([7, 13, 4], 128, seed=5)
    colocated = engine(folder).generate(prompts, params)

    prefill = engine(folder, EngineRole.PREFILL)
    ids = [prefill.add_request(p, params) for p in prompts]
    prefill.run_until_idle()
    assert sorted(prefill.parked) == sorted(ids)
    wires = [prefill.export_kv(request_id).to_bytes() for request_id in ids]
    assert prefill.kv_cache.allocator.num_used == 0

    decode = engine(folder, EngineRole.DECODE)
    for wire in wires:
        decode.import_kv(KVPackage.from_bytes(wire))
    decode.run_until_idle()
    for request_id, expected in zip(ids, colocated, strict=True):
        done = decode.pop_finished(request_id)
        assert done.output_token_ids == expected.output_token_ids
        if params.return_logits:
            # The first token's logits stayed with the prefill engine.
            ours, theirs = torch.stack(done.logits), torch.stack(expected.logits[1:])
            assert (ours - theirs).abs().max().item() < 1e-4
    assert decode.kv_cache.allocator.num_used == 0


def test_live_migration_mid_decode(folder: Path) -> None:
    prompts = random_prompts([9, 6], 128, seed=8)
    expected = engine(folder).generate(prompts, SAMPLED)
    source, target = engine(folder), engine(folder, blocks=40)
    ids = [source.add_request(p, SAMPLED) for p in prompts]
    for _ in range(4):
        source.step()
    package = KVPackage.from_bytes(source.export_kv(ids[0]).to_bytes())
    assert package.num_computed_tokens == len(prompts[0]) + 3
    target.import_kv(package)
    source.run_until_idle()
    target.run_until_idle()
    assert target.pop_finished(ids[0]).output_token_ids == expected[0].output_token_ids
    assert source.pop_finished(ids[1]).output_token_ids == expected[1].output_token_ids


def test_corruption_is_detected(folder: Path) -> None:
    e = engine(folder, EngineRole.PREFILL)
    request = e.add_request(random_prompts([11], 128)[0], PARAMS)
    e.run_until_idle()
    wire = e.export_kv(request).to_bytes()
    KVPackage.from_bytes(wire).verify()

    payload_flip = bytearray(wire)
    payload_flip[-5] ^= 0x40
    with pytest.raises(KVChecksumError, match="block 2"):
        KVPackage.from_bytes(bytes(payload_flip))

    first = KVPackage.from_bytes(wire).prompt_token_ids[0]
    original = f'"prompt_token_ids":[{first},'.encode()
    tampered = wire.replace(original, f'"prompt_token_ids":[{4 if first == 3 else 3},'.encode(), 1)
    assert tampered != wire
    with pytest.raises(KVChecksumError, match="header"):
        KVPackage.from_bytes(tampered)

    with pytest.raises(KVChecksumError):
        KVPackage.from_bytes(wire[:-3])
    with pytest.raises(KVTransferError):
        KVPackage.from_bytes(b"not a package at all")

    package = KVPackage.from_bytes(wire)
    package.blocks[1, 0, 0, 0, 0, 0] += 1.0
    with pytest.raises(KVChecksumError, match="block 1"):
        package.verify()


def test_import_refuses_other_layouts_and_roles(folder: Path) -> None:
    e = engine(folder, EngineRole.PREFILL)
    request = e.add_request(random_prompts([6], 128)[0], PARAMS)
    e.run_until_idle()
    package = e.export_kv(request)
    other_block_size = Engine.from_pretrained(
        folder, EngineConfig(role=EngineRole.DECODE, block_size=8, num_kv_blocks=16)
    )
    with pytest.raises(KVTransferError, match=r"block_size 4 \(engine: 8\)"):
        other_block_size.import_kv(package)
    with pytest.raises(RoleError):
        engine(folder, EngineRole.DECODE).add_request([5, 6, 7], PARAMS)
    with pytest.raises(RoleError):
        e.import_kv(package)
    tiny = engine(folder, EngineRole.DECODE, blocks=2)
    # Never fits (6 + 10 tokens need 4 blocks): refused for good, not "out of blocks, retry".
    with pytest.raises(KVTransferError, match="4 KV blocks; the cache has 1"):
        tiny.import_kv(package)
    assert tiny.kv_cache.allocator.num_used == 0


def test_import_leaves_room_for_the_running_requests_next_tokens(folder: Path) -> None:
    """An import that would take the block a running request's next token needs is refused,
    so that it never forces a preemption (a recompute from the whole prompt) at the next step."""
    prefill = engine(folder, EngineRole.PREFILL)
    short = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ids = [prefill.add_request(p, short) for p in random_prompts([8, 12], 128, seed=9)]
    prefill.run_until_idle()
    first, second = (prefill.export_kv(request_id) for request_id in ids)
    decode = engine(folder, EngineRole.DECODE, blocks=6)  # 5 usable blocks of 4 tokens
    decode.import_kv(first)  # 8 tokens: 2 blocks; its first output token starts a third
    assert decode.scheduler.decode_growth_blocks() == 1
    assert decode.kv_cache.allocator.num_free == 3
    with pytest.raises(OutOfKVBlocksError, match="running requests"):
        decode.import_kv(second)  # 12 tokens: 3 blocks, free only if the first cannot grow
    assert decode.kv_cache.allocator.num_free == 3
    decode.run_until_idle()
    decode.import_kv(second)
    decode.run_until_idle()
    assert decode.stats.preemptions_total == 0
    assert len(decode.pop_finished(second.request_id).output_token_ids) == 4


def test_export_refused_mid_prefill(folder: Path) -> None:
    e = engine(folder, budget=4)
    request = e.add_request(random_prompts([10], 128)[0], PARAMS)
    e.step()
    with pytest.raises(KVTransferError, match="pending"):
        e.export_kv(request)


def _exported(folder: Path, prompt_length: int = 6, **engine_kwargs: Any) -> KVPackage:
    e = engine(folder, EngineRole.PREFILL, **engine_kwargs)
    request = e.add_request(random_prompts([prompt_length], 128, seed=12)[0], PARAMS)
    e.run_until_idle()
    return e.export_kv(request)


def _bad_packages(folder: Path, tmp_path: Path) -> dict[str, tuple[KVPackage, str]]:
    """Packages an engine of `folder` (block size 4, float32 or bfloat16) must refuse, and
    why. float16 is neither engine's dtype."""
    good = _exported(folder)
    other_config, other_weights = tmp_path / "other-config", tmp_path / "other-weights"
    write_checkpoint(other_config, seed=11, rms_norm_eps=1e-6)  # same shape and signature
    write_checkpoint(other_weights, seed=12)  # a fine-tune, say: same config
    sampling = good.sampling
    fp16 = dataclasses.replace(good.geometry, dtype="float16")
    return {
        "stale checksums": (
            dataclasses.replace(good, blocks=good.blocks + 1.0),
            "block 0 fails its checksum",
        ),
        "wrong block shape": (
            dataclasses.replace(good, blocks=good.blocks[:, :1]),
            "blocks have shape",
        ),
        "blocks in another dtype": (
            rebuilt_package(good, blocks=good.blocks.to(torch.float16)),
            "blocks are torch.float16",
        ),
        "another dtype": (
            rebuilt_package(good, geometry=fp16, blocks=good.blocks.to(torch.float16)),
            "dtype 'float16'",
        ),
        "another model's config": (_exported(other_config), "model_signature"),
        "another model's weights": (_exported(other_weights), "model_signature"),
        "nothing computed yet": (rebuilt_package(good, output_token_ids=[]), "num_computed_tokens"),
        "num_computed_tokens off by one": (
            rebuilt_package(good, num_computed_tokens=good.num_computed_tokens - 1),
            "num_computed_tokens",
        ),
        "token outside the vocabulary": (
            rebuilt_package(good, prompt_token_ids=[999, *good.prompt_token_ids[1:]]),
            r"prompt_token_ids .*\[999\]",
        ),
        "NaN temperature": (
            rebuilt_package(good, sampling={**sampling, "temperature": math.nan}),
            "temperature must be a finite number",
        ),
        "unknown sampling field": (
            rebuilt_package(good, sampling={**sampling, "beam_width": 4}),
            "beam_width is not a sampling parameter",
        ),
        "already finished": (
            rebuilt_package(good, sampling={**sampling, "max_new_tokens": 1}),
            "it is finished",
        ),
    }


def test_refused_imports_give_their_blocks_back(folder: Path, tmp_path: Path) -> None:
    """Every refusal is a KVTransferError that names the problem, and leaves the cache as it
    was: six bad imports used to exhaust a 16-block cache."""
    decode = engine(folder, EngineRole.DECODE, blocks=17)
    allocator = decode.kv_cache.allocator
    initial = allocator.num_free
    bad = _bad_packages(folder, tmp_path)
    for _ in range(3):
        for name, (package, reason) in bad.items():
            with pytest.raises(KVTransferError, match=reason):
                decode.import_kv(package)
            assert allocator.num_free == initial, name
            assert not decode.requests and not decode.has_unfinished(), name
    good = _exported(folder)
    expected = engine(folder).generate([good.prompt_token_ids], PARAMS)[0]
    decode.import_kv(good)
    with pytest.raises(KVTransferError, match="already in the engine"):
        decode.import_kv(good)
    decode.run_until_idle()
    assert decode.pop_finished(good.request_id).output_token_ids == expected.output_token_ids
    assert allocator.num_free == initial


def _rewritten(wire: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """`wire` (blake2b checksums) with its header changed by `change` and a header checksum
    that matches: what a buggy or hostile peer can send."""
    start = len(MAGIC) + 8
    (length,) = struct.unpack_from("<Q", wire, len(MAGIC))
    header = json.loads(wire[start : start + length])
    del header["header_checksum"]
    change(header)
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header["header_checksum"] = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(encoded)) + encoded + wire[start + length :]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(header: dict[str, Any]) -> None:
        target = header
        for part in parents:
            target = target[part]
        target[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(header: dict[str, Any]) -> None:
        target = header
        for part in parents:
            target = target[part]
        del target[last]

    return change


MALFORMED_HEADERS = {
    "no geometry": (_drop("geometry"), "geometry"),
    "geometry not an object": (_set("geometry", [4]), "geometry"),
    "geometry without block_size": (_drop("geometry.block_size"), "geometry.block_size"),
    "extra geometry field": (_set("geometry.color", "red"), "geometry.color"),
    "negative layers": (_set("geometry.num_layers", -2), "geometry.num_layers"),
    "layers as a string": (_set("geometry.num_layers", "2"), "geometry.num_layers"),
    "unknown dtype": (_set("geometry.dtype", "float13"), "unknown dtype"),
    "non-float dtype": (_set("geometry.dtype", "int64"), "unknown dtype"),
    "dtype alias": (_set("geometry.dtype", "float"), "alias"),
    "num_blocks as a string": (_set("num_blocks", "2"), "num_blocks"),
    "num_blocks as a bool": (_set("num_blocks", True), "num_blocks"),
    "fewer checksums than blocks": (_set("block_checksums", []), "block_checksums"),
    "checksums not strings": (_set("block_checksums", [1, 2]), "block_checksums"),
    "no request_id": (_drop("request_id"), "request_id"),
    "tokens not a list": (_set("prompt_token_ids", 5), "prompt_token_ids"),
    "a float token": (_set("output_token_ids", [1.5]), "output_token_ids"),
    "sampling not an object": (_set("sampling", "greedy"), "sampling"),
    "checksum_algorithm not a string": (_set("checksum_algorithm", 7), "checksum_algorithm"),
    "unknown checksum_algorithm": (_set("checksum_algorithm", "md5"), "unknown checksum"),
    "unknown field": (_set("priority", 1), "priority"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_HEADERS))
def test_malformed_headers_raise_the_transfer_error(folder: Path, name: str) -> None:
    wire = rebuilt_package(_exported(folder), checksum_algorithm="blake2b_128").to_bytes()
    change, reason = MALFORMED_HEADERS[name]
    bad = _rewritten(wire, change)
    with pytest.raises(KVTransferError, match=reason):
        KVPackage.from_bytes(bad)


def test_a_header_in_another_json_spelling_is_refused(folder: Path) -> None:
    """One package, one encoding: spaces or unsorted keys are not what to_bytes writes."""
    wire = _exported(folder).to_bytes()
    start = len(MAGIC) + 8
    (length,) = struct.unpack_from("<Q", wire, len(MAGIC))
    spaced = json.dumps(json.loads(wire[start : start + length]), sort_keys=True).encode()
    bad = MAGIC + struct.pack("<Q", len(spaced)) + spaced + wire[start + length :]
    with pytest.raises(KVTransferError, match="canonical"):
        KVPackage.from_bytes(bad)
    assert KVPackage.from_bytes(wire).to_bytes() == wire


def test_a_package_is_hashed_again_only_if_its_blocks_changed(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """from_bytes and build have just hashed every block; import_kv does not hash them again
    unless the blocks changed since (an in-place write, or another tensor)."""
    hashed: list[int] = []
    block_bytes = KVPackage.block_bytes

    def counting(self: KVPackage, index: int) -> bytes:
        hashed.append(index)
        return block_bytes(self, index)

    built = _exported(folder)
    parsed = KVPackage.from_bytes(built.to_bytes())
    monkeypatch.setattr(KVPackage, "block_bytes", counting)
    geometry = engine(folder, EngineRole.DECODE).kv_geometry
    for package in (built, parsed):
        package.check_compatible(geometry)
        assert hashed == []
    parsed.blocks[1, 0, 0, 0, 0, 0] += 1.0  # in place, through a view
    with pytest.raises(KVChecksumError, match="block 1"):
        engine(folder, EngineRole.DECODE).import_kv(parsed)
    assert hashed == [0, 1]
    hashed.clear()
    built.blocks = built.blocks.clone()
    built.check_compatible(geometry)
    assert hashed == list(range(built.num_blocks))
