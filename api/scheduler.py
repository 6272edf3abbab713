"""The engine scheduler's settings, with vLLM's names: the one type that a plan's pool maps to
(`PoolPlan.scheduler`) and that the renderer, the simulator, the engine and the benches read.

A ModelDeployment's plan records them as `prefillChunkTokens` and `maxRunningRequests` (the
CRD's names, kept for compatibility); `PoolPlan.scheduler` is the only translation between the
two vocabularies. The batch-formation rules these settings steer are `policies.batching`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default batch cap, and the Tessera engine's: a pool that records none runs with it."""
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
"""vLLM's default token budget, and the least it gives an engine that prefills whole prompts."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How an engine forms each step's batch."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    """Requests running at once (decoding or prefilling)."""
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    """Tokens per step, decode tokens included; with chunked prefill also the chunk size."""
    enable_chunked_prefill: bool = True
    """Off: a prompt is admitted only when it fits the step's remaining budget whole."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def prefill_chunk_tokens(self) -> int | None:
        """The most prompt tokens one step computes (vLLM's chunk size is the step's budget);
        None when prompts are not chunked."""
        return self.max_num_batched_tokens if self.enable_chunked_prefill else None

    def engine_flags(self) -> list[str]:
        """The settings as the vLLM command-line flags the operator gives a pool's engine.
        Chunked prefill is named either way: vLLM (V1) and the Tessera engine chunk by
        default, so whole prompts must be asked for."""
        return [
            f"--max-num-seqs={self.max_num_seqs}",
            f"--max-num-batched-tokens={self.max_num_batched_tokens}",
            "--enable-chunked-prefill"
            if self.enable_chunked_prefill
            else "--no-enable-chunked-prefill",
        ]
