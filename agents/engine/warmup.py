"""Warm-up before serving: every CUDA graph captured and every Triton kernel variant compiled.

A Triton kernel is compiled once per distinct set of `tl.constexpr` values, on its first launch
with them; a CUDA graph bucket is captured on its first replay. Either, met for the first time
while serving, stalls the engine's step for up to seconds (a compile, a capture), so `tessera
serve` runs `warm_up` before `/ready` answers 200.

What varies at run time, and so must be covered:
- the decode graphs, one per batch-size bucket up to `max_num_seqs` (`DecodeGraphRunner`);
- the paged decode attention of steps that run outside a graph (decodes beside a prefill chunk,
  and every step of a tensor-parallel engine): its `PARTITION` and the merge kernel's
  `NUM_PARTS_PAD` follow the batch and the longest context (`decode_variant`). Every variant
  reachable with up to `max_num_seqs` decodes and contexts up to `max_model_len` is enumerated
  (`decode_variants`, pure) and launched once through the model, so a tensor-parallel engine's
  follower ranks compile it too;
- the paged prefill attention of a chunk with a cached prefix (`_paged_prefill_kernel`): its
  constexprs are fixed by the model, so one launch compiles it.
Integer arguments that vary with the batch (block-table and scratch strides) are excluded
from Triton's value specialisation in triton_kernels.py, so they add no variants.

On the CPU (no Triton, no graphs) there is nothing to compile: `warm_up` returns a report of
zeros, and the server's short warm-up generation is all that runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tessera.agents.engine import ops
from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
from tessera.agents.engine.kernel_variants import decode_variants

if TYPE_CHECKING:
    from tessera.agents.engine.engine import Engine


@dataclass(frozen=True)
class WarmUpReport:
    """What `warm_up` prepared (the server shows it on /ready)."""

    graph_batch_sizes: tuple[int, ...]
    """Decode batch buckets captured as CUDA graphs."""
    decode_kernel_variants: int
    """Paged decode attention variants (partition size, merge width) launched."""
    prefill_kernel_variants: int
    """Paged prefill attention variants launched."""
    seconds: float


def warm_up(engine: Engine) -> WarmUpReport:
    """Capture every decode graph and launch every reachable attention kernel variant once.

    The launches write only into the reserved KV block 0 (which padded graph rows point at
    and no request owns), so the engine's requests and cache are untouched."""
    started = time.perf_counter()
    graph_sizes: tuple[int, ...] = ()
    if engine.graphs is not None:
        engine.graphs.capture()
        graph_sizes = engine.graphs.batch_sizes
    decode = prefill = 0
    probe = torch.empty(0, device=engine.device)
    if ops.use_triton(probe):
        kernels = ops.triton_kernels()
        config = engine.config
        num_sms = kernels.multiprocessors(engine.device)
        variants = decode_variants(
            engine.engine_config.scheduler.max_num_seqs,
            config.num_key_value_heads,
            engine.max_model_len,
            num_sms,
            kernels.DECODE_TILE,
        )
        for batch, context in sorted(set(variants.values())):
            _decode_launch(engine, batch, context)
        decode = len(variants)
        group = config.num_attention_heads // config.num_key_value_heads
        if group & (group - 1) == 0 and group <= 64:  # where attention.py uses the kernel
            _prefill_launch(engine)
            prefill = 1
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    return WarmUpReport(graph_sizes, decode, prefill, time.perf_counter() - started)


def _decode_launch(engine: Engine, batch: int, context: int) -> None:
    """One forward of `batch` decode tokens, each attending to the first slot of block 0,
    with the grid sized for `context` (which fixes the variant)."""
    device = engine.device
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        slot_mapping=zeros,
        num_decode_tokens=batch,
        decode_block_tables=torch.zeros(batch, 1, dtype=torch.int32, device=device),
        decode_context_lens=torch.ones(batch, dtype=torch.int32, device=device),
        decode_max_context_len=context,
        decode_context_lens_host=[1] * batch,
    )
    engine.model.forward(zeros, zeros, meta, engine.kv_cache)


def _prefill_launch(engine: Engine) -> None:
    """One forward of a one-token chunk after one cached token, both in block 0: the paged
    prefill kernel's only variant for this model."""
    device = engine.device
    block_size = engine.kv_cache.block_size
    table = torch.zeros(engine.kv_cache.blocks_for_tokens(2), dtype=torch.long, device=device)
    span = PrefillSpan(start=0, num_tokens=1, num_cached=1, block_table=table)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([1 % block_size], dtype=torch.long, device=device),
        prefill_spans=[span],
    )
    engine.model.forward(
        torch.zeros(1, dtype=torch.long, device=device),
        torch.ones(1, dtype=torch.long, device=device),
        meta,
        engine.kv_cache,
    )
