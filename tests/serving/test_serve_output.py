"""Incremental detokenisation (agents/serving/output.py) against a whole decode.

The tokenizer is the serving tests' own (a Metaspace BPE, whose decoder drops the first token's
leading space: the case a window decode gets wrong without context), with its special tokens
and bytes of multi-byte characters among the ids; tokens arrive in batches of random sizes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tessera.agents.serving.output import OutputText
from tessera.agents.serving.tokenizer import ServingTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> ServingTokenizer:
    return ServingTokenizer.from_folder(tiny_model)


@pytest.mark.parametrize("seed", range(40))
def test_the_streamed_text_is_the_whole_decode(tokenizer: ServingTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    vocab = tokenizer.tokenizer.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
    output = OutputText(tokenizer, [])
    streamed, i = "", 0
    while i < len(ids):
        batch = ids[i : i + rng.choice([1, 1, 1, 2, 3, 7])]
        i += len(batch)
        streamed += output.push(batch, final=i >= len(ids))
        assert tokenizer.decode(ids[:i]).startswith(streamed)
    assert streamed == tokenizer.decode(ids) == output.text


def test_a_resumed_output_goes_on_from_the_tokens_it_was_given(
    tokenizer: ServingTokenizer,
) -> None:
    ids = tokenizer.encode("Once upon a time a small robot learned to count tokens")
    first = OutputText(tokenizer, [])
    shown = first.push(ids[:6])
    second = OutputText(tokenizer, [])
    second.token_ids = list(ids[:6])  # as a migration hands a request over
    second.emitted = len(shown)
    rest = second.push(ids[6:], final=True)
    assert shown + rest == tokenizer.decode(ids)
