"""Laws of the roofline performance model."""

from __future__ import annotations

from api_samples import chat_deployment, example_documents
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.model_deployment import ModelDeployment
from tessera.policies.efficiency import Calibration
from tessera.policies.perfmodel import PrefillChunk, ReplicaPerformance

H100 = AcceleratorClass.model_validate(example_documents("accelerator-classes.yaml")[0]).spec
ARCH = ModelDeployment.model_validate(chat_deployment()).spec.model.architecture
NO_OVERHEAD = Calibration(iteration_overhead_s=0.0, allreduce_latency_s=0.0)


def scaled(spec: AcceleratorClassSpec, factor: float) -> AcceleratorClassSpec:
    return spec.model_copy(
        update={
            "memory_bandwidth_gbps": spec.memory_bandwidth_gbps * factor,
            "peak_tflops": spec.peak_tflops.model_copy(
                update={"bf16": spec.peak_tflops.bf16 * factor}
            ),
            "interconnect_bandwidth_gbps": spec.interconnect_bandwidth_gbps * factor,
        }
    )


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    perf = ReplicaPerformance(ARCH, H100, 1, NO_OVERHEAD)
    assert not perf.iteration(decode_context_tokens=[1024]).compute_bound
    assert perf.iteration(prefill=[PrefillChunk(4096)]).compute_bound


def test_small_decode_step_reads_the_weights_once() -> None:
    perf = ReplicaPerformance(ARCH, H100, 1, NO_OVERHEAD)
    step = perf.decode_step_time_s(1, 0)
    weights_s = ARCH.weight_bytes / (
        H100.memory_bandwidth_gbps * 1e9 * NO_OVERHEAD.memory_efficiency
    )
    assert abs(step - weights_s) / weights_s < 0.01


def test_decode_time_grows_with_batch_and_context() -> None:
    perf = ReplicaPerformance(ARCH, H100, 1)
    assert perf.decode_step_time_s(64, 1024) > perf.decode_step_time_s(16, 1024)
    assert perf.decode_step_time_s(64, 4096) > perf.decode_step_time_s(64, 1024)


def test_doubling_hardware_speed_halves_iteration_time() -> None:
    slow = ReplicaPerformance(ARCH, H100, 2, NO_OVERHEAD)
    fast = ReplicaPerformance(ARCH, scaled(H100, 2.0), 2, NO_OVERHEAD)
    for prefill, decode in (([PrefillChunk(2048)], []), ([], [1000] * 32)):
        ratio = slow.iteration(prefill, decode).time_s / fast.iteration(prefill, decode).time_s
        assert abs(ratio - 2.0) < 1e-9


def test_chunked_prefill_costs_at_least_whole_prefill() -> None:
    perf = ReplicaPerformance(ARCH, H100, 1)
    assert perf.prefill_time_s(4096, chunk_tokens=512) >= perf.prefill_time_s(4096)


def test_tensor_parallel_frees_memory_for_kv() -> None:
    one = ReplicaPerformance(ARCH, H100, 1)
    two = ReplicaPerformance(ARCH, H100, 2)
    assert two.kv_capacity_tokens > 2 * one.kv_capacity_tokens


def test_power_between_idle_and_tdp() -> None:
    perf = ReplicaPerformance(ARCH, H100, 1)
    idle = perf.power_w(0.0, compute_bound=True)
    busy_compute = perf.power_w(1.0, compute_bound=True)
    busy_memory = perf.power_w(1.0, compute_bound=False)
    assert idle == H100.idle_power_w
    assert idle < busy_memory < busy_compute <= H100.tdp_w
