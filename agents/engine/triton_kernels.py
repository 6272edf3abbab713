# mypy: allow-untyped-defs
# (Triton reads a kernel's annotations as specialisation hints, so its parameters carry none.)
"""Triton kernels for the CUDA path. Imported only where Triton is installed (see ops.py).

Each kernel has a torch twin in ops.py / attention.py that defines what it computes; the GPU
tests and bench/engine_bench.py check one against the other.

- `paged_decode_attention`: flash-decoding over paged KV. One program per (sequence, KV head,
  partition of the context); the program for a KV head computes all the query heads of its group
  at once (one tensor-core product per tile), so each K/V byte is read once. Partitions past a
  sequence's live context exit at once: only live blocks are read. A second kernel merges the
  partitions' softmax statistics; with a single partition the first kernel writes the output.
- `paged_prefill_attention`: causal attention of prompt chunks over their paged context (the
  cached prefix and the chunk itself), all spans in one launch. One program per (tile of query
  tokens of one span, KV head); its rows are the tile's tokens times the group's query heads,
  so GQA reads each K/V byte once per tile. Keys are read straight from the blocks: no gather.
- `rms_norm`: residual add + RMSNorm in one pass (the residual stream is read once).
- `rope_and_cache`: rotary embedding of Q and K in place, and the write of K and V into their
  cache slots, in one launch.
- `silu_and_mul`: SwiGLU's gate.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from tessera.agents.engine.kernel_variants import decode_partition, next_pow2

# Launch settings of the decode-attention kernel; the benchmark may sweep them.
DECODE_TILE = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2

# Integer arguments that change with the batch (a block table's width, the partition scratch's
# strides): Triton would otherwise compile a variant per value class (== 1, divisible by 16),
# which no warm-up could enumerate (warmup.py). Loads through them are int32 block ids and
# fp32 statistics, for which the alignment hint buys nothing.
_DECODE_VARYING = ("stride_btb", "stride_mb", "stride_mh", "stride_pb", "stride_ph", "stride_pp")
_REDUCE_VARYING = ("stride_mb", "stride_mh", "stride_pb", "stride_ph", "stride_pp")


@triton.jit
def _paged_kv(
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    t,
    t_mask,
    kv_head,
    d,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
):
    """K and V of tokens `t` of one KV head, read from the blocks of one block table
    ([TILE, HEAD_DIM] each; rows outside `t_mask` are 0)."""
    block = tl.load(table_ptr + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    slot = t % BLOCK_SIZE
    k = tl.load(
        k_cache_ptr
        + block[:, None] * stride_kb
        + slot[:, None] * stride_kt
        + kv_head * stride_kh
        + d[None, :],
        mask=t_mask[:, None],
        other=0.0,
    )
    v = tl.load(
        v_cache_ptr
        + block[:, None] * stride_vb
        + slot[:, None] * stride_vt
        + kv_head * stride_vh
        + d[None, :],
        mask=t_mask[:, None],
        other=0.0,
    )
    return k, v


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, EXACT_FP32: tl.constexpr):
    """One key tile of flash attention: the running max, sum and output after `k`, `v`."""
    if EXACT_FP32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if EXACT_FP32:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=_DECODE_VARYING)
def _paged_decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    max_logits_ptr,
    exp_sums_ptr,
    partial_ptr,
    out_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_mb,
    stride_mh,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PARTITION: tl.constexpr,
    DIRECT: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION
    if start < context_len:
        end = tl.minimum(start + PARTITION, context_len)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        g_mask = g < GROUP
        heads = kv_head * GROUP + g
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=g_mask[:, None],
            other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for t0 in range(start, end, TILE):
            t = t0 + tl.arange(0, TILE)
            t_mask = t < end
            k, v = _paged_kv(
                k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_btb,
                t, t_mask, kv_head, d,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE,
            )  # fmt: skip
            m_i, l_i, acc = _softmax_step(
                q, k, v, t_mask[None, :], m_i, l_i, acc, scale, EXACT_FP32
            )
        if DIRECT:
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )
        else:
            stat = seq * stride_mb + heads * stride_mh + part
            tl.store(max_logits_ptr + stat, m_i, mask=g_mask)
            tl.store(exp_sums_ptr + stat, l_i, mask=g_mask)
            tl.store(
                partial_ptr
                + seq * stride_pb
                + heads[:, None] * stride_ph
                + part * stride_pp
                + d[None, :],
                acc,
                mask=g_mask[:, None],
            )


@triton.jit(do_not_specialize=_REDUCE_VARYING)
def _paged_decode_reduce_kernel(
    max_logits_ptr,
    exp_sums_ptr,
    partial_ptr,
    context_lens_ptr,
    out_ptr,
    stride_mb,
    stride_mh,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_ob,
    stride_oh,
    PARTITION: tl.constexpr,
    NUM_PARTS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = tl.cdiv(context_len, PARTITION)
    p = tl.arange(0, NUM_PARTS_PAD)
    p_mask = p < num_parts
    stat = seq * stride_mb + head * stride_mh + p
    m = tl.load(max_logits_ptr + stat, mask=p_mask, other=float("-inf"))
    l = tl.load(exp_sums_ptr + stat, mask=p_mask, other=0.0)  # noqa: E741
    m_max = tl.max(m, 0)
    w = tl.where(p_mask, tl.exp(m - m_max), 0.0)
    total = tl.sum(l * w, 0)
    total = tl.where(total > 0, total, 1.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        partial_ptr + seq * stride_pb + head * stride_ph + p[:, None] * stride_pp + d[None, :],
        mask=p_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs the decode partitioning plans for (8 off CUDA, i.e. under the interpreter)."""
    return _multiprocessors(device.index or 0) if device.type == "cuda" else 8


