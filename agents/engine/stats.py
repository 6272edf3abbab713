"""Engine metrics for the node agent's telemetry: queue, batch, KV blocks, throughput, latency.

The engine writes; the agent reads `EngineStats.snapshot()`, a plain frozen dataclass, so the
agent needs no knowledge of the engine's internals. Latency samples are kept in bounded
buffers; `snapshot(drain=True)` hands each TTFT/TPOT sample out once, which is what a consumer
feeding Prometheus histograms needs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStatsSnapshot:
    """The engine's state and recent performance at `timestamp_s`."""

    timestamp_s: float
    role: str
    queue_length: int
    """Requests waiting to be scheduled (new or preempted)."""
    running_batch: int
    """Requests scheduled each step (prefilling or decoding)."""
    parked_requests: int
    """Prefill-only role: requests whose KV awaits export."""
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_block_size: int
    generated_tokens_per_s: float
    """Sampled tokens per second over the last `window_s`."""
    prompt_tokens_per_s: float
    """Prompt (prefill) tokens computed per second over the last `window_s`."""
    window_s: float
    """Rates are over this window, or over the engine's life while it is shorter."""
    ttft_ms: tuple[float, ...]
    tpot_ms: tuple[float, ...]
    step_ms: tuple[float, ...]
    prompt_tokens_total: int
    generated_tokens_total: int
    requests_finished_total: int
    preemptions_total: int
    kv_exports_total: int
    kv_imports_total: int


class EngineStats:
    """Counters and sample buffers the engine updates as it steps."""

    def __init__(
        self,
        window_s: float = 10.0,
        max_samples: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self._steps: deque[tuple[float, int, int]] = deque()
        self._window_prompt = 0
        self._window_generated = 0
        """Sums over `_steps`, kept as steps come and go: a snapshot every step (the serving
        loop's) would otherwise sum the window's ~400 steps twice each time."""
        self._ttft_ms: deque[float] = deque(maxlen=max_samples)
        self._tpot_ms: deque[float] = deque(maxlen=max_samples)
        self._step_ms: deque[float] = deque(maxlen=max_samples)
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.requests_finished_total = 0
        self.preemptions_total = 0
        self.kv_exports_total = 0
        self.kv_imports_total = 0
        self._started_s = clock()

    def record_step(self, prompt_tokens: int, generated_tokens: int, duration_s: float) -> None:
        now = self.clock()
        self._steps.append((now, prompt_tokens, generated_tokens))
        self._window_prompt += prompt_tokens
        self._window_generated += generated_tokens
        self._step_ms.append(duration_s * 1e3)
        self.prompt_tokens_total += prompt_tokens
        self.generated_tokens_total += generated_tokens
        self._trim(now)

    def record_ttft(self, seconds: float) -> None:
        self._ttft_ms.append(seconds * 1e3)

    def record_tpot(self, seconds: float) -> None:
        self._tpot_ms.append(seconds * 1e3)

    def _trim(self, now: float) -> None:
        steps, start = self._steps, now - self.window_s
        while steps and steps[0][0] < start:
            _, prompt, generated = steps.popleft()
            self._window_prompt -= prompt
            self._window_generated -= generated

    def snapshot(
        self,
        role: str,
        queue_length: int,
        running_batch: int,
        parked_requests: int,
        kv_blocks_total: int,
        kv_blocks_used: int,
        kv_block_size: int,
        drain: bool = False,
    ) -> EngineStatsSnapshot:
        now = self.clock()
        self._trim(now)
        prompt, generated = self._window_prompt, self._window_generated
        # A young engine has run for less than a window: divide by the time it has run.
        span_s = max(min(self.window_s, now - self._started_s), 1e-9)
        ttft, tpot, step_ms = tuple(self._ttft_ms), tuple(self._tpot_ms), tuple(self._step_ms)
        if drain:
            self._ttft_ms.clear()
            self._tpot_ms.clear()
            self._step_ms.clear()
        return EngineStatsSnapshot(
            timestamp_s=now,
            role=role,
            queue_length=queue_length,
            running_batch=running_batch,
            parked_requests=parked_requests,
            kv_blocks_total=kv_blocks_total,
            kv_blocks_used=kv_blocks_used,
            kv_blocks_free=kv_blocks_total - kv_blocks_used,
            kv_block_size=kv_block_size,
            generated_tokens_per_s=generated / span_s,
            prompt_tokens_per_s=prompt / span_s,
            window_s=self.window_s,
            ttft_ms=ttft,
            tpot_ms=tpot,
            step_ms=step_ms,
            prompt_tokens_total=self.prompt_tokens_total,
            generated_tokens_total=self.generated_tokens_total,
            requests_finished_total=self.requests_finished_total,
            preemptions_total=self.preemptions_total,
            kv_exports_total=self.kv_exports_total,
            kv_imports_total=self.kv_imports_total,
        )
