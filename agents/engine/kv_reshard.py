"""Re-shard a received KV package to the receiving engine's layout.

The planner may put prefill and decode on different device classes and tensor-parallel
degrees, and their engines may hold KV in different dtypes or block sizes; KV computed by one
is still the same model's KV for the other. A package says its layout in its geometry (which
of the model's KV heads its blocks hold, the source's degree, dtype, block size); this module
maps it to the receiver's, as pure functions of tensors (no engine, no I/O):

- `gather_heads`: the packages of a source's ranks, each with its slice of the heads, into one
  package with all of them;
- `split_heads`: all heads into one slice per receiving rank (Megatron keeps whole heads on a
  rank, rank r holding the r-th contiguous 1/TP of them: `TensorParallelShard.even`);
- `reshard`: one package to a target geometry: take the target's heads, re-block, cast.

What cannot be mapped is refused with a KVReshardError naming the field: another model
(model_signature), number of layers, head_dim or model KV heads. A package is verified
(checksums) before its blocks are touched, so corruption is never laundered into a fresh
package; the re-sharded package is built for import in this process (UNCHECKED: its blocks
were just verified and never travel again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tessera.agents.engine.kv_cache import blocks_for_tokens
from tessera.agents.engine.kv_transfer import UNCHECKED, KVGeometry, KVPackage, KVTransferError
from tessera.agents.engine.parallel import TensorParallelShard

HEADS_DIM = 4
"""Where the heads are in a package's blocks: [n, layers, 2, block_size, kv_heads, head_dim]."""

MUST_MATCH = ("model_signature", "num_layers", "head_dim")
"""Geometry fields no re-sharding can change (the model's KV heads are checked as well)."""


class KVReshardError(KVTransferError):
    """A package's KV cannot be mapped to the receiver's layout (another model or shape)."""


def head_slice(total_kv_heads: int, tensor_parallel_size: int, rank: int) -> slice:
    """The model KV heads rank `rank` of `tensor_parallel_size` holds (the weights' own split,
    `TensorParallelShard.even`)."""
    if tensor_parallel_size < 1 or total_kv_heads % tensor_parallel_size:
        raise KVReshardError(
            f"tensor_parallel_size {tensor_parallel_size} does not divide the model's "
            f"{total_kv_heads} KV heads"
        )
    try:
        return TensorParallelShard(rank, tensor_parallel_size).even(total_kv_heads)
    except ValueError as error:  # the rank outside [0, size)
        raise KVReshardError(str(error)) from None


def rank_geometry(geometry: KVGeometry, tensor_parallel_size: int, rank: int) -> KVGeometry:
    """The geometry of rank `rank`'s slice of `geometry`'s (all) heads."""
    if not geometry.holds_all_heads:
        raise KVReshardError("rank_geometry takes a geometry that holds all the model's KV heads")
    heads = head_slice(geometry.model_kv_heads, tensor_parallel_size, rank)
    return dataclasses.replace(
        geometry,
        num_kv_heads=heads.stop - heads.start,
        total_kv_heads=geometry.model_kv_heads,
        kv_head_start=heads.start,
        tensor_parallel_size=tensor_parallel_size,
    )


def split_heads(blocks: torch.Tensor, tensor_parallel_size: int) -> list[torch.Tensor]:
    """Blocks with all KV heads, as one contiguous tensor per receiving rank, rank order."""
    total = int(blocks.shape[HEADS_DIM])
    return [
        blocks[:, :, :, :, head_slice(total, tensor_parallel_size, rank)].contiguous()
        for rank in range(tensor_parallel_size)
    ]


def _refuse_mismatch(theirs: KVGeometry, ours: KVGeometry, what: str) -> None:
    for name in MUST_MATCH:
        if getattr(theirs, name) != getattr(ours, name):
            raise KVReshardError(
                f"KV package field {name} {getattr(theirs, name)!r} differs from the {what}'s "
                f"{getattr(ours, name)!r}: no re-sharding maps it"
            )
    if theirs.model_kv_heads != ours.model_kv_heads:
        raise KVReshardError(
            f"KV package field total_kv_heads {theirs.model_kv_heads} differs from the {what}'s "
            f"{ours.model_kv_heads}: no re-sharding maps it"
        )


def _verified(package: KVPackage) -> None:
    """Raise unless the package's blocks match its own geometry and checksums."""
    if not isinstance(package, KVPackage):
        raise KVTransferError(f"a KV package, not {type(package).__name__}")
    package.check_compatible(package.geometry)


