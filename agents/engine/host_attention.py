"""Decode attention over a paged KV cache in host memory, on all of the host's cores at once.

Where it sits: an attention worker (attention_worker.py) holds an offloaded engine's KV in
DRAM and, per layer and sub-batch, attends the decode rows over it. The engine's own CPU path
(`attention.decode_attention`) calls torch's flash SDPA once per sequence, one after another;
each call parallelises over the KV heads only (8 for Llama-3-8B), so a 16-core host scanned
KV at ~16 GB/s, a fifth of its DRAM read bandwidth (bench/results/h200-2026-12-01).

Here the work is cut into items of (sequence, range of KV heads), balanced by bytes scanned
(context length x heads) over a pool of Python threads. The cut is a `DecodePlan`, built once
per step from the step's metadata and reused by every layer, which read the same blocks. Each
thread scans its shard with one of two kernels:

- "c": host_attention_kernel.c, built at first use with the system C compiler and called
  through ctypes (which releases the GIL): bf16 or fp32 rows read straight from the blocks,
  fp32 dot products and an online softmax. torch's CPU flash kernel reaches ~2 GB/s of KV per
  core on a 4-row GQA decode; this one is meant to reach the memory's rate.
- "sdpa": torch's flash SDPA per item, single-threaded (torch releases the GIL inside an op;
  its intra-op pool is set to one thread by the worker, or each call would start a team per
  thread): the same kernel on the same K/V views as `decode_attention`. The fallback where no
  compiler is found, the build fails, or its self-check disagrees with SDPA.

Outputs equal `decode_attention`'s to fp tolerance.

Prefill spans stay on the engine's path (`model.attend`): they are not the steady state of an
offloaded decode replica.
"""

from __future__ import annotations

import ctypes
import hashlib
import heapq
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tessera.agents.engine.attention import (
    AttentionMetadata,
    consecutive_first_blocks,
    sequence_decode_attention,
)

log = logging.getLogger(__name__)

Kernel = Literal["auto", "c", "sdpa"]
KERNEL_SOURCE = Path(__file__).with_name("host_attention_kernel.c")
KERNEL_FLAGS = (
    "-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
    "-fno-signed-zeros", "-fassociative-math",
)  # fmt: skip
"""Reassociation lets the compiler vectorise the dot products; infinities stay IEEE (the
online softmax starts from -inf), so not -ffast-math."""
C_DTYPES = (torch.bfloat16, torch.float32)


