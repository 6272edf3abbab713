"""Performance of a decode replica whose attention runs on a memory-optimised pool (Lamina).

Decode attention reads the whole KV cache every step and does few FLOPs per byte; the linear
layers read the weights once per step and get more efficient the larger the batch. Splitting
them lets the compute devices hold only the weights (so the batch is limited by the memory
pool's KV capacity, not by the compute devices' memory) while cheap bandwidth-rich devices
hold and scan the KV cache. Each layer sends the batch's queries to the attention devices
and gets the attention output back; two micro-batches are pipelined so that the linear layers,
the attention and the transfer overlap.

The step follows the real worker's structure (agents/engine/attention_offload.py): the batch
is cut into `micro_batches` sub-batches; per layer, each sub-batch's dense work runs on the
compute devices (its own pass over the weights), its q|k|v go out and its attention output
comes back, and the attention devices scan one sub-batch at a time. Per layer the step then
takes the longest of: the attention devices' scans of all sub-batches, the compute side's dense
work and exchanges of all sub-batches, and one sub-batch's round (its dense work, exchange and
scan: the next layer of a sub-batch cannot start before its attention output is back). One
sub-batch is the serial sum. The attention rate is the memory class's bandwidth times its
calibration's `memory_efficiency`: for host memory, the measured scan rate of the attention
worker over the measured DRAM read bandwidth (policies/host_memory.py).

The class mirrors ReplicaPerformance's decode interface (`iteration`, `kv_capacity_tokens`,
`decode_step_time_s`, `max_decode_batch_for_tpot`, `power_w`) so the planner and the simulator
use it as a decode replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import ModelArchitecture
from tessera.policies.efficiency import Calibration, calibration_for
from tessera.policies.perfmodel import (
    OFFLOADED_MAX_RUNNING_REQUESTS,
    IterationCost,
    PrefillChunk,
    ReplicaPerformance,
    device_power_w,
    largest_decode_batch,
)

MICRO_BATCHES = 2


class OffloadedDecodePerformance:
    """A decode replica: `compute_tp` compute devices plus `attention_devices` memory devices."""

    def __init__(
        self,
        architecture: ModelArchitecture,
        compute: AcceleratorClassSpec,
        compute_tp: int,
        memory: AcceleratorClassSpec,
        attention_devices: int,
        compute_calibration: Calibration | None = None,
        memory_calibration: Calibration | None = None,
        micro_batches: int = MICRO_BATCHES,
    ) -> None:
        if attention_devices < 1:
            raise ValueError(f"attention_devices must be >= 1, got {attention_devices}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches
        self.architecture = architecture
        self.compute = ReplicaPerformance(architecture, compute, compute_tp, compute_calibration)
        self.memory = memory
        self.attention_devices = attention_devices
        self.memory_calibration = memory_calibration or calibration_for(memory)
        self.max_running_requests = OFFLOADED_MAX_RUNNING_REQUESTS

    @property
    def tensor_parallel(self) -> int:
        return self.compute.tensor_parallel

    @property
    def accelerator(self) -> AcceleratorClassSpec:
        return self.compute.accelerator

    @cached_property
    def kv_capacity_tokens(self) -> int:
        usable = self.memory.memory_bytes * self.memory_calibration.memory_utilization
        usable -= self.memory_calibration.activation_reserve_bytes
        per_device = max(0.0, usable) // self.architecture.kv_bytes_per_token
        return int(per_device) * self.attention_devices

    def fits(self, min_kv_tokens: int | None = None) -> bool:
        weights_fit = self.compute.kv_capacity_tokens > 0
        needed = min_kv_tokens or self.architecture.max_context_tokens
        return weights_fit and self.kv_capacity_tokens >= needed

    @cached_property
    def _attention_bandwidth_bytes_s(self) -> float:
        per_device = (
            self.memory.memory_bandwidth_gbps * 1e9 * self.memory_calibration.memory_efficiency
        )
        return per_device * self.attention_devices

    @cached_property
    def _attention_flops_s(self) -> float:
        peak = self.memory.peak_tflops.for_dtype(self.architecture.dtype.value) * 1e12
        return peak * self.memory_calibration.compute_efficiency * self.attention_devices

    @cached_property
    def _link_bytes_s(self) -> float:
        link_gbps = min(
            self.compute.accelerator.network_bandwidth_gbps * self.tensor_parallel,
            self.memory.network_bandwidth_gbps * self.attention_devices,
        )
        return link_gbps * 1e9

    def sub_batch_rows(self, batch: int) -> list[int]:
        """Rows of the step's sub-batches as the engine cuts them (evenly, in order; fewer
        rows than sub-batches run as one)."""
        count = self.micro_batches if batch >= self.micro_batches else 1
        return [batch * (i + 1) // count - batch * i // count for i in range(count)]

    def _parts(self, decode_context_tokens: Sequence[int]) -> list[tuple[float, float, float]]:
        """Per sub-batch (dense, attention, exchange) seconds over all layers. Each sub-batch
        scans its rows' share of the step's context: the cost depends on the total context
        only (the simulator's fast-forward relies on it), and a serving batch mixes long and
        short contexts in every sub-batch."""
        batch = len(decode_context_tokens)
        context = sum(decode_context_tokens)
        return [
            self._sub_batch_times_s(rows, context * rows / batch)
            for rows in self.sub_batch_rows(batch)
        ]

    def stage_times_s(self, decode_context_tokens: Sequence[int]) -> tuple[float, float, float]:
        """(linear layers, attention, query/output transfer) seconds for one decode step,
        summed over its sub-batches (each sub-batch reads the weights once)."""
        return _summed(self._parts(decode_context_tokens))

    def _sub_batch_times_s(self, batch: int, context: float) -> tuple[float, float, float]:
        """(dense, attention, exchange) seconds of one sub-batch of `batch` rows attending to
        `context` cached tokens in all, over all layers."""
        arch = self.architecture
        linear = self.compute.iteration(decode_context_tokens=[0] * batch)
        linear_s = linear.time_s - self.compute.calibration.iteration_overhead_s
        kv_bytes = (context + batch) * arch.kv_bytes_per_token
        attention_flops = 4.0 * arch.num_layers * arch.num_attention_heads * arch.resolved_head_dim
        attention_s = max(
            kv_bytes / self._attention_bandwidth_bytes_s,
            context * attention_flops / self._attention_flops_s,
        )
        head_bytes = arch.resolved_head_dim * arch.dtype.bytes
        # Per token and layer: queries out, attention output back, the new K and V out.
        per_token_bytes = 2 * arch.num_attention_heads * head_bytes
        per_token_bytes += 2 * arch.num_key_value_heads * head_bytes
        per_layer_bytes = batch * per_token_bytes
        transfer_s = arch.num_layers * (
            per_layer_bytes / self._link_bytes_s + self.memory_calibration.allreduce_latency_s
        )
        return linear_s, attention_s, transfer_s

    def iteration(
        self, prefill: Sequence[PrefillChunk] = (), decode_context_tokens: Sequence[int] = ()
    ) -> IterationCost:
        """Cost of one decode step; an offloaded replica does not prefill."""
        if prefill:
            raise ValueError("an attention-offloaded replica runs decode only; prefill elsewhere")
        if not decode_context_tokens:
            return IterationCost(0.0, 0.0, 0.0, 0.0)
        parts = self._parts(decode_context_tokens)
        linear_s, attention_s, transfer_s = _summed(parts)
        # Each term is the sum over layers of a per-layer bound (module docstring).
        layers_s = max(
            attention_s,
            linear_s + transfer_s,
            max(dense + attention + exchange for dense, attention, exchange in parts),
        )
        time_s = layers_s + self.compute.calibration.iteration_overhead_s
        return IterationCost(time_s, linear_s, attention_s, transfer_s)

    def decode_step_time_s(self, batch: int, mean_context_tokens: float) -> float:
        if batch <= 0:
            return 0.0
        return self.iteration(decode_context_tokens=[int(mean_context_tokens)] * batch).time_s

    def max_decode_batch_for_tpot(
        self, tpot_s: float, mean_context_tokens: float, upper: int = OFFLOADED_MAX_RUNNING_REQUESTS
    ) -> int:
        return largest_decode_batch(
            self.decode_step_time_s, self.kv_capacity_tokens, tpot_s, mean_context_tokens, upper
        )

    def kv_transfer_time_s(self, tokens: int, link_gbps: float | None = None) -> float:
        link = link_gbps or self.memory.network_bandwidth_gbps
        return tokens * self.architecture.kv_bytes_per_token / (link * 1e9)

    def power_w(self, busy_fraction: float, compute_bound: bool) -> float:
        """Compute devices at their phase's draw plus memory devices at memory-bound draw."""
        compute_w = self.compute.power_w(busy_fraction, compute_bound)
        memory_w = device_power_w(
            self.memory, self.memory_calibration, busy_fraction, compute_bound=False
        )
        return compute_w + self.attention_devices * memory_w


def _summed(parts: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(dense, attention, exchange) seconds of a step: its sub-batches' summed."""
    linear_s, attention_s, transfer_s = (sum(stage) for stage in zip(*parts, strict=True))
    return linear_s, attention_s, transfer_s
