"""Host memory as the attention device of an offloaded decode replica (Lamina, the cheap way).

Every GPU host has DRAM and CPU cores: more memory than its GPUs, a fraction of their memory
bandwidth, little compute. That is the premise of attention offload (a device with memory and
bandwidth but too little compute to serve the model alone), so a host is described as an
AcceleratorClass of kind CPU whose numbers mean, for `OffloadedDecodePerformance`:

- `memoryGib`: the DRAM an attention worker may hold KV in;
- `memoryBandwidthGbps`: the DRAM read bandwidth its cores reach (a STREAM-like read; the
  attention kernel's share of it is the calibration's `memory_efficiency`: the attention
  worker's measured KV scan rate over the measured DRAM read, `scan_calibration`, as
  bench/attention_offload_bench.py measures both and writes the host's calibration file);
- `peakTflops`: the cores' bf16 rate (attention is bandwidth-bound; this only caps it);
- `networkBandwidthGbps`: the link between the compute device and the worker (PCIe plus the
  worker's transport), which the per-layer q/k/v and output exchange crosses;
- `costPerHour`: what the DRAM and cores cost beside the GPU (often near zero: they are paid
  for with the node).

`predict_offloaded_decode` and `predict_decode` are the planner's step-time predictions for
one shape, in the form a bench compares against its measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from tessera.api.accelerator_class import AcceleratorClassSpec, PeakTflops
from tessera.api.model_deployment import ModelArchitecture
from tessera.policies.attention_offload import MICRO_BATCHES, OffloadedDecodePerformance
from tessera.policies.efficiency import Calibration
from tessera.policies.perfmodel import ReplicaPerformance

HOST_MEMORY_KIND: Literal["CPU"] = "CPU"
HOST_MEMORY_MODEL_PREFIX = "host-dram"
"""A host-memory class's `model` starts with this (e.g. host-dram-h200-node)."""


def host_memory_class(
    *,
    name: str,
    memory_gib: float,
    dram_bandwidth_gbps: float,
    link_gbps: float,
    cpu_bf16_tflops: float,
    cost_per_hour: float = 0.0,
    tdp_w: float = 350.0,
    node_selector: dict[str, str] | None = None,
) -> AcceleratorClassSpec:
    """The AcceleratorClass of a host's DRAM and cores (see the module docstring)."""
    return AcceleratorClassSpec(
        vendor="host",
        kind=HOST_MEMORY_KIND,
        model=f"{HOST_MEMORY_MODEL_PREFIX}-{name}",
        memory_gib=memory_gib,
        memory_bandwidth_gbps=dram_bandwidth_gbps,
        peak_tflops=PeakTflops(bf16=cpu_bf16_tflops),
        tdp_w=tdp_w,
        network_bandwidth_gbps=link_gbps,
        accelerators_per_node=1,
        cost_per_hour=cost_per_hour,
        node_selector=dict(node_selector or {}),
        resource_name="cpu",
    )


def is_host_memory(spec: AcceleratorClassSpec) -> bool:
    return spec.kind == HOST_MEMORY_KIND and spec.model.startswith(HOST_MEMORY_MODEL_PREFIX)


def host_calibration(
    attention_efficiency: float,
    exchange_latency_s: float,
    memory_utilization: float = 0.9,
    reserve_gib: float = 8.0,
) -> Calibration:
    """A host's calibration: the attention kernel's share of DRAM bandwidth, the fixed cost of
    one layer's exchange, and the DRAM the worker may take (the OS and the engine keep the rest)."""
    return Calibration(
        compute_efficiency=1.0,
        memory_efficiency=attention_efficiency,
        allreduce_latency_s=exchange_latency_s,
        memory_utilization=memory_utilization,
        activation_reserve_bytes=reserve_gib * 2**30,
        source="host memory (measured)",
    )


def scan_calibration(
    scan_gbps: float,
    dram_read_gbps: float,
    exchange_latency_s: float,
    source: str,
    memory_utilization: float = 0.9,
    reserve_gib: float = 8.0,
) -> Calibration:
    """A host's calibration from its measured component rates: the attention worker's KV scan
    rate (bench/host_attention_bench.py) as a share of the DRAM read bandwidth the host class
    carries, and the fixed cost of one sub-batch's per-layer exchange."""
    if scan_gbps <= 0 or dram_read_gbps <= 0:
        raise ValueError(
            f"scan_gbps ({scan_gbps}) and dram_read_gbps ({dram_read_gbps}) must be > 0"
        )
    return replace(
        host_calibration(
            scan_gbps / dram_read_gbps, exchange_latency_s, memory_utilization, reserve_gib
        ),
        source=source,
    )


@dataclass(frozen=True)
class DecodePrediction:
    """A predicted decode step for one shape (batch sequences of `context_tokens` each)."""

    batch: int
    context_tokens: int
    fits: bool
    kv_capacity_tokens: int
    step_s: float
    linear_s: float = 0.0
    attention_s: float = 0.0
    transfer_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s if self.step_s > 0 else 0.0

    def per_layer_exchange_s(self, num_layers: int) -> float:
        return self.transfer_s / num_layers


def predict_offloaded_decode(
    architecture: ModelArchitecture,
    compute: AcceleratorClassSpec,
    memory: AcceleratorClassSpec,
    batch: int,
    context_tokens: int,
    *,
    compute_tp: int = 1,
    attention_devices: int = 1,
    compute_calibration: Calibration | None = None,
    memory_calibration: Calibration | None = None,
    micro_batches: int = MICRO_BATCHES,
) -> DecodePrediction:
    """The planner's step for `batch` decodes over `context_tokens` with attention offloaded,
    in `micro_batches` pipelined sub-batches."""
    perf = OffloadedDecodePerformance(
        architecture,
        compute,
        compute_tp,
        memory,
        attention_devices,
        compute_calibration,
        memory_calibration,
        micro_batches,
    )
    contexts = [context_tokens] * batch
    cost = perf.iteration(decode_context_tokens=contexts)
    linear_s, attention_s, transfer_s = perf.stage_times_s(contexts)
    return DecodePrediction(
        batch=batch,
        context_tokens=context_tokens,
        fits=perf.kv_capacity_tokens >= batch * (context_tokens + 1),
        kv_capacity_tokens=perf.kv_capacity_tokens,
        step_s=cost.time_s,
        linear_s=linear_s,
        attention_s=attention_s,
        transfer_s=transfer_s,
    )


def predict_decode(
    architecture: ModelArchitecture,
    compute: AcceleratorClassSpec,
    batch: int,
    context_tokens: int,
    *,
    tensor_parallel: int = 1,
    calibration: Calibration | None = None,
) -> DecodePrediction:
    """The planner's step for `batch` decodes on the compute devices alone (KV in HBM)."""
    perf = ReplicaPerformance(architecture, compute, tensor_parallel, calibration)
    return DecodePrediction(
        batch=batch,
        context_tokens=context_tokens,
        fits=perf.kv_capacity_tokens >= batch * (context_tokens + 1),
        kv_capacity_tokens=perf.kv_capacity_tokens,
        step_s=perf.decode_step_time_s(batch, context_tokens),
    )


def largest_fitting_batch(
    architecture: ModelArchitecture,
    compute: AcceleratorClassSpec,
    context_tokens: int,
    *,
    tensor_parallel: int = 1,
    calibration: Calibration | None = None,
) -> int:
    """The most sequences of `context_tokens` whose KV fits beside the weights in HBM."""
    perf = ReplicaPerformance(architecture, compute, tensor_parallel, calibration)
    return max(0, perf.kv_capacity_tokens // (context_tokens + 1))
