"""Attention over the paged KV cache: prefill spans and decode tokens.

A batch is flattened: decode tokens first (one per sequence), then prefill spans (a chunk of
one sequence's prompt each). Decode attention runs the Triton paged kernel on CUDA and a torch
loop elsewhere. A first chunk runs torch's scaled_dot_product_attention (flash on CUDA) on its
fresh K/V; later chunks (a cached prefix) run one Triton launch for all of them that reads the
prefix from its blocks on CUDA, and gather the prefix per span elsewhere.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tessera.agents.engine import ops
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class PrefillSpan:
    """A chunk of one sequence's tokens computed in this step."""

    start: int
    """Index of the chunk's first token in the flattened batch."""
    num_tokens: int
    num_cached: int
    """Tokens of the same sequence already in the cache before this chunk."""
    block_table: torch.Tensor
    """int64 block ids covering num_cached + num_tokens tokens, on the cache's device."""


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one forward pass."""

    slot_mapping: torch.Tensor
    """[N] int64 cache slot (block * block_size + offset) of every token of the batch."""
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None
    """[num_decode, W] int32 block ids, padded with 0 (the reserved block)."""
    decode_context_lens: torch.Tensor | None = None
    """[num_decode] int32 tokens each decode query attends to (itself included)."""
    decode_max_context_len: int = 0
    """Bound on decode_context_lens; fixes the kernel's grid (a CUDA graph's capacity)."""
    decode_context_lens_host: list[int] | None = None
    decode_first_blocks: list[int | None] | None = None
    """The torch decode path's: per decode row, its first block id when its blocks are
    consecutive (the cache is then read through a view), else None (gathered). Built by the
    first layer and reused by the others, which read the same blocks."""
    prefill_spans: list[PrefillSpan] = field(default_factory=list)
    paged_prefill: PagedPrefillBatch | None = None
    """The later chunks' launch arguments, built by the first layer that needs them."""


@dataclass
class PagedPrefillBatch:
    """Launch arguments of the paged prefill kernel for a forward pass's later chunks (spans
    with a cached prefix), the same for every layer: built once per forward."""

    block_tables: torch.Tensor
    span_starts: torch.Tensor
    span_lens: torch.Tensor
    span_cached: torch.Tensor
    tile_spans: torch.Tensor
    tile_firsts: torch.Tensor
    group: int


def _build_paged_prefill(
    spans: list[PrefillSpan], group: int, tokens_per_tile: int, device: torch.device
) -> PagedPrefillBatch:
    width = max(span.block_table.shape[0] for span in spans)
    tables = torch.zeros(len(spans), width, dtype=torch.int32, device=device)
    for index, span in enumerate(spans):
        tables[index, : span.block_table.shape[0]] = span.block_table
    tile_spans: list[int] = []
    tile_firsts: list[int] = []
    for index, span in enumerate(spans):
        for first in range(0, span.num_tokens, tokens_per_tile):
            tile_spans.append(index)
            tile_firsts.append(first)
    host = torch.tensor(
        [
            [s.start for s in spans],
            [s.num_tokens for s in spans],
            [s.num_cached for s in spans],
        ],
        dtype=torch.int32,
    ).to(device)
    tiles = torch.tensor([tile_spans, tile_firsts], dtype=torch.int32).to(device)
    return PagedPrefillBatch(tables, host[0], host[1], host[2], tiles[0], tiles[1], group)


_prefill_backends: list[SDPBackend] | None = None

CUDA_PREFILL_BACKENDS = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
"""Prefill attention on CUDA unless `set_prefill_sdpa_backends` says otherwise. cuDNN is left
out: torch prefers it on Hopper, and it builds an execution plan for every new sequence
length. Prompt lengths vary request by request, so in serving that planning cost hundreds of
milliseconds of CPU per step (bench/serving_validation.py --profile on an H100: 1.5 s of
`_cudnn_attention_forward` CPU time in 10 prefill steps, against 75 ms of its GPU time)."""


_CUDA_PREFILL_LIST = list(CUDA_PREFILL_BACKENDS)


def set_prefill_sdpa_backends(backends: SequenceOf[SDPBackend] | None) -> None:
    """Restrict prefill attention on CUDA to these SDPA backends (in priority order).

    The benchmark times the backends on the device and puts the fastest first; keep a general
    one (flash, efficient, math) in the list for shapes the fastest cannot take. None: the
    default, CUDA_PREFILL_BACKENDS.
    """
    global _prefill_backends
    _prefill_backends = list(backends) if backends else None


_SDPA_KERNEL_TAKES_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
"""Read once: `_restricted` runs for every prefill span of every layer."""