def gather_heads(packages: Sequence[KVPackage]) -> KVPackage:
    """One package with all KV heads from the packages of one request's source ranks (any
    order; together they must hold every head once, with the same request and tokens)."""
    if not packages:
        raise KVReshardError("gather_heads needs at least one package")
    for package in packages:
        _verified(package)
    ordered = sorted(packages, key=lambda p: p.geometry.kv_head_start)
    first = ordered[0]
    expected = 0
    for package in ordered:
        geometry = package.geometry
        _refuse_mismatch(geometry, first.geometry, "first shard")
        for name in ("block_size", "dtype"):
            if getattr(geometry, name) != getattr(first.geometry, name):
                raise KVReshardError(
                    f"shards differ in {name}: {getattr(geometry, name)!r} and "
                    f"{getattr(first.geometry, name)!r}"
                )
        if geometry.kv_head_start != expected:
            raise KVReshardError(
                f"shards of {first.request_id!r} hold KV heads from {geometry.kv_head_start}, "
                f"expected {expected}: a rank's package is missing or repeated"
            )
        expected += geometry.num_kv_heads
        same = (
            package.request_id == first.request_id
            and package.prompt_token_ids == first.prompt_token_ids
            and package.output_token_ids == first.output_token_ids
            and package.num_computed_tokens == first.num_computed_tokens
            and package.num_blocks == first.num_blocks
        )
        if not same:
            raise KVReshardError(
                f"shards differ in request, tokens or blocks ({package.request_id!r}, "
                f"{first.request_id!r}): not one request's KV"
            )
    if expected != first.geometry.model_kv_heads:
        raise KVReshardError(
            f"shards of {first.request_id!r} hold {expected} of the model's "
            f"{first.geometry.model_kv_heads} KV heads"
        )
    blocks = torch.cat([p.blocks for p in ordered], dim=HEADS_DIM).contiguous()
    geometry = dataclasses.replace(
        first.geometry, num_kv_heads=expected, total_kv_heads=None, kv_head_start=0
    )
    return _rebuilt(first, geometry, blocks)


def reblock(
    blocks: torch.Tensor, num_tokens: int, block_size: int, new_block_size: int
) -> torch.Tensor:
    """The first `num_tokens` token slots of `blocks` (block size `block_size`) in blocks of
    `new_block_size`, the last one's unused slots zero."""
    n, layers, two, size, heads, head_dim = blocks.shape
    if size != block_size:
        raise KVReshardError(f"blocks have block_size {size}, not {block_size}")
    if blocks_for_tokens(num_tokens, block_size) != n:
        raise KVReshardError(
            f"{n} blocks of {block_size} slots for {num_tokens} tokens: re-blocking takes a "
            "whole request's blocks"
        )
    count = blocks_for_tokens(num_tokens, new_block_size)
    tokens = blocks.permute(1, 2, 0, 3, 4, 5).reshape(layers, two, n * size, heads, head_dim)
    out = tokens.new_zeros(layers, two, count * new_block_size, heads, head_dim)
    out[:, :, :num_tokens] = tokens[:, :, :num_tokens]
    out = out.reshape(layers, two, count, new_block_size, heads, head_dim)
    return out.permute(2, 0, 1, 3, 4, 5).contiguous()


def reshard(package: KVPackage, target: KVGeometry) -> KVPackage:
    """`package` in the layout of `target` (a receiving engine's `kv_geometry`): its heads,
    block size and dtype. The package itself when nothing but the source's degree differs (no
    copy). Raises KVReshardError for what cannot be mapped, KVTransferError (or its
    KVChecksumError) for a package that does not match its own geometry or checksums."""
    _verified(package)
    source = package.geometry
    _refuse_mismatch(source, target, "receiver")
    if target.kv_head_start + target.num_kv_heads > target.model_kv_heads:
        raise KVReshardError(
            f"target KV heads from {target.kv_head_start}, {target.num_kv_heads} of them, "
            f"exceed the model's {target.model_kv_heads}"
        )
    lo = target.kv_head_start - source.kv_head_start
    hi = lo + target.num_kv_heads
    if lo < 0 or hi > source.num_kv_heads:
        raise KVReshardError(
            f"package {package.request_id!r} holds KV heads {source.kv_head_start}.."
            f"{source.kv_head_start + source.num_kv_heads - 1}, the receiver needs "
            f"{target.kv_head_start}..{target.kv_head_start + target.num_kv_heads - 1}: "
            "gather the source ranks' packages first (gather_heads)"
        )
    layout_changes = (
        (lo, hi) != (0, source.num_kv_heads)
        or source.block_size != target.block_size
        or source.dtype != target.dtype
    )
    if not layout_changes:
        if source == target:
            return package
        relabeled = dataclasses.replace(package, geometry=target)
        relabeled._verified = package._verified  # the same blocks and checksums, just verified
        return relabeled
    blocks = package.blocks
    if (lo, hi) != (0, source.num_kv_heads):
        blocks = blocks[:, :, :, :, lo:hi]
    if source.block_size != target.block_size:
        blocks = reblock(blocks, package.num_computed_tokens, source.block_size, target.block_size)
    blocks = blocks.to(target.torch_dtype).contiguous()
    return _rebuilt(package, target, blocks)


def _rebuilt(package: KVPackage, geometry: KVGeometry, blocks: torch.Tensor) -> KVPackage:
    """A package of `package`'s request with new blocks, for import in this process."""
    return KVPackage(
        request_id=package.request_id,
        geometry=geometry,
        prompt_token_ids=list(package.prompt_token_ids),
        output_token_ids=list(package.output_token_ids),
        num_computed_tokens=package.num_computed_tokens,
        sampling=dict(package.sampling),
        blocks=blocks,
        checksum_algorithm=UNCHECKED,
        block_checksums=[],
    )
