"""The run-time variants of the Triton attention kernels, enumerated (pure: no torch, no Triton).

Triton compiles a kernel once per distinct set of `tl.constexpr` values. The paged decode
attention's partition size and merge width follow the batch and the longest context
(`decode_variant`); `decode_variants` lists every one an engine can reach, which warmup.py
launches before serving. triton_kernels.py chooses its launches with the same functions, so the
two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class DecodeVariant:
    """The constexprs of one paged decode attention launch that vary at run time."""

    partition: int
    """Context tokens per program."""
    num_parts_pad: int
    """The merge kernel's width (a power of two >= 2); 0 when one partition covers the
    context and the first kernel writes the output itself (no merge)."""


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_partition(
    batch: int, num_kv_heads: int, max_context_len: int, num_sms: int, tile: int
) -> int:
    """Tokens per partition: enough programs to fill the chip (about 4 per SM), no smaller
    than a tile. Large batches get one partition per sequence and skip the merge kernel."""
    programs_per_partition = max(1, batch * num_kv_heads)
    parts = max(1, -(-4 * num_sms // programs_per_partition))
    partition = next_pow2(-(-max(1, max_context_len) // parts))
    return max(tile, partition)


def decode_variant(
    batch: int, num_kv_heads: int, max_context_len: int, num_sms: int, tile: int
) -> DecodeVariant:
    """The variant a launch with this batch and longest context compiles."""
    partition = decode_partition(batch, num_kv_heads, max_context_len, num_sms, tile)
    num_parts = max(1, -(-max_context_len // partition))
    return DecodeVariant(partition, 0 if num_parts == 1 else max(2, next_pow2(num_parts)))


def decode_variants(
    max_batch: int, num_kv_heads: int, max_context_len: int, num_sms: int, tile: int
) -> dict[DecodeVariant, tuple[int, int]]:
    """Every variant reachable with 1..max_batch decodes and longest contexts 1..max_context_len,
    each with one (batch, longest context) that launches it.

    Per batch the partition is `tile` for contexts up to `tile * parts`, then each power of two
    P above it for contexts in (P/2 * parts, P * parts]; within a partition's range the number
    of partitions takes every value between its ends, so the merge widths are the powers of two
    covering them. That walks O(max_batch * log(max_context_len)) ranges, not every context.
    """
    found: dict[DecodeVariant, tuple[int, int]] = {}
    for batch in range(1, max_batch + 1):
        parts = max(1, -(-4 * num_sms // max(1, batch * num_kv_heads)))
        partition = tile
        while True:
            low = 1 if partition == tile else (partition // 2) * parts + 1
            if low > max_context_len:
                break
            high = min(max_context_len, partition * parts)
            if low <= high:
                fewest, most = -(-low // partition), -(-high // partition)
                if fewest == 1:
                    found.setdefault(DecodeVariant(partition, 0), (batch, low))
                width = 2
                while width // 2 < most:
                    count = max(fewest, width // 2 + 1, 2)
                    if count <= min(width, most):
                        context = max(low, (count - 1) * partition + 1)
                        found.setdefault(DecodeVariant(partition, width), (batch, context))
                    width *= 2
            partition *= 2
    return found
