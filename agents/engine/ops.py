"""The model's element-wise and normalisation operations, dispatched to Triton or torch.

The torch versions are the definition (they follow transformers' Llama arithmetic, so CPU
logits match it); the Triton versions are the same functions fused into one launch each, used
on CUDA when Triton is installed. `TESSERA_ENGINE_TRITON=0` forces torch everywhere;
`TRITON_INTERPRET=1` runs the Triton kernels on the CPU (tests use it to check them).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_triton: ModuleType | None
try:
    from tessera.agents.engine import triton_kernels as _triton
except ImportError:  # Triton is optional: CPU-only installs have none.
    _triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_enabled = os.environ.get("TESSERA_ENGINE_TRITON", "1") != "0"


def triton_available() -> bool:
    return _triton is not None


def set_triton_enabled(enabled: bool) -> None:
    """Switch the Triton kernels off (or back on) for this process, e.g. to compare paths."""
    global _enabled
    _enabled = enabled


def use_triton(x: torch.Tensor) -> bool:
    return _triton is not None and _enabled and (x.is_cuda or _INTERPRET)


def triton_kernels() -> ModuleType:
    if _triton is None:
        raise RuntimeError("Triton is not installed; the torch path should have been taken")
    return _triton


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual`; returns (normed, x + residual) for the next residual add."""
    if use_triton(x):
        return triton_kernels().rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


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
    """Rotate Q and K inside `qkv` [N, (H + 2 KVH) * D] and write K, V to their cache slots.

    cos/sin: [max_positions, D / 2] float32; slot_mapping: [N] int64, slot = block * size + i.
    """
    if use_triton(qkv) and head_dim >= 4 and head_dim & (head_dim - 1) == 0:
        triton_kernels().rope_and_cache(
            qkv, positions, cos, sin, slot_mapping, k_cache, v_cache,
            num_q_heads, num_kv_heads, head_dim,
        )  # fmt: skip
        return
    k, v = rope(qkv, positions, cos, sin, num_q_heads, num_kv_heads, head_dim)
    write_kv(k, v, slot_mapping, k_cache, v_cache)


def rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate Q and K inside `qkv` in place (torch); returns the (K, V) views [N, KVH, D].

    Apart from the cache write so that an attention-offloaded model (attention_offload.py),
    whose cache lives on a worker, rotates exactly as the colocated model does.
    """
    tokens = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
    c = cos.index_select(0, positions).unsqueeze(1)
    s = sin.index_select(0, positions).unsqueeze(1)
    half = head_dim // 2
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        x.copy_(rotated.to(x.dtype))
    return k, v


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Store K and V [N, KVH, D] at their slots of one layer's cache."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, for gate_up = [gate | up] along the last dimension."""
    if use_triton(gate_up):
        return triton_kernels().silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
