"""Checks of the engine's Triton kernels against float64 / torch references.

Used on CUDA by tests/test_engine_triton.py (marked gpu) and on the CPU through Triton's
interpreter (`TRITON_INTERPRET=1 python engine_kernel_checks.py`, run by the same test file in a
subprocess when Triton is installed). Every check draws fresh random inputs and poisons what the
kernel must not read (dead KV blocks, slots past the context) with NaN, so a kernel that reads
outside the live blocks fails.
"""

from __future__ import annotations

import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4
    # refuses; this restores the conversion it means (interpreter only, not the GPU path).
    from triton.runtime import interpreter as _interpreter

    _original_patch = _interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor: object, scope: object) -> None:
        _original_patch(tensor, scope)
        scope.set_attr(  # type: ignore[attr-defined]
            tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
        )

    _interpreter._patch_lang_tensor = _patch_lang_tensor

from tessera.agents.engine import ops
from tessera.agents.engine.kv_cache import RESERVED_BLOCKS


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def check_paged_attention(device: str, dtype: torch.dtype, seed: int = 0) -> list[str]:
    """Paged decode attention vs float64 softmax attention over the gathered context."""
    failures = []
    kernels = ops.triton_kernels()
    cases = [
        # batch, heads, kv_heads, head_dim, block_size, contexts, partition
        (3, 4, 2, 16, 4, [1, 7, 29], None),
        (3, 8, 2, 32, 4, [5, 33, 64], 16),
        (2, 4, 1, 16, 8, [70, 3], 32),
        (4, 32, 8, 128, 16, [1, 17, 300, 129], 64),
    ]
    generator = torch.Generator().manual_seed(seed)
    for batch, heads, kv_heads, head_dim, block_size, contexts, partition in cases:
        blocks_per_seq = [-(-c // block_size) for c in contexts]
        num_blocks = RESERVED_BLOCKS + sum(blocks_per_seq) + 3
        shape = (num_blocks, block_size, kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)
        order = (torch.randperm(num_blocks - RESERVED_BLOCKS, generator=generator) + 1).tolist()
        width = max(blocks_per_seq) + 2
        tables = torch.zeros(batch, width, dtype=torch.int32)
        q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
        reference = torch.empty(batch, heads, head_dim, dtype=torch.float64)
        scale = head_dim**-0.5
        for i, context in enumerate(contexts):
            ids = [order.pop() for _ in range(blocks_per_seq[i])]
            tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            keys = torch.randn(context, kv_heads, head_dim, generator=generator).to(dtype)
            values = torch.randn(context, kv_heads, head_dim, generator=generator).to(dtype)
            for t in range(context):
                k_cache[ids[t // block_size], t % block_size] = keys[t]
                v_cache[ids[t // block_size], t % block_size] = values[t]
            group = heads // kv_heads
            k64 = keys.double().repeat_interleave(group, dim=1)
            v64 = values.double().repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", q[i].double(), k64) * scale
            reference[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v64)
        out = kernels.paged_decode_attention(
            q.to(device),
            k_cache.to(device),
            v_cache.to(device),
            tables.to(device),
            torch.tensor(contexts, dtype=torch.int32, device=device),
            scale,
            max(contexts),
            partition=partition,
        )
        error = _relative_error(out.cpu(), reference)
        if not error < _tolerance(dtype):
            failures.append(
                f"paged_decode_attention {dtype} B{batch} H{heads}/{kv_heads} D{head_dim} "
                f"bs{block_size} ctx{contexts} part{partition}: rel err {error:.2e}"
            )
    return failures


def check_paged_prefill(device: str, dtype: torch.dtype, seed: int = 0) -> list[str]:
    """Paged prefill attention (later chunks over their cached prefix and themselves, several
    spans in one launch) vs float64 causal softmax attention; rows outside the spans must be
    left as they were."""
    from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
    from tessera.agents.engine.attention import paged_prefill_attention as run_paged

    failures = []
    cases = [
        # heads, kv_heads, head_dim, block_size, [(cached, chunk)] per span
        (4, 2, 16, 4, [(5, 3), (1, 9)]),
        (4, 1, 32, 8, [(70, 20), (9, 1)]),
        (2, 2, 16, 4, [(3, 70)]),
        (32, 8, 128, 16, [(300, 37), (16, 64)]),
    ]
    generator = torch.Generator().manual_seed(seed)
    for heads, kv_heads, head_dim, block_size, shapes in cases:
        totals = [cached + chunk for cached, chunk in shapes]
        blocks_per_span = [-(-t // block_size) for t in totals]
        num_blocks = RESERVED_BLOCKS + sum(blocks_per_span) + 3
        cache_shape = (num_blocks, block_size, kv_heads, head_dim)
        k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        order = (torch.randperm(num_blocks - RESERVED_BLOCKS, generator=generator) + 1).tolist()
        rows = 2 + sum(chunk for _, chunk in shapes)  # two rows before the spans (decodes)
        q = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
        sentinel = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
        reference = sentinel.double().clone()
        spans, start = [], 2
        scale = head_dim**-0.5
        group = heads // kv_heads
        for (cached, chunk), total, count in zip(shapes, totals, blocks_per_span, strict=True):
            ids = [order.pop() for _ in range(count)]
            keys = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
            values = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
            for t in range(total):
                k_cache[ids[t // block_size], t % block_size] = keys[t]
                v_cache[ids[t // block_size], t % block_size] = values[t]
            table = torch.tensor([*ids, 0, 0], dtype=torch.int64)
            spans.append(PrefillSpan(start, chunk, cached, table.to(device)))
            k64 = keys.double().repeat_interleave(group, dim=1)
            v64 = values.double().repeat_interleave(group, dim=1)
            q64 = q[start : start + chunk].double()
            scores = torch.einsum("lhd,thd->hlt", q64, k64) * scale
            visible = torch.arange(total)[None, :] <= (cached + torch.arange(chunk))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            reference[start : start + chunk] = torch.einsum("hlt,thd->lhd", scores.softmax(-1), v64)
            start += chunk
        out = sentinel.clone().to(device)
        meta = AttentionMetadata(slot_mapping=torch.zeros(rows, dtype=torch.int64))
        meta.prefill_spans = spans
        left = run_paged(q.to(device), out, meta, k_cache.to(device), v_cache.to(device), scale)
        error = _relative_error(out.cpu(), reference)
        if left or not error < _tolerance(dtype):
            failures.append(
                f"paged_prefill_attention {dtype} H{heads}/{kv_heads} D{head_dim} "
                f"bs{block_size} spans{shapes}: rel err {error:.2e}, {len(left)} spans left"
            )
    return failures


def check_elementwise(device: str, dtype: torch.dtype, seed: int = 0) -> list[str]:
    """rms_norm, rope_and_cache and silu_and_mul: Triton vs the torch definitions in ops."""
    failures = []
    kernels = ops.triton_kernels()
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    tolerance = _tolerance(dtype)
    ops.set_triton_enabled(False)
    try:
        for rows, cols in ((5, 64), (3, 96)):
            x, residual, weight = rand(rows, cols), rand(rows, cols), rand(cols)
            ref, ref_residual = ops.rms_norm(x, weight, 1e-5, residual)
            out, out_residual = kernels.rms_norm(x, weight, 1e-5, residual)
            for name, a, b in (("out", out, ref), ("residual", out_residual, ref_residual)):
                error = _relative_error(a.cpu(), b.cpu())
                if not error < tolerance:
                    failures.append(f"rms_norm {dtype} {rows}x{cols} {name}: rel err {error:.2e}")
            ref_plain, _ = ops.rms_norm(x, weight, 1e-5)
            out_plain, _ = kernels.rms_norm(x, weight, 1e-5, None)
            error = _relative_error(out_plain.cpu(), ref_plain.cpu())
            if not error < tolerance:
                failures.append(f"rms_norm {dtype} without residual: rel err {error:.2e}")

        heads, kv_heads, head_dim, tokens, num_blocks, block_size = 4, 2, 16, 6, 5, 4
        qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
        positions = torch.tensor([0, 3, 9, 10, 31, 2], device=device)
        angles = torch.arange(64, dtype=torch.float32)[:, None] * torch.rand(
            head_dim // 2, generator=generator
        )
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        slots = torch.tensor([4, 5, 6, 13, 19, 8], device=device)
        results = []
        for use_kernel in (False, True):
            k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            k_cache, v_cache = k_cache.to(device), v_cache.to(device)
            work = qkv.clone()
            run = kernels.rope_and_cache if use_kernel else ops.rope_and_cache
            run(work, positions, cos, sin, slots, k_cache, v_cache, heads, kv_heads, head_dim)
            results.append((work, k_cache, v_cache))
        for name, a, b in zip(("qkv", "k_cache", "v_cache"), results[1], results[0], strict=True):
            error = _relative_error(a.cpu(), b.cpu())
            if not error < tolerance:
                failures.append(f"rope_and_cache {dtype} {name}: rel err {error:.2e}")

        gate_up = rand(7, 2 * 1500)
        error = _relative_error(
            kernels.silu_and_mul(gate_up).cpu(), ops.silu_and_mul(gate_up).cpu()
        )
        if not error < tolerance:
            failures.append(f"silu_and_mul {dtype}: rel err {error:.2e}")
    finally:
        ops.set_triton_enabled(True)
    return failures


def run_all(device: str, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    failures: list[str] = []
    for dtype in dtypes:
        failures += check_paged_attention(device, dtype)
        failures += check_paged_prefill(device, dtype)
        failures += check_elementwise(device, dtype)
    return failures


if __name__ == "__main__":
    found = run_all("cpu", (torch.float32,))
    for failure in found:
        print("FAIL", failure)
    print("kernel checks:", "failed" if found else "passed")
    sys.exit(1 if found else 0)
