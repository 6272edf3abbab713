"""Decode attention over a paged KV cache in host memory, on all of the host's cores at once.

Where it sits: an attention worker (attention_worker.py) holds an offloaded engine's KV in
DRAM and, per layer and sub-batch, attends the decode rows over it. The engine's own CPU path
(`attention.decode_attention`) calls torch's flash SDPA once per sequence, one after another;
each call parallelises over the KV heads only (8 for Llama-3-8B), so a 16-core host scanned
KV at ~16 GB/s, a fifth of its DRAM read bandwidth (bench/results/h200-2026-12-01).

Here the work is cut into items of (sequence, range of KV heads), balanced by bytes scanned
(context length x heads) over a pool of Python threads, each running single-threaded SDPA
(torch releases the GIL inside an op, so the threads scan in parallel; torch's own intra-op
pool is set to one thread by the worker, or each call would start a team per thread). The cut
is a `DecodePlan`, built once per step from the step's metadata and reused by every layer,
which read the same blocks. Outputs equal `decode_attention`'s: the same kernel on the same
K/V views, per KV head instead of per sequence.

Prefill spans stay on the engine's path (`model.attend`): they are not the steady state of an
offloaded decode replica.
"""

from __future__ import annotations

import heapq
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tessera.agents.engine.attention import AttentionMetadata, consecutive_first_blocks

ITEMS_PER_THREAD = 4
"""Head ranges are cut until there are about this many items per thread (when the batch has
fewer sequences than that): enough for the balance to even out uneven context lengths, few
enough that per-item overhead (a few view ops under the GIL) stays small."""


@dataclass(frozen=True)
class ScanItem:
    """One sequence's attention over KV heads [head_first, head_end)."""

    row: int
    context_len: int
    head_first: int
    head_end: int
    first_block: int | None
    """Its blocks' first id when they are consecutive (read through a view), else None."""
    block_ids: torch.Tensor | None
    """The blocks to gather when they are not consecutive (int64), else None."""

    @property
    def cost(self) -> int:
        return self.context_len * (self.head_end - self.head_first)


@dataclass(frozen=True)
class DecodePlan:
    """Which items each pool thread scans for one sub-batch (the same for every layer)."""

    shards: tuple[tuple[ScanItem, ...], ...]

    @classmethod
    def build(
        cls, meta: AttentionMetadata, block_size: int, kv_heads: int, threads: int
    ) -> DecodePlan:
        """Items balanced over `threads` shards, longest first onto the least loaded shard
        (LPT: within 4/3 of the best balance)."""
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        lens = meta.decode_context_lens_host
        if lens is None:
            lens = [int(n) for n in meta.decode_context_lens.tolist()]
        firsts = meta.decode_first_blocks
        if firsts is None:
            firsts = consecutive_first_blocks(meta.decode_block_tables, lens, block_size)
            meta.decode_first_blocks = firsts
        splits = head_splits(len(lens), kv_heads, threads)
        items: list[ScanItem] = []
        for row, (context_len, first) in enumerate(zip(lens, firsts, strict=True)):
            count = -(-context_len // block_size)
            if first is None:  # gathered: one item, so that its blocks are copied once
                ids = meta.decode_block_tables[row, :count].long()
                items.append(ScanItem(row, context_len, 0, kv_heads, None, ids))
                continue
            step = kv_heads // splits
            for head in range(0, kv_heads, step):
                items.append(ScanItem(row, context_len, head, head + step, first, None))
        return cls(balance(items, threads))


def head_splits(num_sequences: int, kv_heads: int, threads: int) -> int:
    """Into how many head ranges each sequence is cut: a divisor of `kv_heads`, the smallest
    that gives about ITEMS_PER_THREAD items per thread."""
    wanted = math.ceil(ITEMS_PER_THREAD * threads / max(1, num_sequences))
    for splits in range(1, kv_heads + 1):
        if kv_heads % splits == 0 and splits >= wanted:
            return splits
    return kv_heads


def balance(items: list[ScanItem], shards: int) -> tuple[tuple[ScanItem, ...], ...]:
    """Longest-processing-time-first assignment of items to `shards` lists."""
    loads: list[tuple[int, int]] = [(0, index) for index in range(shards)]
    assigned: list[list[ScanItem]] = [[] for _ in range(shards)]
    for item in sorted(items, key=lambda it: -it.cost):
        load, index = heapq.heappop(loads)
        assigned[index].append(item)
        heapq.heappush(loads, (load + item.cost, index))
    return tuple(tuple(shard) for shard in assigned if shard)


class HostAttention:
    """A pool of `threads` scanners of decode attention (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="host-attention")

    def plan(self, meta: AttentionMetadata, block_size: int, kv_heads: int) -> DecodePlan:
        return DecodePlan.build(meta, block_size, kv_heads, self.threads)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: DecodePlan,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, heads, D] (one query per sequence) over its paged context -> [B, heads, D]."""
        out = torch.empty_like(q)
        futures = [
            self._pool.submit(_scan, shard, q, k_cache, v_cache, out, scale)
            for shard in plan.shards
        ]
        for future in futures:
            future.result()  # re-raises a scanner's error here
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _scan(
    items: tuple[ScanItem, ...],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> None:
    """One thread's items: grouped-query attention per KV-head range through the 4-D flash
    kernel, which reads the strided cache views as they are (decode_attention's form)."""
    block_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    for item in items:
        count = -(-item.context_len // block_size)
        if item.block_ids is None:
            assert item.first_block is not None
            keys = k_cache[item.first_block : item.first_block + count].flatten(0, 1)
            values = v_cache[item.first_block : item.first_block + count].flatten(0, 1)
        else:
            keys = k_cache.index_select(0, item.block_ids).flatten(0, 1)
            values = v_cache.index_select(0, item.block_ids).flatten(0, 1)
        heads = slice(item.head_first, item.head_end)
        queries = slice(item.head_first * group, item.head_end * group)
        width = item.head_end - item.head_first
        out[item.row, queries] = F.scaled_dot_product_attention(
            q[item.row, queries].view(1, width, group, head_dim),
            keys[: item.context_len, heads].transpose(0, 1).unsqueeze(0),
            values[: item.context_len, heads].transpose(0, 1).unsqueeze(0),
            scale=scale,
        ).reshape(width * group, head_dim)
