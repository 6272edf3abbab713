"""KV package parsing under hypothesis: whatever the bytes, `from_bytes` raises KVTransferError
(or its KVChecksumError) or returns the package those bytes encode, never another exception.

Mutations, truncations and splices of a valid package are refused outright (its checksums and
canonical header leave no byte free); headers rewritten with random JSON values and a matching
header checksum (a buggy or hostile peer) are refused by type, or, when they happen to be valid,
parse to a package that writes back the very same bytes. A package handed over in memory, with
any field changed, is imported or refused with KVTransferError, and a refusal holds no block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, rebuilt_package, write_checkpoint
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from tessera.agents.engine import Engine, EngineConfig, EngineRole, SamplingParams
from tessera.agents.engine.kv_transfer import MAGIC, KVGeometry, KVPackage, KVTransferError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GEOMETRY = KVGeometry("llama:fuzz:0123456789abcdef", 2, 1, 2, 2, "float32")
BLOCKS = torch.arange(3 * 16, dtype=torch.float32).reshape(3, *GEOMETRY.block_shape) / 7
VALID = KVPackage.build(
    request_id="req-7",
    geometry=GEOMETRY,
    prompt_token_ids=[5, 9, 11, 3, 8],
    output_token_ids=[42],
    num_computed_tokens=5,
    sampling={"max_new_tokens": 4, "temperature": 0.9, "seed": 7, "stop_token_ids": []},
    blocks=BLOCKS,
    checksum_algorithm="blake2b_128",
)
WIRE = VALID.to_bytes()
HEADER_AT = len(MAGIC) + 8
(HEADER_LENGTH,) = struct.unpack_from("<Q", WIRE, len(MAGIC))
HEADER: dict[str, Any] = json.loads(WIRE[HEADER_AT : HEADER_AT + HEADER_LENGTH])
PAYLOAD = WIRE[HEADER_AT + HEADER_LENGTH :]

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def parse(data: bytes) -> KVPackage | None:
    """The package, or None when refused with the transfer error (anything else propagates)."""
    try:
        return KVPackage.from_bytes(data)
    except KVTransferError:
        return None


def encode(header: Any, payload: bytes, algorithm: str = "blake2b_128") -> bytes:
    """A wire package whose header checksum matches `header`, whatever `header` holds."""
    if isinstance(header, dict):
        header = dict(header)
        header.pop("header_checksum", None)
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        header["header_checksum"] = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(encoded)) + encoded + payload


def test_the_valid_package_round_trips() -> None:
    parsed = parse(WIRE)
    assert parsed is not None and parsed.to_bytes() == WIRE
    assert torch.equal(parsed.blocks, BLOCKS)
    assert encode(HEADER, PAYLOAD) == WIRE  # the fuzzer's encoder is the real one


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(WIRE) - 1), st.integers(0, 255)), min_size=1))
def test_byte_mutations_are_refused(edits: list[tuple[int, int]]) -> None:
    data = bytearray(WIRE)
    for position, value in edits:
        data[position] = value
    assume(bytes(data) != WIRE)
    parsed = parse(bytes(data))
    assert parsed is None or parsed.to_bytes() == WIRE


@FUZZ
@given(cut=st.integers(0, len(WIRE) - 1), tail=st.binary(max_size=64))
def test_truncated_or_extended_packages_are_refused(cut: int, tail: bytes) -> None:
    assert parse(WIRE[:cut]) is None
    if tail:
        assert parse(WIRE + tail) is None
        assert parse(WIRE[:cut] + tail) is None or WIRE[:cut] + tail == WIRE


@FUZZ
@given(
    start=st.integers(0, len(WIRE)),
    removed=st.integers(0, 40),
    inserted=st.binary(max_size=40),
)
def test_spliced_packages_are_refused(start: int, removed: int, inserted: bytes) -> None:
    data = WIRE[:start] + inserted + WIRE[start + removed :]
    assume(data != WIRE)
    assert parse(data) is None


@FUZZ
@given(
    replaced=st.dictionaries(st.sampled_from(sorted(HEADER)), JSON, max_size=3),
    dropped=st.sets(st.sampled_from(sorted(HEADER)), max_size=2),
    added=st.dictionaries(st.text(max_size=6), JSON, max_size=2),
    payload=st.sampled_from([PAYLOAD, PAYLOAD[:-1], PAYLOAD[:64], b""]) | st.binary(max_size=80),
)
def test_random_header_values_are_refused_by_type_or_round_trip(
    replaced: dict[str, Any], dropped: set[str], added: dict[str, Any], payload: bytes
) -> None:
    header = {**added, **HEADER, **replaced}
    for key in dropped:
        header.pop(key, None)
    data = encode(header, payload)
    parsed = parse(data)
    assert parsed is None or parsed.to_bytes() == data


@FUZZ
@given(
    field=st.sampled_from(["num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"]),
    value=JSON,
    payload=st.binary(max_size=80),
)
def test_random_geometries_are_refused_by_type_or_round_trip(
    field: str, value: Any, payload: bytes
) -> None:
    header = {**HEADER, "geometry": {**HEADER["geometry"], field: value}}
    data = encode(header, payload)
    parsed = parse(data)
    assert parsed is None or parsed.to_bytes() == data


@FUZZ
@given(header=JSON, payload=st.binary(max_size=32))
def test_arbitrary_json_headers_are_refused(header: Any, payload: bytes) -> None:
    assert parse(encode(header, payload)) is None


@FUZZ
@given(length=st.integers(0, 2**64 - 1), rest=st.binary(max_size=64))
def test_arbitrary_header_lengths_are_refused(length: int, rest: bytes) -> None:
    assert parse(MAGIC + struct.pack("<Q", length) + rest) is None


@settings(max_examples=80, deadline=None)
@given(
    num_layers=st.integers(1, 3),
    block_size=st.integers(1, 4),
    num_blocks=st.integers(0, 3),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    prompt=st.lists(st.integers(0, 2**31), max_size=6),
    output=st.lists(st.integers(0, 2**31), max_size=3),
    sampling=st.dictionaries(st.text(max_size=6), JSON, max_size=3),
    request_id=st.text(min_size=1, max_size=12),
)
def test_any_valid_package_round_trips(
    num_layers: int,
    block_size: int,
    num_blocks: int,
    dtype: str,
    prompt: list[int],
    output: list[int],
    sampling: dict[str, Any],
    request_id: str,
) -> None:
    """The strict parser refuses nothing that `to_bytes` writes."""
    geometry = KVGeometry("llama:any", num_layers, 2, 2, block_size, dtype)
    generator = torch.Generator().manual_seed(num_layers * 7 + num_blocks)
    blocks = torch.randn((num_blocks, *geometry.block_shape), generator=generator)
    package = KVPackage.build(
        request_id=request_id,
        geometry=geometry,
        prompt_token_ids=prompt,
        output_token_ids=output,
        num_computed_tokens=len(prompt),
        sampling=sampling,
        blocks=blocks.to(geometry.torch_dtype),
        checksum_algorithm="blake2b_128",
    )
    wire = package.to_bytes()
    parsed = KVPackage.from_bytes(wire)
    assert parsed.to_bytes() == wire
    assert torch.equal(parsed.blocks, package.blocks)


@pytest.fixture(scope="module")
def decode_and_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, KVPackage]:
    """A decode engine of a tiny model (CPU, blocks of 4) and a package it accepts."""
    folder = tmp_path_factory.mktemp("tiny-llama-fuzz")
    write_checkpoint(folder, seed=41)

    def make(role: EngineRole) -> Engine:
        return Engine.from_pretrained(
            folder, EngineConfig(role=role, block_size=4, num_kv_blocks=40, device="cpu")
        )

    prefill = make(EngineRole.PREFILL)
    request = prefill.add_request(
        random_prompts([9], 128, seed=2)[0], SamplingParams(max_new_tokens=4)
    )
    prefill.run_until_idle()
    return make(EngineRole.DECODE), prefill.export_kv(request)


TOKENS = st.lists(st.integers(-3, 140), max_size=12) | JSON
BLOCK_CHANGES: dict[str, Callable[[torch.Tensor], Any]] = {
    "same": lambda b: b.clone(),
    "fewer layers": lambda b: b[:, :1],
    "fewer blocks": lambda b: b[:-1],
    "float16": lambda b: b.to(torch.float16),
    "shifted": lambda b: b + 1,
    "extra axis": lambda b: b.unsqueeze(0),
    "flat": lambda b: b.reshape(-1),
    "not a tensor": lambda b: b.tolist(),
}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rehash=st.booleans())
def test_an_in_memory_package_imports_or_leaves_the_cache_as_it_was(
    decode_and_package: tuple[Engine, KVPackage], data: st.DataObject, rehash: bool
) -> None:
    """Any field of a handed-over package changed to anything (checksums recomputed or left
    stale): import_kv accepts it or raises KVTransferError, and a refusal holds no block."""
    decode, good = decode_and_package
    geometry_field = st.sampled_from([f.name for f in dataclasses.fields(KVGeometry)])
    sampling_field = st.sampled_from([*good.sampling, "beam_width"])
    fields: dict[str, st.SearchStrategy[Any]] = {
        "request_id": st.text(max_size=4) | JSON,
        "geometry": st.tuples(geometry_field, JSON).map(
            lambda change: dataclasses.replace(good.geometry, **dict([change]))
        ),
        "prompt_token_ids": TOKENS,
        "output_token_ids": TOKENS,
        "num_computed_tokens": st.integers(-2, 30) | JSON,
        "sampling": st.dictionaries(sampling_field, JSON, max_size=2).map(
            lambda change: {**good.sampling, **change}
        ),
        "blocks": st.sampled_from(sorted(BLOCK_CHANGES)).map(
            lambda name: BLOCK_CHANGES[name](good.blocks)
        ),
    }
    if not rehash:
        fields["checksum_algorithm"] = st.sampled_from(["blake2b_128", "none", "md5"]) | JSON
        fields["block_checksums"] = st.just(good.block_checksums[:-1]) | JSON
    names = data.draw(st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=3))
    changes = {name: data.draw(fields[name], label=name) for name in sorted(names)}
    if rehash:
        try:  # build itself takes only lists and a tensor
            package = rebuilt_package(good, **changes)
        except (TypeError, AttributeError):
            reject()
    else:
        package = dataclasses.replace(good, **changes)
    allocator = decode.kv_cache.allocator
    free = allocator.num_free
    try:
        request_id = decode.import_kv(package)
    except KVTransferError:
        assert allocator.num_free == free
        assert not decode.requests and not decode.has_unfinished()
        return
    decode.abort(request_id)
    decode.pop_finished(request_id)
    assert allocator.num_free == free