def _restricted(backends: list[SDPBackend]) -> contextlib.AbstractContextManager[None]:
    if _SDPA_KERNEL_TAKES_PRIORITY:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [L, H, D]; k, v: [T, H, D] -> [L, H, D]."""
    chosen = (_prefill_backends or _CUDA_PREFILL_LIST) if q.is_cuda else None
    with _restricted(chosen) if chosen else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
        )
    return out[0].transpose(0, 1)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: PrefillSpan,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one chunk (q, k, v: [L, heads, D]) over its sequence's context.

    A first chunk attends only to itself (fresh K/V, flash attention on CUDA); a later chunk
    attends to the cached prefix as well, gathered from the blocks it lives in.
    """
    group = q.shape[1] // k.shape[1]
    if span.num_cached == 0:
        return _sdpa(q, _expand_kv(k, group), _expand_kv(v, group), scale, causal=True)
    total = span.num_cached + span.num_tokens
    block_size = k_cache.shape[1]
    blocks = span.block_table[: -(-total // block_size)]
    keys = k_cache.index_select(0, blocks).flatten(0, 1)[:total]
    values = v_cache.index_select(0, blocks).flatten(0, 1)[:total]
    query_pos = torch.arange(span.num_cached, total, device=q.device)
    key_pos = torch.arange(total, device=q.device)
    mask = key_pos[None, :] <= query_pos[:, None]
    return _sdpa(
        q, _expand_kv(keys, group), _expand_kv(values, group), scale, causal=False, mask=mask
    )


def paged_prefill_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    meta: AttentionMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> list[PrefillSpan]:
    """Attention of every later chunk (a span with a cached prefix) in one Triton launch that
    reads the prefix from its blocks, written into `out` (q, out: the flattened batch [N, H, D]);
    returns the spans left to `prefill_attention`: first chunks, which flash attention serves
    from the fresh K/V, or every span where the kernel does not apply (no Triton, a group size
    that is not a power of two)."""
    group = q.shape[1] // k_cache.shape[2]
    later = [span for span in meta.prefill_spans if span.num_cached > 0]
    if not later or not ops.use_triton(q) or group & (group - 1) or group > 64:
        return meta.prefill_spans
    kernels = ops.triton_kernels()
    batch = meta.paged_prefill
    if batch is None or batch.group != group:
        batch = _build_paged_prefill(later, group, kernels.prefill_tokens_per_tile(group), q.device)
        meta.paged_prefill = batch
    kernels.paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        out,
        batch.block_tables,
        batch.span_starts,
        batch.span_lens,
        batch.span_cached,
        batch.tile_spans,
        batch.tile_firsts,
        scale,
    )
    return [span for span in meta.prefill_spans if span.num_cached == 0]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (q: [B, H, D]) over its paged context -> [B, H, D]."""
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    if ops.use_triton(q):
        return ops.triton_kernels().paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            meta.decode_max_context_len,
        )
    lens = meta.decode_context_lens_host
    if lens is None:
        lens = meta.decode_context_lens.tolist()
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    firsts = meta.decode_first_blocks
    if firsts is None:
        firsts = consecutive_first_blocks(meta.decode_block_tables, lens, block_size)
        meta.decode_first_blocks = firsts
    out = torch.empty_like(q)
    for i, context_len in enumerate(lens):
        first = firsts[i]
        index = None
        if first is None:
            index = meta.decode_block_tables[i, : -(-context_len // block_size)].long()
        out[i] = sequence_decode_attention(
            q[i], k_cache, v_cache, context_len, first, index, slice(0, kv_heads), scale
        )
    return out


def sequence_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_len: int,
    first_block: int | None,
    block_ids: torch.Tensor | None,
    heads: slice,
    scale: float,
) -> torch.Tensor:
    """One sequence's query heads of KV heads `heads` (q: [H, D], all its query heads) over its
    context: its blocks from `first_block` on when consecutive, else `block_ids` (int64)
    gathered -> [len(heads) x group, D]. The CPU decode path, and each attention-worker item.

    Each KV head a "head" of one batch row, its `group` query heads as query rows: grouped-query
    attention without copying K/V once per query head, through the 4-D flash kernel (3-D inputs
    or enable_gqa take the math path), which reads the strided cache views as they are: ~25x
    the expand-then-attend form's speed for a 4k-token bf16 context on one CPU core."""
    block_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[0] // kv_heads
    if block_ids is None:
        assert first_block is not None
        count = -(-context_len // block_size)
        keys = k_cache[first_block : first_block + count].flatten(0, 1)
        values = v_cache[first_block : first_block + count].flatten(0, 1)
    else:
        keys = k_cache.index_select(0, block_ids).flatten(0, 1)
        values = v_cache.index_select(0, block_ids).flatten(0, 1)
    width = heads.stop - heads.start
    return F.scaled_dot_product_attention(
        q[heads.start * group : heads.stop * group].view(1, width, group, head_dim),
        keys[:context_len, heads].transpose(0, 1).unsqueeze(0),
        values[:context_len, heads].transpose(0, 1).unsqueeze(0),
        scale=scale,
    ).reshape(width * group, head_dim)


def consecutive_first_blocks(
    tables: torch.Tensor, lens: list[int], block_size: int
) -> list[int | None]:
    """Per row of `tables` [B, W]: its first block id when the blocks covering `lens[i]` tokens
    are consecutive ids (as a fresh allocator hands them out), else None. One vectorised pass
    for the whole batch instead of a few small ops per sequence and layer."""
    table = tables.long()
    firsts: list[int] = table[:, 0].tolist()
    if table.shape[1] == 1:
        every: list[int | None] = list(firsts)
        return every
    counts = torch.tensor([-(-n // block_size) for n in lens], dtype=torch.long)
    step_one = (table[:, 1:] - table[:, :-1]) == 1
    beyond = torch.arange(table.shape[1] - 1)[None, :] >= (counts - 1)[:, None]
    consecutive: list[bool] = (step_one | beyond).all(dim=1).tolist()
    return [f if ok else None for f, ok in zip(firsts, consecutive, strict=True)]
