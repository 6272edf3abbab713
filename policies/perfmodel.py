"""Roofline performance model of one serving replica: how long an iteration takes, how much
KV cache fits, what power it draws.

One model serves the planner, the simulator and (later) the re-planner, so their numbers agree.
An iteration is a batch of prefill chunks and decode tokens (continuous batching, Sarathi-style
chunked prefill); its time is the larger of FLOPs over achieved compute and bytes over achieved
bandwidth, plus tensor-parallel all-reduces and a fixed per-iteration overhead. The achieved
fractions come from per-class calibration files (policies/calibration/*.yaml), measured where a
measurement exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import ModelArchitecture
from tessera.policies.efficiency import Calibration, calibration_for

MAX_RUNNING_REQUESTS = 256
"""Requests a replica decodes at once (vLLM's max_num_seqs): the planner never sizes a batch
beyond it, and the simulator's scheduler admits no more."""
OFFLOADED_MAX_RUNNING_REQUESTS = 2048
"""The same for an attention-offloaded decode replica, whose point is a batch far larger than
one device's memory allows (Lamina runs batches in the thousands)."""
PREFILL_CHUNK_TOKENS = 512
"""Token budget of a chunked-prefill iteration (Sarathi-Serve's setting for tight TPOT):
decode tokens first, prompt chunks fill the rest. Tessera's colocated engines use it."""


class ModelDoesNotFitError(ValueError):
    """The weights (plus a minimum KV cache) do not fit in the replica's memory."""


@dataclass(frozen=True)
class PrefillChunk:
    """A piece of a prompt processed in one iteration."""

    new_tokens: int
    cached_tokens: int = 0
    """Tokens of the same prompt already in the KV cache (earlier chunks)."""


@dataclass(frozen=True)
class IterationCost:
    """Time of one iteration and what bound it."""

    time_s: float
    compute_s: float
    memory_s: float
    communication_s: float

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


class ReplicaPerformance:
    """Performance of one replica: `tensor_parallel` devices of one class serving one model."""

    def __init__(
        self,
        architecture: ModelArchitecture,
        accelerator: AcceleratorClassSpec,
        tensor_parallel: int = 1,
        calibration: Calibration | None = None,
    ) -> None:
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        self.architecture = architecture
        self.accelerator = accelerator
        self.tensor_parallel = tensor_parallel
        self.calibration = calibration or calibration_for(accelerator)
        self.max_running_requests = MAX_RUNNING_REQUESTS

    # ---- memory -------------------------------------------------------------------------
    @cached_property
    def weight_bytes_per_device(self) -> float:
        return self.architecture.weight_bytes / self.tensor_parallel

    @cached_property
    def kv_bytes_per_token_per_device(self) -> float:
        return self.architecture.kv_bytes_per_token / self.tensor_parallel

    @cached_property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache the replica holds after weights and activation headroom."""
        usable = self.accelerator.memory_bytes * self.calibration.memory_utilization
        free = usable - self.weight_bytes_per_device - self.calibration.activation_reserve_bytes
        return max(0, int(free // self.kv_bytes_per_token_per_device))

    def fits(self, min_kv_tokens: int | None = None) -> bool:
        """Whether weights fit and at least one longest request's KV cache fits beside them."""
        needed = min_kv_tokens or self.architecture.max_context_tokens
        return self.kv_capacity_tokens >= needed

    # ---- time ---------------------------------------------------------------------------
    @cached_property
    def _peak_flops(self) -> float:
        peak = self.accelerator.peak_tflops.for_dtype(self.architecture.dtype.value) * 1e12
        return peak * self.calibration.compute_efficiency * self.tensor_parallel

    @cached_property
    def _bandwidth_bytes_s(self) -> float:
        bandwidth = self.accelerator.memory_bandwidth_gbps * 1e9
        return bandwidth * self.calibration.memory_efficiency * self.tensor_parallel

    @cached_property
    def _kv_bandwidth_bytes_s(self) -> float:
        efficiency = self.calibration.kv_memory_efficiency or self.calibration.memory_efficiency
        bandwidth = self.accelerator.memory_bandwidth_gbps * 1e9
        return bandwidth * efficiency * self.tensor_parallel

    @cached_property
    def _linear_flops_per_token(self) -> float:
        arch = self.architecture
        embedding = arch.vocab_size * arch.hidden_size
        return 2.0 * (arch.resolved_parameter_count - embedding)

    @cached_property
    def _attention_flops_per_token_context(self) -> float:
        """FLOPs of QK^T and PV for one query token against one context token, all layers."""
        arch = self.architecture
        return 4.0 * arch.num_layers * arch.num_attention_heads * arch.resolved_head_dim

    def _allreduce_s(self, tokens: int) -> float:
        """Two all-reduces per layer of the token activations (Megatron-style TP)."""
        if self.tensor_parallel == 1 or tokens == 0:
            return 0.0
        arch = self.architecture
        message_bytes = tokens * arch.hidden_size * arch.dtype.bytes
        link = (
            self.accelerator.interconnect_bandwidth_gbps or self.accelerator.network_bandwidth_gbps
        )
        ring_factor = 2.0 * (self.tensor_parallel - 1) / self.tensor_parallel
        per_call = (
            ring_factor * message_bytes / (link * 1e9 * self.calibration.interconnect_efficiency)
        )
        per_call += self.calibration.allreduce_latency_s
        return 2 * arch.num_layers * per_call

    def iteration(
        self, prefill: Sequence[PrefillChunk] = (), decode_context_tokens: Sequence[int] = ()
    ) -> IterationCost:
        """Cost of one iteration holding these prefill chunks and decode requests.

        `decode_context_tokens` gives, per decoding request, the tokens already in its KV cache.
        """
        prefill_tokens = sum(chunk.new_tokens for chunk in prefill)
        tokens = prefill_tokens + len(decode_context_tokens)
        if tokens == 0:
            return IterationCost(0.0, 0.0, 0.0, 0.0)
        attention_pairs = sum(
            chunk.new_tokens * (chunk.cached_tokens + (chunk.new_tokens + 1) / 2)
            for chunk in prefill
        ) + sum(decode_context_tokens)
        flops = tokens * self._linear_flops_per_token
        flops += attention_pairs * self._attention_flops_per_token_context
        flops += 2.0 * len(prefill) * self.architecture.vocab_size * self.architecture.hidden_size
        flops += (
            2.0
            * len(decode_context_tokens)
            * (self.architecture.vocab_size * self.architecture.hidden_size)
        )
        kv_read_tokens = sum(decode_context_tokens) + sum(c.cached_tokens for c in prefill)
        kv_bytes = (kv_read_tokens + tokens) * self.architecture.kv_bytes_per_token
        compute_s = flops / self._peak_flops
        # Weights and KV at their own measured rates (Calibration.kv_memory_efficiency).
        memory_s = self.architecture.weight_bytes / self._bandwidth_bytes_s
        memory_s += kv_bytes / self._kv_bandwidth_bytes_s
        communication_s = self._allreduce_s(tokens)
        time_s = max(compute_s, memory_s) + communication_s + self.calibration.iteration_overhead_s
        return IterationCost(time_s, compute_s, memory_s, communication_s)

    def prefill_time_s(self, prompt_tokens: int, chunk_tokens: int | None = None) -> float:
        """Time to prefill one prompt alone, in chunks of `chunk_tokens` (whole if None)."""
        if prompt_tokens <= 0:
            return 0.0
        chunk = chunk_tokens or prompt_tokens
        total = 0.0
        done = 0
        while done < prompt_tokens:
            new = min(chunk, prompt_tokens - done)
            total += self.iteration(prefill=[PrefillChunk(new, done)]).time_s
            done += new
        return total

    def decode_step_time_s(self, batch: int, mean_context_tokens: float) -> float:
        """Time of one decode iteration for `batch` requests of the given mean context."""
        if batch <= 0:
            return 0.0
        contexts = [int(mean_context_tokens)] * batch
        return self.iteration(decode_context_tokens=contexts).time_s

    def max_decode_batch_for_tpot(
        self, tpot_s: float, mean_context_tokens: float, upper: int = MAX_RUNNING_REQUESTS
    ) -> int:
        """Largest decode batch whose step time stays within `tpot_s` and whose KV fits."""
        return largest_decode_batch(
            self.decode_step_time_s, self.kv_capacity_tokens, tpot_s, mean_context_tokens, upper
        )

    def kv_transfer_time_s(self, tokens: int, link_gbps: float | None = None) -> float:
        """Time to move a request's KV cache out of this replica over a link (GB/s)."""
        link = link_gbps or self.accelerator.network_bandwidth_gbps
        return tokens * self.architecture.kv_bytes_per_token / (link * 1e9)

    # ---- power --------------------------------------------------------------------------
    def power_w(self, busy_fraction: float, compute_bound: bool) -> float:
        """Draw of the replica's devices at a utilisation, by which roof binds."""
        per_device = device_power_w(
            self.accelerator, self.calibration, busy_fraction, compute_bound
        )
        return self.tensor_parallel * per_device


def largest_decode_batch(
    step_time_s: Callable[[int, float], float],
    kv_capacity_tokens: int,
    tpot_s: float,
    mean_context_tokens: float,
    upper: int,
) -> int:
    """Largest batch whose decode step fits `tpot_s` and whose KV cache fits (0 if none).

    Step time grows with batch, so a binary search over [1, min(upper, KV limit)] finds it.
    """
    kv_limit = kv_capacity_tokens // max(1, math.ceil(mean_context_tokens))
    best = 0
    low, high = 1, max(1, min(upper, kv_limit))
    while low <= high:
        mid = (low + high) // 2
        if step_time_s(mid, mean_context_tokens) <= tpot_s:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def device_power_w(
    accelerator: AcceleratorClassSpec,
    calibration: Calibration,
    busy_fraction: float,
    compute_bound: bool,
) -> float:
    """Draw of one device at a utilisation: idle plus busy x (phase draw - idle)."""
    busy = min(1.0, max(0.0, busy_fraction))
    idle = accelerator.idle_power_w
    if idle is None:
        idle = calibration.idle_power_fraction * accelerator.tdp_w
    active_fraction = (
        calibration.compute_bound_power_fraction
        if compute_bound
        else calibration.memory_bound_power_fraction
    )
    active = active_fraction * accelerator.tdp_w
    return idle + busy * max(0.0, active - idle)
