"""OpenAI's request and response shapes for completions, chat completions and models.

Requests are strict: a field outside OpenAI's API (or vLLM's extensions `ignore_eos`,
`return_token_ids`), or one this server does not implement (penalties, logprobs, n > 1), is a
400 that names it rather than a silently different answer. Defaults are OpenAI's
(temperature 1, top_p 1, max_tokens 16 for completions and "the rest of the context" for chat).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1
_json_string = json.encoder.encode_basestring_ascii
MAX_STOP_SEQUENCES = 4


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = Field(default=False, description="Send a last chunk with usage.")


StopSequence = Annotated[str, Field(min_length=1)]


class SamplingFields(StrictModel):
    """The fields both endpoints share."""

    model: str | None = Field(default=None, description="The served model name (optional).")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(default=1, description="Choices per request; only 1 is served.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Sampling seed.")
    stop: StopSequence | list[StopSequence] | None = Field(
        default=None, description=f"Up to {MAX_STOP_SEQUENCES} strings that end the output."
    )
    stream: bool = Field(default=False, description="Server-sent events, one per token batch.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="End-user id (recorded nowhere).")
    ignore_eos: bool = Field(default=False, description="vLLM extension: run past EOS.")
    return_token_ids: bool = Field(
        default=False, description="vLLM extension: include prompt and output token ids."
    )

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] = (
        Field(description="Text, or token ids.")
    )
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate.")
    echo: Literal[False] = Field(default=False, description="Not supported (false only).")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated by OpenAI.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (default: the context left)."
    )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


def stream_chunk(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """One server-sent event's JSON: a `chat.completion.chunk` (the text in `delta.content`)
    or a `text_completion` (in `text`). `text=None` gives the choice-less usage chunk. Built
    as a plain dict: it is made once per token batch per stream, where a model costs."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
    }
    if text is None:
        return chunk
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta"] = {"role": role, "content": text} if role else {"content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk["choices"].append(choice)
    return chunk


class StreamChunkText:
    """A stream's token chunks as server-sent event text, from a prefix made once per stream:
    the same bytes as `data: ` + compact `json.dumps(stream_chunk(...))`, without building and
    walking a dict per chunk (64 streams make 64 chunks a decode step, on the event loop that
    the engine thread waits on for the GIL)."""

    def __init__(self, chat: bool, rid: str, created: int, model: str) -> None:
        head = json.dumps(stream_chunk(chat, rid, created, model, None), separators=(",", ":"))
        assert head.endswith('"choices":[]}')
        opening = '{"index":0,"delta":{"content":' if chat else '{"index":0,"text":'
        self._prefix = "data: " + head[:-2] + opening
        self._after_text = (
            '},"logprobs":null,"finish_reason":' if chat else (',"logprobs":null,"finish_reason":')
        )

    def sse(self, text: str, finish_reason: str | None, token_ids: list[int] | None) -> str:
        """`data: <chunk>\n\n` of one delta (`token_ids` None: the field left out)."""
        ids = "" if token_ids is None else ',"token_ids":[' + ",".join(map(str, token_ids)) + "]"
        # json.dumps of a str is this C function's result (ensure_ascii), without the encoder
        # object json.dumps goes through: about 1 us less per chunk.
        reason = "null" if finish_reason is None else _json_string(finish_reason)
        return "".join((self._prefix, _json_string(text), self._after_text, reason, ids, "}]}\n\n"))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tessera"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
