"""Incremental detokenisation (agents/serving/output.py) against a whole decode.

The tokenizer is the serving tests' own (a Metaspace BPE, whose decoder drops the first token's
leading space: the case a window decode gets wrong without context), with its special tokens
and bytes of multi-byte characters among the ids; tokens arrive in batches of random sizes.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

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


class _NoLoop:
    """Generation's loop, for a generation fed by hand: only aborts are asked of it."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _fed_generation(tokenizer: ServingTokenizer, stop: list[str]) -> Any:
    from tessera.agents.engine.request import SamplingParams
    from tessera.agents.serving.generation import Generation
    from tessera.agents.serving.metrics import ServingMetrics

    metrics = ServingMetrics("m", "p", "colocated")
    params = SamplingParams(max_new_tokens=8)
    return Generation(_NoLoop(), tokenizer, metrics, [5], params, stop, None, adopt=True)  # type: ignore[arg-type]


def test_steps_queued_behind_a_wake_up_are_one_delta(tokenizer: ServingTokenizer) -> None:
    """A stream whose event loop fell behind answers every queued step with one delta (one
    SSE write) with all their tokens and text; an error after them still comes apart."""
    from tessera.agents.engine.request import FinishReason
    from tessera.agents.engine.serving_loop import TokenEvent
    from tessera.agents.serving.generation import EngineFailureError

    ids = [20, 31, 42, 53, 64, 75]

    async def run(last: TokenEvent) -> tuple[list[Any], BaseException | None]:
        generation = _fed_generation(tokenizer, [])
        for i in range(0, 4, 2):
            generation.sink(TokenEvent("r", ids[i : i + 2], False))
        generation.sink(last)
        await asyncio.sleep(0)  # the handoff's flush runs on the event loop
        deltas: list[Any] = []
        try:
            async for delta in generation.deltas():
                deltas.append(delta)
        except EngineFailureError as error:
            return deltas, error
        return deltas, None

    done = TokenEvent("r", ids[4:], True, FinishReason.LENGTH)
    deltas, error = asyncio.run(run(done))
    assert error is None and len(deltas) == 1
    assert deltas[0].token_ids == ids and deltas[0].finish_reason == "length"
    assert deltas[0].text == tokenizer.decode(ids)

    failed = TokenEvent("r", [], True, FinishReason.ERROR, error="boom")
    deltas, error = asyncio.run(run(failed))
    assert isinstance(error, EngineFailureError)
    assert [d.token_ids for d in deltas] == [ids[:4]]


def test_with_stop_strings_each_step_stays_its_own_delta(tokenizer: ServingTokenizer) -> None:
    """Stop strings keep one delta per step: tokens after the stop's step stay out of usage."""
    from tessera.agents.engine.request import FinishReason
    from tessera.agents.engine.serving_loop import TokenEvent

    async def run() -> list[Any]:
        generation = _fed_generation(tokenizer, ["\x00never"])
        generation.sink(TokenEvent("r", [20, 31], False))
        generation.sink(TokenEvent("r", [42], True, FinishReason.LENGTH))
        await asyncio.sleep(0)
        return [delta async for delta in generation.deltas()]

    assert [d.token_ids for d in asyncio.run(run())] == [[20, 31], [42]]


@pytest.mark.parametrize("chat", [True, False])
def test_chunk_text_is_the_chunk_dicts_json(chat: bool) -> None:
    """The per-stream template writes exactly what json.dumps of stream_chunk's dict does."""
    import json

    from tessera.agents.serving.protocol import StreamChunkText, stream_chunk

    rid, model = 'cmpl-"q\\uote', "m\u00e9/\u4e16"
    template = StreamChunkText(chat, rid, 1700000000, model)
    cases: list[tuple[str, str | None, list[int] | None]] = [
        ("", None, None),
        ('hi "there"\n\t\u00e9\u4e16\U0001f600\\', None, [1, 2, 30000]),
        ("end", "stop", None),
        ("", "length", []),
    ]
    for text, reason, ids in cases:
        chunk = stream_chunk(chat, rid, 1700000000, model, text, reason, ids)
        assert template.sse(text, reason, ids) == (
            f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        )


def test_a_long_stream_costs_about_one_decode_per_token(tokenizer: ServingTokenizer) -> None:
    """Token by token (a decode step's batch), the text is still the whole decode's, and the
    window's committed text is reused: at most ~1.1 decodes per token, not 2."""
    rng = random.Random(7)
    vocab = tokenizer.tokenizer.get_vocab_size()
    ids = [rng.randrange(3, vocab) for _ in range(400)]
    calls = [0]
    real_decode = tokenizer.decode

    class Counting(ServingTokenizer):
        def decode(self, token_ids: list[int]) -> str:
            calls[0] += 1
            return real_decode(token_ids)

    counting = Counting(tokenizer.tokenizer, None, None, None)
    output = OutputText(counting, [])
    streamed = "".join(output.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids))
    assert streamed == tokenizer.decode(ids)
    assert calls[0] <= 1.1 * len(ids)