def choose_partition(batch: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Tokens per partition (kernel_variants.decode_partition at this module's DECODE_TILE,
    which the benchmark may sweep)."""
    return decode_partition(batch, num_kv_heads, max_context_len, num_sms, DECODE_TILE)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    partition: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: [B, H, D] (strides free, last dim contiguous); caches: [blocks, block_size, KVH, D];
    block_tables: [B, W] int32; context_lens: [B] int32 (tokens to attend, the new one
    included). `max_context_len` bounds every context_len and fixes the grid, so a captured
    CUDA graph stays valid while contexts grow up to it.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if partition is None:
        num_sms = multiprocessors(q.device)
        partition = choose_partition(batch, num_kv_heads, max_context_len, num_sms)
    num_parts = max(1, -(-max_context_len // partition))
    out = torch.empty(batch, num_heads, head_dim, device=q.device, dtype=q.dtype)
    direct = num_parts == 1
    if direct:
        max_logits = exp_sums = partial = out  # unused by the kernel when DIRECT
    else:
        max_logits = torch.empty(batch, num_heads, num_parts, device=q.device, dtype=torch.float32)
        exp_sums = torch.empty_like(max_logits)
        partial = torch.empty(
            batch, num_heads, num_parts, head_dim, device=q.device, dtype=torch.float32
        )
    _paged_decode_partition_kernel[(batch, num_kv_heads, num_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        max_logits,
        exp_sums,
        partial,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        max_logits.stride(0),
        max_logits.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        TILE=DECODE_TILE,
        PARTITION=partition,
        DIRECT=direct,
        EXACT_FP32=q.dtype == torch.float32,
        num_warps=DECODE_NUM_WARPS,
        num_stages=DECODE_NUM_STAGES,
    )
    if not direct:
        _paged_decode_reduce_kernel[(batch, num_heads)](
            max_logits,
            exp_sums,
            partial,
            context_lens,
            out,
            max_logits.stride(0),
            max_logits.stride(1),
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            out.stride(0),
            out.stride(1),
            PARTITION=partition,
            NUM_PARTS_PAD=max(2, next_pow2(num_parts)),
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out


# Launch settings of the prefill-attention kernel: query rows (tokens x heads of a KV group)
# and keys per tile.
PREFILL_ROWS = 64
PREFILL_KEYS = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2


@triton.jit(do_not_specialize=("stride_bts",))
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    tile_span_ptr,
    tile_first_ptr,
    span_start_ptr,
    span_len_ptr,
    span_cached_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bts,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    KEYS: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    span = tl.load(tile_span_ptr + tile)
    first = tl.load(tile_first_ptr + tile)
    start = tl.load(span_start_ptr + span)
    length = tl.load(span_len_ptr + span)
    cached = tl.load(span_cached_ptr + span)
    r = tl.arange(0, TOKENS * GROUP)
    token = first + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_mask = token < length
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    query_pos = cached + token
    end = cached + tl.minimum(first + TOKENS, length)
    m_i = tl.full([TOKENS * GROUP], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS * GROUP], tl.float32)
    acc = tl.zeros([TOKENS * GROUP, HEAD_DIM], tl.float32)
    for t0 in range(0, end, KEYS):
        t = t0 + tl.arange(0, KEYS)
        t_mask = t < end
        k, v = _paged_kv(
            k_cache_ptr, v_cache_ptr, block_tables_ptr + span * stride_bts,
            t, t_mask, kv_head, d,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE,
        )  # fmt: skip
        visible = t_mask[None, :] & (t[None, :] <= query_pos[:, None])
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, EXACT_FP32)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


def prefill_tokens_per_tile(group: int) -> int:
    """Query tokens per program: PREFILL_ROWS rows of (token, query head of the group)."""
    return max(1, PREFILL_ROWS // group)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    span_starts: torch.Tensor,
    span_lens: torch.Tensor,
    span_cached: torch.Tensor,
    tile_spans: torch.Tensor,
    tile_firsts: torch.Tensor,
    scale: float,
) -> None:
    """Causal attention of prompt chunks over their whole paged context, written into `out`.

    q, out: [N, H, D] (the flattened batch; rows of the spans only are read and written);
    caches: [blocks, block_size, KVH, D], holding each span's own K/V already; block_tables:
    [S, W] int32; span_starts / span_lens / span_cached: [S] int32 (first row in the batch,
    tokens in the chunk, tokens cached before it); tile_spans / tile_firsts: [T] int32, one
    program's span and first chunk token (see `prefill_tiles`). The group size (H / KVH) must
    be a power of two no larger than PREFILL_ROWS.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    _paged_prefill_kernel[(tile_spans.shape[0], num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        tile_spans,
        tile_firsts,
        span_starts,
        span_lens,
        span_cached,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        TOKENS=prefill_tokens_per_tile(group),
        KEYS=PREFILL_KEYS,
        EXACT_FP32=q.dtype == torch.float32,
        num_warps=PREFILL_NUM_WARPS,
        num_stages=PREFILL_NUM_STAGES,
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the model dtype before the norm, as transformers does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    block = next_pow2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out,
        x.stride(0),
        (residual if residual is not None else x).stride(0),
        out.stride(0),
        residual_out.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return out, residual_out


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_tok,
    stride_slot_k,
    stride_slot_v,
    NUM_Q: tl.constexpr,
    NUM_KV: tl.constexpr,
    ROT_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
):
    # One program per token: all its Q and K heads rotated as one [heads, D/2] tile.
    tok = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + tok).to(tl.int64)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    h = tl.arange(0, ROT_PAD)[:, None]
    j = tl.arange(0, HALF)[None, :]
    rot_mask = h < NUM_Q + NUM_KV
    base = qkv_ptr + tok * stride_tok + h * HEAD_DIM
    x1 = tl.load(base + j, mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + j, mask=rot_mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + position * HALF + j)
    s = tl.load(sin_ptr + position * HALF + j)
    o1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
    o2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
    tl.store(base + j, o1, mask=rot_mask)
    tl.store(base + HALF + j, o2, mask=rot_mask)
    k_mask = rot_mask & (h >= NUM_Q)
    k_dst = k_cache_ptr + slot * stride_slot_k + (h - NUM_Q) * HEAD_DIM
    tl.store(k_dst + j, o1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + HALF + j, o2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    vh = tl.arange(0, KV_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    v_mask = vh < NUM_KV
    v = tl.load(
        qkv_ptr + tok * stride_tok + (NUM_Q + NUM_KV) * HEAD_DIM + vh * HEAD_DIM + d,
        mask=v_mask,
        other=0.0,
    )
    v_dst = v_cache_ptr + slot * stride_slot_v + vh * HEAD_DIM + d
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    tokens = qkv.shape[0]
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    rot_pad = next_pow2(num_q_heads + num_kv_heads)
    _rope_and_cache_kernel[(tokens,)](
        qkv,
        positions,
        cos,
        sin,
        slot_mapping,
        k_slots,
        v_slots,
        qkv.stride(0),
        k_slots.stride(0),
        v_slots.stride(0),
        NUM_Q=num_q_heads,
        NUM_KV=num_kv_heads,
        ROT_PAD=rot_pad,
        KV_PAD=next_pow2(num_kv_heads),
        HEAD_DIM=head_dim,
        HALF=head_dim // 2,
        num_warps=4 if rot_pad * head_dim >= 2048 else 1,
    )


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, n_inter, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_inter
    g = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * stride_in + n_inter + cols, mask=mask, other=0.0)
    act = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty)
    y = act.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_and_mul_kernel[(rows, -(-inter // block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


ATTENTION_KERNELS = {
    "paged_decode": _paged_decode_partition_kernel,
    "paged_decode_merge": _paged_decode_reduce_kernel,
    "paged_prefill": _paged_prefill_kernel,
}


def compiled_variants() -> dict[str, int]:
    """How many variants of each attention kernel this process has compiled (a bench compares
    the counts after warm-up with those after serving: equal means nothing compiled while
    serving). Reads the JIT cache: `device_caches` in Triton >= 3.1, `cache` before."""
    counts: dict[str, int] = {}
    for name, kernel in ATTENTION_KERNELS.items():
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:
            counts[name] = sum(len(entry[0]) for entry in caches.values())
        else:
            counts[name] = sum(len(entry) for entry in getattr(kernel, "cache", {}).values())
    return counts
