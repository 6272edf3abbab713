"""Predicted SLO attainment of a candidate plan at a request rate (see attainment.py for the
model). Colocated replicas are predicted as their engine is told to run (the pool's
`prefill_chunk_tokens`): chunked prefill with decode tokens first in every iteration, or whole
prompts in iterations of their own, first (vLLM without chunked prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessera.api.model_deployment import ModelDeploymentSpec, ServingMode
from tessera.policies.attainment import (
    InterleavedDecode,
    length_points,
    running_batch,
    squared_cv,
    tandem_waiting_cdf,
    ttft_attainment,
)
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.lengths import WaitingTail
from tessera.policies.perfmodel import PrefillChunk, ReplicaPerformance

if TYPE_CHECKING:
    from tessera.policies.placement import Candidate, PoolSizing

DecodePerformance = ReplicaPerformance | OffloadedDecodePerformance


@dataclass(frozen=True)
class Attainment:
    """Predicted fractions of requests meeting each target, and both (taken as independent)."""

    ttft: float
    tpot: float

    @property
    def both(self) -> float:
        return self.ttft * self.tpot


def predict_attainment(
    candidate: Candidate, spec: ModelDeploymentSpec, rate: float | None = None
) -> Attainment:
    """Fraction of requests meeting both TTFT and TPOT at `rate` (default: the declared one)."""
    rate = spec.traffic.request_rate_per_second if rate is None else rate
    if candidate.mode is ServingMode.COLOCATED:
        ((sizing, replicas),) = candidate.pools
        return _colocated(sizing, replicas, spec, rate)
    (prefill, prefill_replicas), (decode, decode_replicas) = candidate.pools[:2]
    return _disaggregated(prefill, prefill_replicas, decode, decode_replicas, spec, rate)


def _kv_capacity_batch(perf: DecodePerformance, mean_context: float) -> int:
    by_memory = perf.kv_capacity_tokens // max(1, math.ceil(mean_context))
    return max(1, min(perf.max_running_requests, by_memory))


def _colocated(
    sizing: PoolSizing, replicas: int, spec: ModelDeploymentSpec, rate: float
) -> Attainment:
    perf = sizing.performance
    assert isinstance(perf, ReplicaPerformance)
    prompt, output = spec.traffic.resolved_lengths()
    prompts, outputs = length_points(prompt), length_points(output)
    mean_context = prompt.mean + output.mean / 2
    per_replica = rate / replicas
    budget = sizing.prefill_chunk_tokens
    whole = {p: perf.prefill_time_s(p) for p in prompts} if budget is None else {}

    def prefill_steps(tokens: int, batch: int) -> tuple[float, float]:
        """(time of the iterations carrying a prompt, of the same iterations decode-only).

        A whole prompt has iterations of its own, so it adds all of its prefill time to the
        running decodes' tokens; a chunked one adds what its chunks cost beyond decode steps.
        """
        if budget is None:
            return whole[tokens], 0.0
        chunk = max(16, budget - batch)
        contexts = [int(mean_context)] * batch
        decode_only = perf.decode_step_time_s(batch, mean_context)
        total = plain = 0.0
        done = 0
        while done < tokens:
            new = min(chunk, tokens - done)
            total += perf.iteration([PrefillChunk(new, done)], contexts).time_s
            plain += decode_only
            done += new
        return total, plain

    batch = 1
    added_s = step_s = 0.0
    overflow = False
    for _ in range(3):  # the batch sets the chunk size and step; the prefills stretch the batch
        costs = [prefill_steps(p, batch) for p in prompts]
        added_s = sum(t - d for t, d in costs) / len(costs)

        def token_time(b: int, added: float = added_s) -> float:
            step = perf.decode_step_time_s(b, mean_context)
            return InterleavedDecode(step, per_replica, added).mean_tpot_s

        batch, overflow = running_batch(
            per_replica, output.mean, token_time, _kv_capacity_batch(perf, mean_context)
        )
        step_s = perf.decode_step_time_s(batch, mean_context)
    if overflow or per_replica * added_s >= 1:
        return Attainment(0.0, 0.0)
    # A whole prompt's stall is its own prefill time, as spread as the prompt lengths make it.
    spread = squared_cv([t for t, _ in costs]) if budget is None else 0.0
    interleaved = InterleavedDecode(step_s, per_replica, added_s, spread)
    first_token = {p: prefill_steps(p, batch)[0] + step_s / 2 for p in prompts}
    ttft = ttft_attainment(
        prompts, first_token.__getitem__, rate, spec.slo.ttft_ms / 1e3, servers=replicas
    )
    tpot = interleaved.tpot_attainment(outputs, spec.slo.tpot_ms / 1e3)
    return Attainment(ttft, tpot)


def _disaggregated(
    prefill: PoolSizing,
    prefill_replicas: int,
    decode: PoolSizing,
    decode_replicas: int,
    spec: ModelDeploymentSpec,
    rate: float,
) -> Attainment:
    prefill_perf, decode_perf = prefill.performance, decode.performance
    assert isinstance(prefill_perf, ReplicaPerformance)
    prompt, output = spec.traffic.resolved_lengths()
    prompts, outputs = length_points(prompt), length_points(output)
    mean_context = prompt.mean + output.mean / 2
    link_gbps = kv_link_gbps(prefill, decode)
    per_prefill = rate / prefill_replicas
    per_decode = rate / decode_replicas

    prefill_s = {p: prefill_perf.prefill_time_s(p) for p in prompts}
    transfer_s = {p: prefill_perf.kv_transfer_time_s(p, link_gbps) for p in prompts}
    mean_prefill = sum(prefill_s.values()) / len(prompts)
    mean_transfer = sum(transfer_s.values()) / len(prompts)
    prefill_scv = squared_cv(list(prefill_s.values()))
    transfer_scv = squared_cv(list(transfer_s.values()))
    # Prefill compute (an M/G/c pool), the prefill replica's egress and the decode replica's
    # ingress are queues in tandem; the two busiest waits add up.
    stages = sorted(
        [
            WaitingTail(rate, mean_prefill, prefill_replicas, prefill_scv),
            WaitingTail(per_prefill, mean_transfer, 1, transfer_scv),
            WaitingTail(per_decode, mean_transfer, 1, transfer_scv),
        ],
        key=lambda tail: tail.utilization,
        reverse=True,
    )
    ttft_budget_s = spec.slo.ttft_ms / 1e3
    ttft = sum(
        tandem_waiting_cdf(stages[0], stages[1], ttft_budget_s - prefill_s[p] - transfer_s[p])
        for p in prompts
    ) / len(prompts)

    def token_time(batch: int) -> float:
        return decode_perf.decode_step_time_s(batch, mean_context)

    batch, overflow = running_batch(
        per_decode, output.mean, token_time, _kv_capacity_batch(decode_perf, mean_context)
    )
    if overflow:
        # A full decode pool cannot take KV caches in, so prefill replicas hold theirs and stall.
        return Attainment(0.0, 0.0)
    step_s = token_time(batch)
    tpot_budget_s = spec.slo.tpot_ms / 1e3
    # A request's first decode step waits for the running step to end: that delay is spread
    # over its output tokens, so short outputs feel it most.
    tpot = sum(1.0 for n in outputs if step_s + step_s / 2 / max(1, n - 1) <= tpot_budget_s) / len(
        outputs
    )
    return Attainment(ttft, tpot)


def kv_link_gbps(prefill: PoolSizing, decode: PoolSizing) -> float:
    """Bandwidth of a KV transfer: the slower network of the two ends (GB/s)."""
    receiver = decode.attention_offer or decode.offer
    return min(prefill.offer.spec.network_bandwidth_gbps, receiver.spec.network_bandwidth_gbps)