def c_supports(dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> bool:
    """The C kernel's limits (its register tiles and stack buffers); other shapes use SDPA."""
    return (
        dtype in C_DTYPES
        and group <= 8
        and head_dim % 32 == 0
        and head_dim <= 256
        and (block_size <= 64)
    )


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
    tables: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))
    """The sub-batch's block tables [rows, width] int64, contiguous (the C kernel's)."""
    shard_items: tuple[torch.Tensor, ...] = ()
    """Per shard, its items as int64 rows {row, context_len, head_first, head_end}."""

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
        shards = balance(items, threads)
        packed = tuple(
            torch.tensor(
                [[it.row, it.context_len, it.head_first, it.head_end] for it in shard],
                dtype=torch.int64,
            )
            for shard in shards
        )
        tables = meta.decode_block_tables.to(torch.int64).contiguous()
        return cls(shards, tables, packed)


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

    def __init__(self, threads: int, kernel: Kernel = "auto") -> None:
        """`kernel`: "c", "sdpa", or "auto" (the C kernel when it builds and checks out)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if kernel not in ("auto", "c", "sdpa"):
            raise ValueError(f"kernel must be one of auto, c, sdpa; got {kernel!r}")
        self.threads = threads
        self._lib = None if kernel == "sdpa" else c_kernel()
        if kernel == "c" and self._lib is None:
            raise RuntimeError("the C attention kernel did not build (see the log)")
        self.kernel = "sdpa" if self._lib is None else "c"
        self.last_kernel: str | None = None
        """The kernel the latest `decode` ran (a shape outside the C kernel's limits: SDPA)."""
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
        block_size, kv_heads, head_dim = k_cache.shape[1:]
        group = q.shape[1] // kv_heads
        if self._lib is not None and c_supports(k_cache.dtype, group, head_dim, block_size):
            self.last_kernel = "c"
            return self._decode_c(self._lib, q, k_cache, v_cache, plan, scale)
        self.last_kernel = "sdpa"
        out = torch.empty_like(q)
        futures = [
            self._pool.submit(_scan, shard, q, k_cache, v_cache, out, scale)
            for shard in plan.shards
        ]
        for future in futures:
            future.result()  # re-raises a scanner's error here
        return out

    def _decode_c(
        self,
        lib: ctypes.CDLL,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: DecodePlan,
        scale: float,
    ) -> torch.Tensor:
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the C attention kernel reads contiguous per-layer caches")
        queries = (q.float() * scale).contiguous()
        out = torch.empty_like(queries)
        function = lib.scan_bf16 if k_cache.dtype == torch.bfloat16 else lib.scan_f32
        block_size, kv_heads, head_dim = k_cache.shape[1:]
        group = q.shape[1] // kv_heads
        futures = [
            self._pool.submit(
                function,
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                block_size,
                kv_heads,
                head_dim,
                group,
                queries.data_ptr(),
                out.data_ptr(),
                items.data_ptr(),
                items.shape[0],
                plan.tables.data_ptr(),
                plan.tables.shape[1],
            )
            for items in plan.shard_items
        ]
        for future in futures:
            if future.result() != 0:  # c_supports is checked first: a kernel/limits mismatch
                raise ValueError(f"C attention kernel refused {group=} {head_dim=} {block_size=}")
        return out.to(q.dtype)

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
    """One thread's items, each through the engine's per-sequence CPU path."""
    for item in items:
        heads = slice(item.head_first, item.head_end)
        group = q.shape[1] // k_cache.shape[2]
        out[item.row, heads.start * group : heads.stop * group] = sequence_decode_attention(
            q[item.row],
            k_cache,
            v_cache,
            item.context_len,
            item.first_block,
            item.block_ids,
            heads,
            scale,
        )


# ---- the C kernel: built once per machine and source, checked against SDPA -------------------


@cache
def c_kernel() -> ctypes.CDLL | None:
    """The built kernel, or None (logged) where it cannot be built or disagrees with SDPA."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        log.warning("host attention: C kernel unavailable (%s); using SDPA", error)
        return None
    argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
    argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    for function in (lib.scan_bf16, lib.scan_f32):
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    problem = _self_check(lib)
    if problem:
        log.warning("host attention: C kernel disagrees with SDPA (%s); using SDPA", problem)
        return None
    return lib


def _build() -> Path:
    """Compile the kernel into a cache folder keyed by source, flags and machine (-march=native
    code runs only where it was built); a concurrent build by another process is harmless."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC) on PATH")
    source = KERNEL_SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join(KERNEL_FLAGS).encode() + platform.node().encode()
    ).hexdigest()[:16]
    folder = Path(os.environ.get("TESSERA_KERNEL_CACHE") or tempfile.gettempdir())
    built = folder / "tessera-kernels" / f"host_attention_{key}.so"
    if built.exists():
        return built
    built.parent.mkdir(parents=True, exist_ok=True)
    partial = built.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        [compiler, *KERNEL_FLAGS, "-o", str(partial), str(KERNEL_SOURCE), "-lm"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    os.replace(partial, built)
    return built


def _self_check(lib: ctypes.CDLL) -> str | None:
    """A small GQA case in both dtypes against SDPA: a miscompiled kernel is not used."""
    generator = torch.Generator().manual_seed(0)
    blocks, block_size, kv_heads, group, head_dim, length = 6, 4, 2, 4, 32, 19
    for dtype in C_DTYPES:
        k = torch.randn(blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
        v = torch.randn(blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
        q = torch.randn(1, kv_heads * group, head_dim, generator=generator).to(dtype)
        table = torch.tensor([[5, 1, 3, 2, 4]], dtype=torch.int64)
        items = torch.tensor([[0, length, 0, kv_heads]], dtype=torch.int64)
        queries = (q.float() * head_dim**-0.5).contiguous()
        out = torch.empty_like(queries)
        function = lib.scan_bf16 if dtype == torch.bfloat16 else lib.scan_f32
        function(
            k.data_ptr(), v.data_ptr(), block_size, kv_heads, head_dim, group,
            queries.data_ptr(), out.data_ptr(), items.data_ptr(), 1, table.data_ptr(), 5,
        )  # fmt: skip
        keys = k[table[0]].flatten(0, 1)[:length].float()
        values = v[table[0]].flatten(0, 1)[:length].float()
        expected = F.scaled_dot_product_attention(
            q.float().view(1, kv_heads, group, head_dim),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            scale=head_dim**-0.5,
        ).reshape(kv_heads * group, head_dim)
        error = float((out[0] - expected).abs().max())
        if not error < 1e-4:
            return f"{dtype}: max error {error:.2e}"
    return None
