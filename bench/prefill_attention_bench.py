"""Prefill attention of a prompt chunk over its cached prefix: the paged Triton kernel against
the gather path it replaces, on one GPU.

For each model shape (DistServe's 13B with full multi-head attention; Llama-3-8B's grouped
queries) and each prefix length, one layer's attention of a 512-token chunk is timed three ways:
- `gather`: the prefix gathered from its blocks, then masked SDPA (the path before the kernel);
- `paged`: the Triton kernel reading the blocks (attention.paged_prefill_attention);
- `flash-first`: flash attention of a first chunk of the same size (no prefix), for scale.
Before timing, the kernel's output is compared with the gather path's on the same inputs. The
roofline is the bytes the chunk must read (its Q, the K/V of prefix and chunk) over the copy
bandwidth measured here, or its FLOPs over the measured bf16 matmul rate, whichever is larger.

    python bench/prefill_attention_bench.py --out bench/results/prefill_attention_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from tessera.agents.engine.attention import (
    AttentionMetadata,
    PrefillSpan,
    paged_prefill_attention,
    prefill_attention,
)

SHAPES = {"13b-mha": (40, 40, 128), "llama3-8b": (32, 8, 128)}
BLOCK_SIZE = 16


def timed_ms(fn: Any, repeats: int = 50) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=repeats, return_mode="median"))


def ceilings() -> tuple[float, float]:
    """Copy bandwidth (bytes read + written per s) and bf16 matmul FLOP/s, measured here."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_ms = timed_ms(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = timed_ms(lambda: x @ x)
    return 2 * a.numel() / (copy_ms / 1e3), 2 * 8192**3 / (mm_ms / 1e3)


def case(shape: str, prefix: int, chunk: int, bandwidth: float, flops: float) -> dict[str, Any]:
    heads, kv_heads, head_dim = SHAPES[shape]
    total = prefix + chunk
    blocks = -(-total // BLOCK_SIZE)
    num_blocks = blocks + 64
    dtype = torch.bfloat16
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks - 1, device="cuda")[:blocks] + 1
    q = torch.randn(chunk, heads, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(chunk, kv_heads, head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    scale = head_dim**-0.5
    span = PrefillSpan(0, chunk, prefix, table)
    meta = AttentionMetadata(slot_mapping=torch.zeros(chunk, dtype=torch.int64, device="cuda"))
    meta.prefill_spans = [span]
    out = torch.empty_like(q)
    left = paged_prefill_attention(q, out, meta, k_cache, v_cache, scale)
    reference = prefill_attention(q, k, v, span, k_cache, v_cache, scale)
    error = float((out.double() - reference.double()).norm() / reference.double().norm())
    row: dict[str, Any] = {"shape": shape, "prefix": prefix, "chunk": chunk, "rel_err": error}
    row["kernel_used"] = not left
    row["gather_ms"] = timed_ms(lambda: prefill_attention(q, k, v, span, k_cache, v_cache, scale))

    def paged() -> None:
        meta.paged_prefill = None  # rebuilt per forward pass in the engine, once per layer here
        paged_prefill_attention(q, out, meta, k_cache, v_cache, scale)

    def paged_layer() -> None:  # the metadata built by an earlier layer of the same pass
        paged_prefill_attention(q, out, meta, k_cache, v_cache, scale)

    row["paged_ms"] = timed_ms(paged)
    row["paged_layer_ms"] = timed_ms(paged_layer)
    first = PrefillSpan(0, chunk, 0, table)
    row["flash_first_ms"] = timed_ms(
        lambda: prefill_attention(q, k, v, first, k_cache, v_cache, scale)
    )
    element = 2
    bytes_read = (chunk * heads + 2 * total * kv_heads) * head_dim * element
    attention_flops = 4 * chunk * heads * head_dim * (prefix + chunk / 2)
    row["roofline_ms"] = 1e3 * max(bytes_read / (bandwidth / 2), attention_flops / flops)
    return row


SWEEP = [
    # rows, keys, warps, stages
    (64, 64, 4, 2),
    (128, 64, 4, 2),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (128, 128, 8, 2),
    (256, 64, 8, 2),
]


def sweep(prefix: int, chunk: int) -> list[dict[str, Any]]:
    """Layer time of the paged kernel under each launch setting (constexprs: a compile each)."""
    from tessera.agents.engine import triton_kernels

    rows = []
    for tile_rows, keys, warps, stages in SWEEP:
        triton_kernels.PREFILL_ROWS, triton_kernels.PREFILL_KEYS = tile_rows, keys
        triton_kernels.PREFILL_NUM_WARPS, triton_kernels.PREFILL_NUM_STAGES = warps, stages
        for shape in SHAPES:
            try:
                found = case(shape, prefix, chunk, 1.0, 1.0)
            except Exception as error:  # e.g. out of shared memory for this setting
                print(f"sweep {tile_rows}/{keys}/{warps}/{stages} {shape}: {error}")
                continue
            rows.append(
                {
                    "setting": [tile_rows, keys, warps, stages],
                    "shape": shape,
                    "layer_ms": found["paged_layer_ms"],
                    "rel_err": found["rel_err"],
                }
            )
            print(
                f"sweep {tile_rows:>3}/{keys:>3}/{warps}/{stages} {shape:<10} "
                f"{found['paged_layer_ms']:.3f} ms  err {found['rel_err']:.1e}"
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefill_attention.json"))
    parser.add_argument("--prefixes", default="512,1536,3584,7680")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--sweep", action="store_true", help="time the kernel's launch settings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    bandwidth, flops = ceilings()
    rows = [
        case(shape, int(prefix), args.chunk, bandwidth, flops)
        for shape in SHAPES
        for prefix in args.prefixes.split(",")
    ]
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bandwidth / 1e9:.0f} GB/s, bf16 {flops / 1e12:.0f} TFLOP/s")
    columns = ("gather ms", "paged ms", "layer ms", "flash-1st", "roofline", "rel err")
    print(f"{'shape':<10} {'prefix':>6} " + " ".join(f"{c:>9}" for c in columns))
    for r in rows:
        print(
            f"{r['shape']:<10} {r['prefix']:>6} {r['gather_ms']:>9.3f} {r['paged_ms']:>9.3f} "
            f"{r['paged_layer_ms']:>9.3f} {r['flash_first_ms']:>9.3f} {r['roofline_ms']:>9.3f} "
            f"{r['rel_err']:>9.1e}"
        )
    swept = sweep(3584, args.chunk) if args.sweep else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "sweep": swept,
        "device": torch.cuda.get_device_name(),
        "measured_at": datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
        "copy_bytes_per_s": bandwidth,
        "bf16_flops": flops,
        "rows": rows,
    }
    args.out.write_text(json.dumps(document, indent=2))
    return 0 if all(r["kernel_used"] and r["rel_err"] < 2e-2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
