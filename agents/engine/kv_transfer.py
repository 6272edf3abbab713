"""Block-level KV export and import: the unit of P->D transfer and live migration.

A package holds one request's KV blocks (block-major, so each block's bytes are contiguous and
can be sent, checksummed and retried on their own), its tokens, and how it samples. Every block
has a checksum and the header has one of its own; `from_bytes` verifies all of them, and the
header's types and shape, before any tensor is built, so a corrupted or malformed transfer is
refused with a KVTransferError, never decoded from. `check_compatible` does the same for a
package handed over in memory, against the importing engine's geometry.

Wire format: MAGIC, u64 little-endian header length, UTF-8 JSON header (canonical: sorted keys,
no spaces), then the blocks' bytes.

Checksums detect corruption in transit or storage (a flipped bit, a truncated or misordered
stream); none of them is a MAC: anyone who can rewrite the bytes can rewrite the checksums, so
a link that needs authenticity needs TLS or a signed channel. The default is xxh3_128 when
xxhash is installed, else zlib's CRC-32 (C, about 4x blake2b's throughput on the H200 host's
CPU class, and it catches every burst error up to 32 bits); blake2b_128 packages are still read.
Bytes are moved as memoryviews of the blocks' storage: no per-block `bytes()` copies. Blocks
built from a GPU land in pinned host memory, hashed while the rest is still being copied; a
TCP receiver fills one buffer in place and verifies it as it arrives (`IncomingPackage`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.host_buffers import shared_pool
from tessera.agents.engine.weights import LlamaWeights

try:
    import xxhash

    DEFAULT_CHECKSUM = "xxh3_128"
except ImportError:  # xxhash is optional; blake2b is in the standard library.
    xxhash = None
    DEFAULT_CHECKSUM = "crc32"

MAGIC = b"TSSRKV01"
_LENGTH = struct.Struct("<Q")

UNCHECKED = "none"
"""Checksum algorithm of a package handed over inside one process without checksums (the
serving benchmark's GPU-resident blocks). `verify` passes it; `to_bytes` and `from_bytes` refuse
it, so such a package never travels."""


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat uint8 memoryview of `tensor` on the host: its own storage when it is a
    contiguous CPU tensor, else one copy to the host (never a per-element walk)."""
    flat = tensor.detach()
    if flat.device.type != "cpu" or not flat.is_contiguous():
        flat = flat.to("cpu").contiguous()
    flat = flat.reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.numpy().data.cast("B")


class KVTransferError(ValueError):
    """A KV package cannot be imported (malformed, or made for another model or layout)."""


class KVChecksumError(KVTransferError):
    """A KV package's bytes do not match their checksums: corrupted in transfer or storage."""


Buffer = bytes | bytearray | memoryview


def _crc32_hex(data: Buffer) -> str:
    return f"{zlib.crc32(data):08x}"


def _digest_function(algorithm: str) -> Callable[[Buffer], str]:
    if algorithm == "crc32":
        return _crc32_hex
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise KVTransferError("package uses xxh3_128 checksums but xxhash is not installed")
        return lambda data: xxhash.xxh3_128_hexdigest(data)
    if algorithm == "blake2b_128":
        return lambda data: hashlib.blake2b(data, digest_size=16).hexdigest()
    raise KVTransferError(
        f"unknown checksum algorithm {algorithm!r} (known: crc32, xxh3_128, blake2b_128)"
    )


_PARALLEL_MIN_BYTES = 8 << 20
"""Below this a package's blocks are hashed on the calling thread (a thread hop costs more)."""
_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
_hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
_COPY_CHUNKS = 8
"""A device package's host copy is split into this many copies, each hashed as soon as it has
landed while the next ones are still in flight."""


def checksum_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The checksum threads, shared by every package of the process (started on first use)."""
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = concurrent.futures.ThreadPoolExecutor(
            _HASH_THREADS, thread_name_prefix="kv-checksum"
        )
    return _hash_pool


def _digest_all(digest: Callable[[Buffer], str], views: list[memoryview]) -> list[str]:
    """Each view's checksum, in order. zlib, hashlib and xxhash release the GIL over large
    buffers, so a big package's blocks are hashed on several cores at once: one core's CRC-32
    (about 1 GB/s) was most of a TCP transfer's time."""
    if len(views) < 2 or sum(view.nbytes for view in views) < _PARALLEL_MIN_BYTES:
        return [digest(view) for view in views]
    return list(checksum_pool().map(digest, views))


def _done(value: Any) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_result(value)
    return future


def _chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """`count` items as up to `parts` contiguous (start, stop) ranges of near-equal size."""
    step = max(1, -(-count // parts))
    return [(start, min(count, start + step)) for start in range(0, count, step)]


def _host_blocks(
    blocks: torch.Tensor, digest: Callable[[Buffer], str]
) -> tuple[torch.Tensor, list[str]]:
    """`blocks` on the host (contiguous) and each block's checksum.

    Blocks on a GPU are copied into pinned memory (a pageable copy runs at a fraction of the
    link's speed; torch's caching host allocator keeps freed pinned buffers for the next
    package) in `_COPY_CHUNKS` asynchronous copies, and each copy's blocks are hashed on the
    checksum threads as soon as its event has fired: the copy and the hashing overlap."""
    blocks = blocks.detach()
    count = int(blocks.shape[0]) if blocks.ndim else 0
    if blocks.device.type != "cuda" or count == 0:
        host = blocks.to("cpu").contiguous()
        return host, _digest_all(digest, [_byte_view(host[i]) for i in range(count)])
    host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
    ranges = _chunks(count, _COPY_CHUNKS)
    events = []
    with torch.cuda.device(blocks.device):
        stream = torch.cuda.current_stream()
        for start, stop in ranges:
            host[start:stop].copy_(blocks[start:stop], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
    parallel = host.numel() * host.element_size() >= _PARALLEL_MIN_BYTES
    futures: list[concurrent.futures.Future[str]] = []
    for (start, stop), event in zip(ranges, events, strict=True):
        event.synchronize()
        for index in range(start, stop):
            view = _byte_view(host[index])
            futures.append(
                checksum_pool().submit(digest, view) if parallel else _done(digest(view))
            )
    return host, [future.result() for future in futures]


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def model_identity(config: LlamaConfig, weights: LlamaWeights, sample: int = 256) -> str:
    """`config.signature` and a digest of the whole config and of every weight tensor's ends.

    The signature is only the shape: a base model and its fine-tune, or two configs that differ
    in rope_theta or rms_norm_eps, share it, and KV computed by one is garbage to the other.
    The first and last `sample` values of each tensor change under any full fine-tune or merged
    adapter, and reading them costs one small copy off the device.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    tensors = [weights.embed, weights.final_norm, weights.lm_head]
    for layer in weights.layers:
        tensors.extend(getattr(layer, f.name) for f in dataclasses.fields(layer))
    ends: list[torch.Tensor] = []
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        ends.extend((flat[:sample], flat[-sample:]))
    values = torch.cat(ends).cpu().contiguous()
    digest.update(values.view(torch.uint8).numpy().tobytes())
    return f"{config.signature}:{digest.hexdigest()}"


@dataclass(frozen=True)
class KVGeometry:
    """What two engines must agree on to exchange blocks as they are, and the blocks' layout.

    The layout fields say which of the model's KV heads the blocks hold (heads
    `kv_head_start` .. `kv_head_start + num_kv_heads - 1` of `total_kv_heads`; None: all of
    them) and the tensor-parallel degree of the engine that wrote them. A receiver whose
    layout differs (another degree, dtype or block size) re-shards the package on receipt
    (kv_reshard.py); `check_compatible` itself still takes only an exact match.
    """

    model_signature: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    total_kv_heads: int | None = None
    kv_head_start: int = 0
    tensor_parallel_size: int = 1

    @property
    def model_kv_heads(self) -> int:
        """The model's KV heads (the blocks may hold a slice of them)."""
        return self.num_kv_heads if self.total_kv_heads is None else self.total_kv_heads

    @property
    def holds_all_heads(self) -> bool:
        return self.kv_head_start == 0 and self.num_kv_heads == self.model_kv_heads

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise KVTransferError(f"unknown dtype {self.dtype!r} in KV package")
        if str(dtype) != f"torch.{self.dtype}":
            raise KVTransferError(
                f"dtype {self.dtype!r} in KV package is an alias; write {str(dtype)[6:]!r}"
            )
        return dtype

    @property
    def block_nbytes(self) -> int:
        count = 1
        for size in self.block_shape:
            count *= size
        return count * self.torch_dtype.itemsize


_Count = Annotated[int, Field(ge=0)]
_Size = Annotated[int, Field(ge=1)]


class _WireGeometry(BaseModel):
    """KVGeometry as the header carries it: every field present and of its type, sizes > 0."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model_signature: Annotated[str, Field(min_length=1)]
    num_layers: _Size
    num_kv_heads: _Size
    head_dim: _Size
    block_size: _Size
    dtype: str
    total_kv_heads: _Size | None = None
    kv_head_start: _Count = 0
    tensor_parallel_size: _Size = 1

    @model_validator(mode="after")
    def _heads_within_the_model(self) -> _WireGeometry:
        total = self.num_kv_heads if self.total_kv_heads is None else self.total_kv_heads
        if self.kv_head_start + self.num_kv_heads > total:
            raise ValueError(
                f"KV heads {self.kv_head_start}..{self.kv_head_start + self.num_kv_heads - 1} "
                f"are outside the model's total_kv_heads {total}"
            )
        return self


class _WireHeader(BaseModel):
    """The header's schema (header_checksum apart). Strict, so that a header which parses is
    exactly what `to_bytes` writes for the package it describes."""

    model_config = ConfigDict(strict=True, extra="forbid")
    request_id: Annotated[str, Field(min_length=1)]
    geometry: _WireGeometry
    prompt_token_ids: list[_Count]
    output_token_ids: list[_Count]
    num_computed_tokens: _Count
    sampling: dict[str, Any]
    num_blocks: _Count
    checksum_algorithm: str
    block_checksums: list[str]

    @model_validator(mode="after")
    def _one_checksum_per_block(self) -> _WireHeader:
        if len(self.block_checksums) != self.num_blocks:
            raise ValueError(
                f"{len(self.block_checksums)} block_checksums for num_blocks {self.num_blocks}"
            )
        return self


def _header_error(error: ValidationError) -> KVTransferError:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "header"
    return KVTransferError(f"KV package header field {where}: {first['msg']}")


def _parse_header(data: memoryview) -> tuple[_WireHeader, KVGeometry, str, int]:
    """The verified header of the wire bytes `data` (which may stop after it): its fields, the
    geometry, the checksum algorithm and where the blocks start."""
    if data[: len(MAGIC)] != MAGIC:
        raise KVTransferError("not a Tessera KV package (bad magic bytes)")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise KVChecksumError("KV package truncated before its header")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > len(data) - start:
        raise KVChecksumError(
            f"KV package truncated: header length {length}, {len(data) - start} bytes follow"
        )
    encoded = bytes(data[start : start + length])
    try:
        header = json.loads(encoded)
        if not isinstance(header, dict):
            raise KVChecksumError("KV package header is corrupted: not a JSON object")
        expected_header = header.pop("header_checksum", None)
        if not isinstance(expected_header, str):
            raise KVChecksumError("KV package header is corrupted: no header_checksum")
        algorithm = header.get("checksum_algorithm")
        if not isinstance(algorithm, str):
            raise KVTransferError("KV package header field checksum_algorithm: not a string")
        digest = _digest_function(algorithm)
        if digest(_canonical(header)) != expected_header:
            raise KVChecksumError("KV package header fails its checksum")
        if _canonical({**header, "header_checksum": expected_header}) != encoded:
            raise KVTransferError("KV package header is not in canonical JSON form")
    except (ValueError, RecursionError) as error:  # JSON, UTF-8 and int-size errors
        if isinstance(error, KVTransferError):
            raise
        raise KVChecksumError(f"KV package header is corrupted: {error}") from error
    try:
        wire = _WireHeader.model_validate(header)
    except ValidationError as error:
        raise _header_error(error) from None
    geometry = KVGeometry(**wire.geometry.model_dump())
    return wire, geometry, algorithm, start + length


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
    _verified: tuple[torch.Tensor, int, str, tuple[str, ...]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """The blocks object, its in-place version counter and the checksums when they last
    matched: lets `check_compatible` skip hashing a package `from_bytes` has just hashed (half
    a second per 128 MiB with blake2b). Any in-place torch write, a new tensor or new checksums
    make it stale."""

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
        digest = _digest_function(checksum_algorithm)
        blocks, checksums = _host_blocks(blocks, digest)
        package = cls(
            request_id=request_id,
            geometry=geometry,
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=list(output_token_ids),
            num_computed_tokens=num_computed_tokens,
            sampling=dict(sampling),
            blocks=blocks,
            checksum_algorithm=checksum_algorithm,
            block_checksums=checksums,
        )
        package._verified = package._verification()
        return package

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    def block_bytes(self, index: int) -> memoryview:
        """The raw bytes of one block (all layers, K then V), as they travel: a view of the
        blocks' host storage (no copy) when they are on the CPU and contiguous."""
        return _byte_view(self.blocks[index])

    def payload_view(self) -> memoryview:
        """All blocks' bytes in wire order, one view of their host storage (no copy for the
        contiguous CPU tensor `build` and `from_bytes` make)."""
        return _byte_view(self.blocks)

    def verify(self) -> None:
        """Raise KVChecksumError naming the first block whose bytes do not match."""
        checksums = self.block_checksums
        if not isinstance(checksums, list) or not all(isinstance(c, str) for c in checksums):
            raise KVChecksumError(f"{self.request_id}: block_checksums must be a list of strings")
        if self.checksum_algorithm == UNCHECKED and not checksums:
            return
        digest = _digest_function(self.checksum_algorithm)
        if len(checksums) != self.num_blocks:
            raise KVChecksumError(
                f"{self.request_id}: {len(self.block_checksums)} checksums for "
                f"{self.num_blocks} blocks"
            )
        for index, expected in enumerate(self.block_checksums):
            if digest(self.block_bytes(index)) != expected:
                raise KVChecksumError(f"{self.request_id}: block {index} fails its checksum")
        self._verified = self._verification()

    def _verification(self) -> tuple[torch.Tensor, int, str, tuple[str, ...]]:
        blocks = self.blocks
        return (blocks, blocks._version, self.checksum_algorithm, tuple(self.block_checksums))

    def _verified_unchanged(self) -> bool:
        if self._verified is None:
            return False
        blocks, version, algorithm, checksums = self._verified
        return (
            isinstance(self.block_checksums, list)
            and blocks is self.blocks
            and version == self.blocks._version
            and (algorithm, checksums) == (self.checksum_algorithm, tuple(self.block_checksums))
        )

    def check_compatible(self, geometry: KVGeometry) -> None:
        """Refuse a package made for another geometry (model, layout, dtype), whose blocks do
        not have the shape and dtype its geometry says, or whose checksums are stale.

        `from_bytes` guarantees all of this for a package off the wire; a package handed over
        in memory (or edited after it was built) gets the same checks here, before an engine
        takes a block for it.
        """
        theirs = self.geometry
        if not isinstance(theirs, KVGeometry):
            raise KVTransferError(f"{self.request_id}: geometry is not a KVGeometry")
        if theirs != geometry:
            differ = [
                f"{f.name} {getattr(theirs, f.name)!r} (engine: {getattr(geometry, f.name)!r})"
                for f in dataclasses.fields(KVGeometry)
                if getattr(theirs, f.name) != getattr(geometry, f.name)
            ]
            raise KVTransferError(
                f"package {self.request_id!r} is for another model or layout: " + ", ".join(differ)
            )
        blocks = self.blocks
        if not isinstance(blocks, torch.Tensor):
            raise KVTransferError(f"{self.request_id}: blocks are not a tensor")
        if blocks.dtype != geometry.torch_dtype:
            raise KVTransferError(
                f"{self.request_id}: blocks are {blocks.dtype}, its geometry says {geometry.dtype}"
            )
        if blocks.ndim != 1 + len(geometry.block_shape) or (
            tuple(blocks.shape[1:]) != geometry.block_shape
        ):
            raise KVTransferError(
                f"{self.request_id}: blocks have shape {tuple(blocks.shape)}, its geometry "
                f"says (n, {', '.join(map(str, geometry.block_shape))})"
            )
        if not self._verified_unchanged():
            self.verify()

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

    def header_bytes(self) -> bytes:
        """The wire bytes before the blocks: MAGIC, header length, checksummed header."""
        header = self._header()
        header["header_checksum"] = _digest_function(self.checksum_algorithm)(_canonical(header))
        encoded = _canonical(header)
        return MAGIC + _LENGTH.pack(len(encoded)) + encoded

    def to_bytes(self) -> bytes:
        return b"".join((self.header_bytes(), self.payload_view()))

    @classmethod
    def from_bytes(cls, data: bytes) -> KVPackage:
        """Parse and verify a package.

        Raises KVChecksumError when bytes do not match their checksums (or are cut short),
        KVTransferError for anything else malformed: never KeyError, TypeError or struct.error.
        The blocks are one copy of the payload (`data` may be read-only or reused).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise KVTransferError(f"a KV package is bytes, not {type(data).__name__}")
        return cls._parse(memoryview(data).cast("B"), None)

    @classmethod
    def from_parts(cls, prefix: Buffer, payload: bytearray) -> KVPackage:
        """Parse and verify a package received in two parts: `header_bytes()` and the blocks'
        bytes. `payload` is taken over: the blocks are a view of it (no copy), so the caller
        must not reuse it. Errors as `from_bytes`."""
        if not isinstance(prefix, bytes | bytearray | memoryview):
            raise KVTransferError(f"a KV package is bytes, not {type(prefix).__name__}")
        if not isinstance(payload, bytearray):
            raise KVTransferError(f"a KV payload is a bytearray, not {type(payload).__name__}")
        return cls._parse(memoryview(prefix).cast("B"), payload)

    @classmethod
    def payload_layout(cls, prefix: Buffer) -> tuple[int, int]:
        """(number of blocks, bytes per block) that the verified header `prefix` announces: a
        receiver sizes its buffer once and checks each block's length as it arrives. Errors as
        `from_bytes`."""
        if not isinstance(prefix, bytes | bytearray | memoryview):
            raise KVTransferError(f"a KV package is bytes, not {type(prefix).__name__}")
        wire, geometry, _, _ = _parse_header(memoryview(prefix).cast("B"))
        return wire.num_blocks, geometry.block_nbytes

    @classmethod
    def _parse(cls, data: memoryview, owned: bytearray | None) -> KVPackage:
        wire, geometry, algorithm, end = _parse_header(data)
        digest = _digest_function(algorithm)
        dtype, block_nbytes = geometry.torch_dtype, geometry.block_nbytes
        if owned is not None and len(data) != end:
            raise KVChecksumError(f"KV package header part has {len(data) - end} bytes after it")
        payload = memoryview(owned) if owned is not None else data[end:]
        if len(payload) != wire.num_blocks * block_nbytes:
            raise KVChecksumError(
                f"KV package payload has {len(payload)} bytes, header says "
                f"{wire.num_blocks} blocks of {block_nbytes}"
            )
        chunks = [
            payload[index * block_nbytes : (index + 1) * block_nbytes]
            for index in range(wire.num_blocks)
        ]
        for index, actual in enumerate(_digest_all(digest, chunks)):
            if actual != wire.block_checksums[index]:
                raise KVChecksumError(f"{wire.request_id}: block {index} fails its checksum")
        if payload:
            buffer = owned if owned is not None else bytearray(payload)
            raw = torch.frombuffer(buffer, dtype=torch.uint8)
            blocks = raw.view(dtype).reshape(wire.num_blocks, *geometry.block_shape)
        else:
            blocks = torch.empty((0, *geometry.block_shape), dtype=dtype)
        package = cls.from_wire(wire, geometry, blocks, algorithm)
        package._verified = package._verification()  # every block was hashed above
        return package

    @classmethod
    def from_wire(
        cls, wire: _WireHeader, geometry: KVGeometry, blocks: torch.Tensor, algorithm: str
    ) -> KVPackage:
        """The package a received header describes, around blocks that arrived on their own
        path (a TCP payload, a CUDA IPC copy); checking them is the caller's."""
        return cls(
            request_id=wire.request_id,
            geometry=geometry,
            prompt_token_ids=wire.prompt_token_ids,
            output_token_ids=wire.output_token_ids,
            num_computed_tokens=wire.num_computed_tokens,
            sampling=wire.sampling,
            blocks=blocks,
            checksum_algorithm=algorithm,
            block_checksums=wire.block_checksums,
        )


class IncomingPackage:
    """A package received block by block (the TCP transport's receiver), verified as it lands.

    The header is parsed and verified first; it sizes one buffer for all blocks, and each block
    is received straight into its slot (`block_buffer`, for `socket.recv_into`: no per-frame
    bytes object, no join). As soon as a block is complete (`block_arrived`) it is hashed on
    the checksum threads, so verifying block i overlaps receiving block i+1; `finish` waits for
    the last hashes and returns the package, its blocks a view of the buffer (no copy). The
    guarantees are `from_bytes`': every block's checksum, the header's, and the frame CRCs the
    sender put on each block (free when the package's own checksums are CRC-32 too).

    `pin_memory`: the buffer is page-locked (on a host with CUDA), so that the importing
    engine's copy to its GPU runs at the link's speed rather than a pageable copy's. `device`
    (a GPU; implies `pin_memory`): each block is also copied there, asynchronously, as soon as
    it has landed, and the package's blocks are that device tensor: the host-to-device copy
    overlaps the rest of the transfer instead of following it. The checks are of the host
    bytes, which are exactly the bytes copied.
    """

    def __init__(
        self, prefix: Buffer, pin_memory: bool = False, device: torch.device | None = None
    ) -> None:
        if not isinstance(prefix, bytes | bytearray | memoryview):
            raise KVTransferError(f"a KV package is bytes, not {type(prefix).__name__}")
        data = memoryview(prefix).cast("B")
        self.wire, self.geometry, self.algorithm, end = _parse_header(data)
        if end != len(data):
            raise KVChecksumError(f"KV package header part has {len(data) - end} bytes after it")
        self.num_blocks = self.wire.num_blocks
        self.block_nbytes = self.geometry.block_nbytes
        nbytes = self.num_blocks * self.block_nbytes
        on_gpu = device is not None and device.type == "cuda" and nbytes > 0
        if nbytes == 0:
            self._storage = torch.empty(0, dtype=torch.uint8)
        elif pin_memory or on_gpu:  # torch's caching host allocator recycles pinned buffers
            self._storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:  # pageable: a reused buffer spares the kernel a page fault per 4 KiB
            self._storage = torch.frombuffer(shared_pool.take(nbytes), dtype=torch.uint8)
        self._device_storage = (
            torch.empty(nbytes, dtype=torch.uint8, device=device) if on_gpu else None
        )
        self._view = self._storage.numpy().data.cast("B") if nbytes else memoryview(b"")
        self._digest = _digest_function(self.algorithm)
        self._parallel = self.num_blocks > 1 and nbytes >= _PARALLEL_MIN_BYTES
        self._checksums: list[concurrent.futures.Future[str | None]] = []
        self._frame_crcs: list[tuple[int, concurrent.futures.Future[int] | None]] = []

    def block_buffer(self, index: int) -> memoryview:
        """Where block `index` is to be written (exactly `block_nbytes` bytes)."""
        if not 0 <= index < self.num_blocks:
            raise KVChecksumError(
                f"KV block {index} beyond the {self.num_blocks} blocks the header announces"
            )
        return self._view[index * self.block_nbytes : (index + 1) * self.block_nbytes]

    def block_arrived(self, index: int, frame_crc: int) -> None:
        """Block `index` is complete in its buffer: start its checks. Blocks arrive in order."""
        if index != len(self._checksums):
            raise KVTransferError(
                f"KV package out of order: block {index} after {len(self._checksums)} blocks"
            )
        view = self.block_buffer(index)
        if self._device_storage is not None:
            span = slice(index * self.block_nbytes, (index + 1) * self.block_nbytes)
            self._device_storage[span].copy_(self._storage[span], non_blocking=True)
        own_crc = self.algorithm == "crc32"  # the package's checksum is the frame's CRC
        if self._parallel:
            pool = checksum_pool()
            self._checksums.append(pool.submit(self._digest, view))
            crc = None if own_crc else pool.submit(zlib.crc32, view)
        else:  # small packages: hashed in `finish`, on this thread
            self._checksums.append(_done(None))
            crc = None
        self._frame_crcs.append((frame_crc, crc))

    def pending(self) -> list[concurrent.futures.Future[Any]]:
        """The checks still running, for a caller that awaits them without blocking its loop."""
        futures: list[concurrent.futures.Future[Any]] = list(self._checksums)
        futures.extend(crc for _, crc in self._frame_crcs if crc is not None)
        return [future for future in futures if not future.done()]

    def finish(self) -> KVPackage:
        """The verified package; KVChecksumError naming the first bad block (package checksums
        first, then frame CRCs), or one saying how many blocks are missing."""
        wire = self.wire
        if len(self._checksums) != self.num_blocks:
            raise KVChecksumError(
                f"KV package ends after {len(self._checksums)} of {self.num_blocks} blocks"
            )
        for index, checksum in enumerate(self._checksums):
            actual = checksum.result()
            if actual is None:
                actual = self._digest(self.block_buffer(index))
            if actual != wire.block_checksums[index]:
                raise KVChecksumError(f"{wire.request_id}: block {index} fails its checksum")
        for index, (expected, crc) in enumerate(self._frame_crcs):
            if self.algorithm == "crc32":
                actual_crc = int(wire.block_checksums[index], 16)
            elif crc is not None:
                actual_crc = crc.result()
            else:
                actual_crc = zlib.crc32(self.block_buffer(index))
            if actual_crc != expected:
                raise KVChecksumError(f"KV frame BLOCK {index} fails its CRC-32")
        shape = (self.num_blocks, *self.geometry.block_shape)
        storage = self._storage
        if self._device_storage is not None:
            storage = self._device_storage
            torch.cuda.current_stream(storage.device).synchronize()  # the last blocks' copies
        blocks = storage.view(self.geometry.torch_dtype).reshape(shape)
        package = KVPackage.from_wire(wire, self.geometry, blocks, self.algorithm)
        package._verified = package._verification()  # every block was hashed above
        return package
