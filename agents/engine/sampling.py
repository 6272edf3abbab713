"""Token selection: greedy, or temperature (with top-k, top-p) sampling, seeded per request."""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch
from tessera.agents.engine.request import SamplingParams

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def draw_seed(seed: int, output_index: int) -> int:
    """Seed for one draw: a function of the request's seed and the token's index only, so a
    request exported mid-generation draws the same tokens in its new engine."""
    return (seed * _MIX + output_index * 0xBF58476D1CE4E5B9 + 1) & _MASK


@dataclass(frozen=True)
class SamplingFailure:
    """No token for this row: what went wrong. Only its request fails; the batch goes on."""

    reason: str


def sample(
    logits: torch.Tensor,
    params: SequenceOf[SamplingParams],
    output_indices: SequenceOf[int],
    generator: torch.Generator,
) -> list[int | SamplingFailure]:
    """One token per row of float32 `logits` [M, vocab], or a SamplingFailure for a row that
    has none: non-finite logits (NaN or +inf anywhere, or all -inf), or a draw that raised.

    Greedy rows take the argmax on the logits' device; sampled rows are drawn on the CPU (a
    per-row generator is cheap there and makes seeded draws device-independent).
    """
    peak, argmax = logits.max(dim=-1)  # the max propagates NaN, so one test covers the row
    finite = torch.isfinite(peak)
    marked = argmax.masked_fill(~finite, -1).tolist()
    if len(params) != len(output_indices):
        raise ValueError(f"{len(params)} params for {len(output_indices)} output indices")
    # Runs per row per step: the common case (every row finite, all greedy) adds no per-row
    # Python beyond the .tolist() and one pass over the params.
    chosen: list[int | SamplingFailure] = list(marked)
    if min(marked, default=0) < 0:
        failure = SamplingFailure("logits are not finite (NaN or inf)")
        chosen = [token if token >= 0 else failure for token in marked]
    drawn = [row for row, param in enumerate(params) if param.temperature != 0]
    for row in drawn:
        if isinstance(chosen[row], SamplingFailure):
            continue
        param, index = params[row], output_indices[row]
        try:
            chosen[row] = _draw(logits[row], param, index, generator)
        except Exception as error:  # fail this row only; the others keep their tokens
            log.warning("sampling row %d failed: %s", row, error, exc_info=True)
            chosen[row] = SamplingFailure(f"sampling failed: {error}")
    return chosen


def _draw(
    logits: torch.Tensor, param: SamplingParams, index: int, generator: torch.Generator
) -> int:
    # Shifted by the max and scaled in float64 (which holds any valid temperature; float32
    # rounds 1e-300 to 0), so that a tiny temperature gives -inf (excluded) and 0 (the max),
    # never inf - inf = NaN.
    row = logits.cpu().double()
    scaled = (row - row.max()) / param.temperature
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
    return int(torch.multinomial(probs, 1, generator=row_generator).item())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches `top_p` (the most
    likely token always stays)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
