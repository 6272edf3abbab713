"""A request's life in the engine: its tokens, its KV blocks, its state and its timestamps."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
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
    ERROR = "error"
    """Its step failed (e.g. its logits were not finite); `error` says how. Only this request
    ends: the others in the batch carry on."""


class InvalidSamplingParamsError(ValueError):
    """A sampling parameter outside its valid range; `field` names it (HTTP 400, gRPC
    INVALID_ARGUMENT)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.field = name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)  # any int is finite (math.isfinite overflows past 1e308)


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
        """Refuse what sampling cannot compute, here where the request is made: a NaN
        temperature once got into the engine, and every step after it raised."""
        bad = InvalidSamplingParamsError
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", f"must be unset or an integer >= 1, got {self.top_k!r}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be a finite number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"must be unset or an integer, got {self.seed!r}")
        stops = self.stop_token_ids
        if not isinstance(stops, tuple | list) or not all(_is_int(t) and t >= 0 for t in stops):
            raise bad("stop_token_ids", f"must be a list of integers >= 0, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        for name in ("ignore_eos", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop_token_ids"] = list(self.stop_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`; raises InvalidSamplingParamsError on any unknown or bad field
        (a KV package's sampling comes from another process)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSamplingParamsError(
                str(unknown[0]), f"is not a sampling parameter (known: {', '.join(sorted(known))})"
            )
        return cls(**data)


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
    error: str | None = None
    """Why it ended with FinishReason.ERROR."""
    num_preemptions: int = 0
    """Times its blocks were taken back (to be recomputed): a live migration that copied blocks
    before one must start again, since those blocks are gone."""

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
    error: str | None = None
    """Set with FinishReason.ERROR: what failed."""


@dataclass
class Completion:
    """A request's whole result (from `Engine.generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason | None
    logits: list[torch.Tensor]
    error: str | None = None
