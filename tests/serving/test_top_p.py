"""Nucleus (top-p) sampling in the engine's sampler: draws stay inside the nucleus."""

from __future__ import annotations

import pytest
import torch
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.sampling import sample


def test_top_p_draws_only_from_the_smallest_set_reaching_p() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps tokens 0 and 1 only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.7)
    drawn = {sample(logits, [params], [0], generator)[0] for _ in range(300)}
    assert drawn == {0, 1}
    wide = SamplingParams(temperature=1.0)
    everything = {sample(logits, [wide], [0], generator)[0] for _ in range(300)}
    assert everything == {0, 1, 2, 3}


def test_a_tiny_top_p_is_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=2.0, top_p=1e-6, seed=row) for row in range(4)]
    generator = torch.Generator().manual_seed(0)
    assert sample(logits, params, [0] * 4, generator) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5])
def test_top_p_outside_its_range_is_refused_by_name(top_p: float) -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=top_p)
