"""Block-level KV export and import: the unit of P->D transfer and live migration.

A package holds one request's KV blocks (block-major, so each block's bytes are contiguous and
can be sent, checksummed and retried on their own), its tokens, and how it samples. Every block
has a checksum and the header has one of its own; `from_bytes` verifies all of them before any
tensor is built, so a corrupted transfer is refused, never decoded from.

Wire format: MAGIC, u64 little-endian header length, UTF-8 JSON header, then the blocks' bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

try:
    import xxhash

    DEFAULT_CHECKSUM = "xxh3_128"
except ImportError:  # xxhash is optional; blake2b is in the standard library.
    xxhash = None
    DEFAULT_CHECKSUM = "blake2b_128"

MAGIC = b"TSSRKV01"
_LENGTH = struct.Struct("<Q")


class KVTransferError(ValueError):
    """A KV package cannot be imported (malformed, or made for another model or layout)."""


class KVChecksumError(KVTransferError):
    """A KV package's bytes do not match their checksums: corrupted in transfer or storage."""


def _digest_function(algorithm: str) -> Callable[[bytes], str]:
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise KVTransferError("package uses xxh3_128 checksums but xxhash is not installed")
        return lambda data: xxhash.xxh3_128_hexdigest(data)
    if algorithm == "blake2b_128":
        return lambda data: hashlib.blake2b(data, digest_size=16).hexdigest()
    raise KVTransferError(f"unknown checksum algorithm {algorithm!r}")


@dataclass(frozen=True)
class KVGeometry:
    """What two engines must agree on to exchange blocks."""

    model_signature: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise KVTransferError(f"unknown dtype {self.dtype!r} in KV package")
        return dtype


@dataclass
class KVPackage:
    """One request's KV blocks and the state needed to continue it elsewhere."""

    request_id: str
    geometry: KVGeometry
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    sampling: dict[str, Any]
    blocks: torch.Tensor
    """[n, layers, 2, block_size, kv_heads, head_dim] on the CPU."""
    checksum_algorithm: str
    block_checksums: list[str]

    @classmethod
    def build(
        cls,
        request_id: str,
        geometry: KVGeometry,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        num_computed_tokens: int,
        sampling: dict[str, Any],
        blocks: torch.Tensor,
        checksum_algorithm: str = DEFAULT_CHECKSUM,
    ) -> KVPackage:
        blocks = blocks.detach().to("cpu").contiguous()
        digest = _digest_function(checksum_algorithm)
        package = cls(
            request_id=request_id,
            geometry=geometry,
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=list(output_token_ids),
            num_computed_tokens=num_computed_tokens,
            sampling=dict(sampling),
            blocks=blocks,
            checksum_algorithm=checksum_algorithm,
            block_checksums=[],
        )
        package.block_checksums = [
            digest(package.block_bytes(i)) for i in range(package.num_blocks)
        ]
        return package

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    def block_bytes(self, index: int) -> bytes:
        """The raw bytes of one block (all layers, K then V), as they travel."""
        block = self.blocks[index].contiguous().reshape(-1)
        return bytes(block.view(torch.uint8).numpy().tobytes())

    def verify(self) -> None:
        """Raise KVChecksumError naming the first block whose bytes do not match."""
        digest = _digest_function(self.checksum_algorithm)
        if len(self.block_checksums) != self.num_blocks:
            raise KVChecksumError(
                f"{self.request_id}: {len(self.block_checksums)} checksums for "
                f"{self.num_blocks} blocks"
            )
        for index, expected in enumerate(self.block_checksums):
            if digest(self.block_bytes(index)) != expected:
                raise KVChecksumError(f"{self.request_id}: block {index} fails its checksum")

    def _header(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "geometry": asdict(self.geometry),
            "prompt_token_ids": self.prompt_token_ids,
            "output_token_ids": self.output_token_ids,
            "num_computed_tokens": self.num_computed_tokens,
            "sampling": self.sampling,
            "num_blocks": self.num_blocks,
            "checksum_algorithm": self.checksum_algorithm,
            "block_checksums": self.block_checksums,
        }

    def to_bytes(self) -> bytes:
        header = self._header()
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        header["header_checksum"] = _digest_function(self.checksum_algorithm)(canonical)
        encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        parts = [MAGIC, _LENGTH.pack(len(encoded)), encoded]
        parts.extend(self.block_bytes(i) for i in range(self.num_blocks))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> KVPackage:
        """Parse and verify a package; raises KVChecksumError on any mismatch."""
        if data[: len(MAGIC)] != MAGIC:
            raise KVTransferError("not a Tessera KV package (bad magic bytes)")
        start = len(MAGIC) + _LENGTH.size
        if len(data) < start:
            raise KVTransferError("KV package truncated before its header")
        (length,) = _LENGTH.unpack_from(data, len(MAGIC))
        try:
            header = json.loads(data[start : start + length])
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise KVChecksumError(f"KV package header is corrupted: {error}") from error
        if not isinstance(header, dict) or "header_checksum" not in header:
            raise KVChecksumError("KV package header is corrupted: no header_checksum")
        expected_header = header.pop("header_checksum")
        algorithm = str(header.get("checksum_algorithm"))
        digest = _digest_function(algorithm)
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if digest(canonical) != expected_header:
            raise KVChecksumError("KV package header fails its checksum")
        geometry = KVGeometry(**header["geometry"])
        dtype = geometry.torch_dtype
        block_numel = 1
        for size in geometry.block_shape:
            block_numel *= size
        block_nbytes = block_numel * torch.tensor([], dtype=dtype).element_size()
        num_blocks = int(header["num_blocks"])
        payload = data[start + length :]
        if len(payload) != num_blocks * block_nbytes:
            raise KVChecksumError(
                f"KV package payload has {len(payload)} bytes, header says "
                f"{num_blocks} blocks of {block_nbytes}"
            )
        checksums: list[str] = header["block_checksums"]
        for index in range(num_blocks):
            chunk = payload[index * block_nbytes : (index + 1) * block_nbytes]
            if digest(chunk) != checksums[index]:
                raise KVChecksumError(f"{header['request_id']}: block {index} fails its checksum")
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        if raw is None:
            blocks = torch.empty((0, *geometry.block_shape), dtype=dtype)
        else:
            blocks = raw.view(dtype).reshape(num_blocks, *geometry.block_shape)
        return cls(
            request_id=header["request_id"],
            geometry=geometry,
            prompt_token_ids=list(header["prompt_token_ids"]),
            output_token_ids=list(header["output_token_ids"]),
            num_computed_tokens=int(header["num_computed_tokens"]),
            sampling=dict(header["sampling"]),
            blocks=blocks,
            checksum_algorithm=algorithm,
            block_checksums=checksums,
        )
