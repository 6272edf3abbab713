"""`tessera serve` as a real process, called with the official `openai` client and plain HTTP.

Greedy outputs are checked against the engine run directly (in this process) on the same
prompt ids; chat prompts against the chat template rendered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import torch
from conftest import MAX_MODEL_LEN, SERVED_NAME, ServerProcess
from tessera.agents.engine import Engine, EngineConfig, SamplingParams
from tessera.agents.serving.tokenizer import ServingTokenizer


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine.from_pretrained(tiny_model, EngineConfig(device="cpu", dtype=torch.float32))


def engine_greedy(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    return engine.generate([prompt], params)[0].output_token_ids


def test_models_health_and_ready(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/ready").status_code == 200


def test_completion_of_token_ids_is_the_engines_greedy_output(
    client: openai.OpenAI, engine: Engine
) -> None:
    prompt = [1, 17, 42, 99, 7, 123, 56]
    completion = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = completion.choices[0]
    expected = engine_greedy(engine, prompt, 12)
    assert choice.model_extra is not None
    assert choice.model_extra["token_ids"] == expected
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == len(expected)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")


def test_chat_completes_and_streams_the_engines_greedy_output(
    client: openai.OpenAI, engine: Engine, tiny_model: Path
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Hello there."},
        {"role": "user", "content": "Tell me a story about a small robot."},
    ]
    tokenizer = ServingTokenizer.from_folder(tiny_model)
    prompt = tokenizer.encode_chat(messages)
    assert prompt[0] == 1 and tokenizer.decode(prompt).startswith("Hello there.")
    expected = engine_greedy(engine, prompt, 10)

    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=10, temperature=0, seed=3
    )
    text = reply.choices[0].message.content
    assert text == tokenizer.decode(expected)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(prompt),
        len(expected),
    )

    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [reply.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected)


def test_streamed_completion_tokens_equal_the_engines(
    client: openai.OpenAI, engine: Engine
) -> None:
    prompt = [1, 5, 9, 200, 31]
    stream = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=9,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    tokens = [t for chunk in stream for t in (chunk.choices[0].model_extra or {})["token_ids"]]
    assert tokens == engine_greedy(engine, prompt, 9)


def test_streamed_token_ids_include_tokens_that_add_no_text(
    client: openai.OpenAI, engine: Engine, tiny_model: Path
) -> None:
    """A special token (here EOS, generated past with ignore_eos, or a chat marker) decodes to
    no text; its id must still reach a client that asked for token ids."""
    tokenizer = ServingTokenizer.from_folder(tiny_model)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)

    def silent_step(tokens: list[int]) -> bool:
        """Some token after the first adds no text to what came before it."""
        return any(
            tokenizer.decode(tokens[: i + 1]) == tokenizer.decode(tokens[:i])
            for i in range(1, len(tokens) - 1)
        )

    candidates = ([1, 10 + i, 20 + 2 * i, 5 + i] for i in range(60))
    found = next(
        (
            (prompt, tokens)
            for prompt in candidates
            if silent_step(tokens := engine.generate([prompt], params)[0].output_token_ids)
        ),
        None,
    )
    assert found is not None, "no prompt among the candidates makes a token without text"
    prompt, expected = found
    # A one-character stop string that never comes holds no text back and keeps one chunk per
    # step: without stop strings a stream merges the steps queued behind one wake-up, and the
    # silent step's chunk would depend on whether the event loop kept up with the engine.
    stream = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        stream=True,
        stop=["\x00"],
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert [t for c in chunks for t in (c.model_extra or {})["token_ids"]] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected)
    silent = [c for c in chunks if c.text == "" and c.finish_reason is None]
    assert silent and all((c.model_extra or {})["token_ids"] for c in silent)


def test_seeded_sampling_repeats_and_top_p_is_accepted(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        out = client.completions.create(
            model=SERVED_NAME,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_a_stop_string_ends_the_text_before_it(
    client: openai.OpenAI, engine: Engine, tiny_model: Path
) -> None:
    tokenizer = ServingTokenizer.from_folder(tiny_model)
    prompt = [1, 60, 61, 62]
    full = tokenizer.decode(engine_greedy(engine, prompt, 24))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    for stream in (False, True):
        kwargs: dict[str, Any] = dict(
            model=SERVED_NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
        )
        if stream:
            text = "".join(
                c.choices[0].text for c in client.completions.create(**kwargs, stream=True)
            )
        else:
            reply = client.completions.create(**kwargs)
            text = reply.choices[0].text
            assert reply.choices[0].finish_reason == "stop"
        assert text == full[: full.index(stop)]


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("completions", {"prompt": "hi", "n": 2}, "n"),
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "temperature": 2.5}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [1, -4]}, "prompt[1]"),
    ("completions", {"prompt": [1, 10**6]}, "prompt"),
    ("completions", {"prompt": [1] * MAX_MODEL_LEN}, "prompt"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": "hi", "seed": -1}, "seed"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"prompt": "hi", "stop": [""]}, "stop[0]"),
    ("completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "hi", "echo": True}, "echo"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6},
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), INVALID)
def test_invalid_requests_get_400_naming_the_field(
    server: ServerProcess, path: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{server.base_url}/v1/{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["message"].startswith(param), error
    assert error["type"] == "invalid_request_error"


def test_body_that_is_not_json_is_a_400_and_another_model_a_404(server: ServerProcess) -> None:
    broken = httpx.post(
        f"{server.base_url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
    other = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "model": "gpt-9"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"


def test_the_openai_client_sees_a_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "x"}], n=2
        )
