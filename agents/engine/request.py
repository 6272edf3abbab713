"""A request's life in the engine: its tokens, its KV blocks, its state and its timestamps."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class RequestState(enum.Enum):
    WAITING = "waiting"
    """Queued; holds no KV blocks (new, or preempted and to be recomputed)."""
    RUNNING = "running"
    """Scheduled each step: prefilling in chunks, then decoding one token a step."""
    PARKED = "parked"
    """Prefill-only role: prefill done and first token sampled; KV held until exported."""
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    """A stop token (or EOS) was generated."""
    LENGTH = "length"
    """max_new_tokens reached, or the model's context length."""
    ABORTED = "aborted"
    EXPORTED = "exported"
    """Its KV left this engine (P->D transfer or migration); it continues elsewhere."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """With a seed, sampling is a function of (seed, output index): it reproduces across
    engines, so a request moved mid-generation draws the same tokens."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_logits: bool = False
    """Keep the float32 logits each token was sampled from (tests, debugging)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 when set, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop_token_ids"] = list(self.stop_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        values = dict(data)
        values["stop_token_ids"] = tuple(values.get("stop_token_ids", ()))
        return cls(**values)


@dataclass(eq=False)
class Sequence:
    """One request inside the engine (compared by identity)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache; the rest are computed by the next steps."""
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    imported: bool = False
    """Arrived with its KV from another engine (decode-only role or migration)."""
    decode_start_s: float | None = None
    """When this engine began producing its tokens one at a time (first token or import)."""
    decode_start_outputs: int = 0
    """Output tokens it had then (for TPOT over the tokens this engine produced)."""
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to be run through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    def token_at(self, index: int) -> int:
        prompt = len(self.prompt_token_ids)
        if index < prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - prompt]

    def tokens(self, start: int, stop: int) -> list[int]:
        prompt = len(self.prompt_token_ids)
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        if start >= prompt:
            return self.output_token_ids[start - prompt : stop - prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt]


@dataclass
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    parked: bool = False


@dataclass
class Completion:
    """A request's whole result (from `Engine.generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason | None
    logits: list[torch.Tensor]
