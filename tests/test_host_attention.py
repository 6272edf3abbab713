"""The attention worker's batched decode attention (host_attention.py) against the engine's.

Random paged caches with uneven context lengths, sequences whose blocks are consecutive and
sequences whose blocks are scattered (as after churn), GQA groups of 1 and 4, fp32 and bf16,
both kernels (the C kernel, built here with the system compiler, and SDPA per item): the
pool's output equals `decode_attention`'s; shapes outside the C kernel's limits fall back to
SDPA; the plan covers every (sequence, KV head) once and balances the bytes scanned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from tessera.agents.engine.attention import AttentionMetadata, decode_attention
from tessera.agents.engine.host_attention import (
    DecodePlan,
    HostAttention,
    ScanItem,
    balance,
    c_supports,
    head_splits,
)

BLOCK_SIZE = 4


def paged_batch(
    lens: list[int], kv_heads: int, group: int, dtype: torch.dtype, seed: int, head_dim: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q, k_cache, v_cache and metadata: even rows get consecutive blocks, odd rows a random
    permutation of theirs (non-consecutive, not ascending), block 0 left reserved."""
    generator = torch.Generator().manual_seed(seed)
    counts = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = 1 + sum(counts) + 3
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=generator)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=generator)
    width = max(counts)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    next_block = 1
    for row, count in enumerate(counts):
        ids = torch.arange(next_block, next_block + count, dtype=torch.int32)
        if row % 2 and count > 1:
            ids = ids[torch.randperm(count, generator=generator)]
            if bool((ids[1:] - ids[:-1] == 1).all()):
                ids = ids.flip(0)
        tables[row, :count] = ids
        next_block += count + (row % 3 == 0)  # gaps between sequences too
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        num_decode_tokens=len(lens),
        decode_block_tables=tables,
        decode_context_lens=torch.tensor(lens, dtype=torch.int32),
        decode_max_context_len=max(lens),
        decode_context_lens_host=list(lens),
    )
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta


def fresh(meta: AttentionMetadata) -> AttentionMetadata:
    """The same metadata without the first-block cache a previous call left on it."""
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping,
        num_decode_tokens=meta.num_decode_tokens,
        decode_block_tables=meta.decode_block_tables,
        decode_context_lens=meta.decode_context_lens,
        decode_max_context_len=meta.decode_max_context_len,
        decode_context_lens_host=meta.decode_context_lens_host,
    )


@pytest.fixture(params=["c", "sdpa"])
def pool(request: pytest.FixtureRequest) -> Iterator[HostAttention]:
    host = HostAttention(threads=3, kernel=request.param)
    yield host
    host.close()


@pytest.mark.parametrize(
    ("lens", "kv_heads", "group", "dtype", "head_dim"),
    [
        ([5, 17, 9, 30, 12, 3, 1, 64], 2, 4, torch.float32, 32),
        ([1, 4, 5, 33], 4, 1, torch.float32, 64),
        ([40], 8, 4, torch.float32, 128),
        ([7, 19, 50, 2, 26], 2, 4, torch.bfloat16, 128),
        ([5, 17, 9, 30], 2, 4, torch.float32, 16),  # outside the C kernel's limits: SDPA
        ([3, 9], 1, 16, torch.float32, 32),  # a group of 16: SDPA too
    ],
)
def test_equals_decode_attention(
    pool: HostAttention,
    lens: list[int],
    kv_heads: int,
    group: int,
    dtype: torch.dtype,
    head_dim: int,
) -> None:
    q, k_cache, v_cache, meta = paged_batch(lens, kv_heads, group, dtype, len(lens), head_dim)
    scale = head_dim**-0.5
    expected = decode_attention(q, k_cache, v_cache, fresh(meta), scale)
    plan = pool.plan(fresh(meta), BLOCK_SIZE, kv_heads)
    got = pool.decode(q, k_cache, v_cache, plan, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    again = pool.decode(q, k_cache, v_cache, plan, scale)  # the plan serves every layer
    assert torch.equal(again, got)


def test_the_c_kernel_builds_and_is_chosen() -> None:
    host = HostAttention(threads=1)
    try:
        assert host.kernel == "c"  # a compiler is part of the dev setup
        assert c_supports(torch.bfloat16, 4, 128, 16)  # Llama-3-8B's shape
        assert not c_supports(torch.float16, 4, 128, 16)
        assert not c_supports(torch.bfloat16, 4, 16, 16)
    finally:
        host.close()


def test_scattered_rows_are_gathered_once(pool: HostAttention) -> None:
    meta = paged_batch([9, 30, 12, 21], 8, 4, torch.float32, seed=1)[3]
    plan = pool.plan(meta, BLOCK_SIZE, 8)
    items = [item for shard in plan.shards for item in shard]
    scattered = [item for item in items if item.block_ids is not None]
    assert {item.row for item in scattered} == {1, 3}
    assert all((item.head_first, item.head_end) == (0, 8) for item in scattered)
    assert all(item.first_block is not None for item in items if item.row in (0, 2))


@pytest.mark.parametrize("threads", [1, 2, 5, 16])
def test_plan_covers_every_head_once(threads: int) -> None:
    lens = [3, 100, 7, 64, 1, 18, 250]
    _, _, _, meta = paged_batch(lens, 8, 4, torch.float32, seed=threads)
    plan = DecodePlan.build(meta, BLOCK_SIZE, 8, threads)
    assert 1 <= len(plan.shards) <= threads
    covered: Counter[tuple[int, int]] = Counter()
    for shard in plan.shards:
        for item in shard:
            assert item.context_len == lens[item.row]
            covered.update((item.row, head) for head in range(item.head_first, item.head_end))
    assert covered == Counter((row, head) for row in range(len(lens)) for head in range(8))


def test_balance_is_within_lpt_bound() -> None:
    items = [ScanItem(row, n, 0, 1, 1, None) for row, n in enumerate([9, 7, 6, 5, 5, 4, 4, 3, 1])]
    shards = balance(items, 3)
    loads = [sum(item.cost for item in shard) for shard in shards]
    best = -(-sum(loads) // 3)  # 15: no assignment does better
    assert max(loads) <= best * 4 / 3
    assert sorted(item.row for shard in shards for item in shard) == list(range(9))


def test_head_splits_divide_the_heads() -> None:
    assert head_splits(256, 8, 16) == 1  # enough sequences: whole sequences per item
    assert head_splits(16, 8, 16) == 4  # 64 items for 16 threads
    assert head_splits(1, 8, 16) == 8  # never more ranges than heads
    assert head_splits(3, 6, 4) == 6  # a divisor of 6 that reaches 16 / 3
    assert all(8 % head_splits(n, 8, t) == 0 for n in range(1, 40) for t in (1, 3, 16))


def test_threads_and_kernel_are_checked() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        HostAttention(threads=0)
    with pytest.raises(ValueError, match="kernel must be one of auto, c, sdpa"):
        HostAttention(threads=1, kernel="avx")  # type: ignore[arg-type]
