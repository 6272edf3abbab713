"""Token selection: greedy, or temperature (with top-k, top-p) sampling, seeded per request."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

import torch
from tessera.agents.engine.request import SamplingParams

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def draw_seed(seed: int, output_index: int) -> int:
    """Seed for one draw: a function of the request's seed and the token's index only, so a
    request exported mid-generation draws the same tokens in its new engine."""
    return (seed * _MIX + output_index * 0xBF58476D1CE4E5B9 + 1) & _MASK


def sample(
    logits: torch.Tensor,
    params: SequenceOf[SamplingParams],
    output_indices: SequenceOf[int],
    generator: torch.Generator,
) -> list[int]:
    """One token per row of float32 `logits` [M, vocab].

    Greedy rows take the argmax on the logits' device; sampled rows are drawn on the CPU (a
    per-row generator is cheap there and makes seeded draws device-independent).
    """
    chosen = logits.argmax(dim=-1).tolist()
    for row, (param, index) in enumerate(zip(params, output_indices, strict=True)):
        if param.temperature == 0:
            continue
        scaled = logits[row].float().cpu() / param.temperature
        if param.top_k is not None and param.top_k < scaled.shape[0]:
            threshold = torch.topk(scaled, param.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if param.top_p < 1:
            probs = _nucleus(probs, param.top_p)
        if param.seed is None:
            row_generator = generator
        else:
            row_generator = torch.Generator().manual_seed(draw_seed(param.seed, index))
        chosen[row] = int(torch.multinomial(probs, 1, generator=row_generator).item())
    return chosen


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches `top_p` (the most
    likely token always stays)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
