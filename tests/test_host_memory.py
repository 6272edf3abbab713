"""Host memory as an attention device: its class, its predictions, the planner and simulator.

The laws: KV beyond HBM fits in host memory; the offloaded step is bound by the host's
attention bandwidth (twice the bandwidth, about half the attention time) and never faster than
its slowest stage; the planner can place an offloaded decode pool's attention on the host
class and links the pools; the simulator's step cost of that plan is the prediction's. The
step's structure is the engine's: one sub-batch is the serial sum, two hide the dense work and
exchange behind the scans (or the scans behind a slow link's exchanges), each sub-batch reads
the weights, and the measured scan rate is the attention rate.
"""

from __future__ import annotations

import pytest
from sim_samples import CLASSES, cluster, deployment, simulate, workload
from tessera.api.model_deployment import PoolRole, ServingMode
from tessera.policies.capacity import ClassOffer
from tessera.policies.host_memory import (
    host_calibration,
    host_memory_class,
    is_host_memory,
    largest_fitting_batch,
    predict_decode,
    predict_offloaded_decode,
)
from tessera.policies.placement import plan_deployment

ARCH = deployment().spec.model.architecture.model_copy(update={"max_context_tokens": 8192})
H100 = CLASSES["h100"]
CONTEXT = 4096


def host(bandwidth_gbps: float = 200.0, link_gbps: float = 20.0) -> object:
    return host_memory_class(
        name="h100-node",
        memory_gib=1536,
        dram_bandwidth_gbps=bandwidth_gbps,
        link_gbps=link_gbps,
        cpu_bf16_tflops=50,
        cost_per_hour=0.3,
    )


CALIBRATION = host_calibration(attention_efficiency=0.5, exchange_latency_s=50e-6)


def test_a_host_class_is_a_cpu_class_the_planner_recognises() -> None:
    spec = host()
    assert is_host_memory(spec) and spec.kind == "CPU" and spec.resource_name == "cpu"
    assert not is_host_memory(H100) and not is_host_memory(CLASSES["cpu-spr"])


def test_a_batch_whose_kv_does_not_fit_in_hbm_fits_in_host_memory() -> None:
    fit = largest_fitting_batch(ARCH, H100, CONTEXT)
    big = 4 * fit
    assert not predict_decode(ARCH, H100, big, CONTEXT).fits
    assert predict_decode(ARCH, H100, fit, CONTEXT).fits
    offload = predict_offloaded_decode(
        ARCH, H100, host(), big, CONTEXT, memory_calibration=CALIBRATION
    )
    assert offload.fits and offload.kv_capacity_tokens >= big * (CONTEXT + 1)


def test_attention_bandwidth_bounds_the_offloaded_step() -> None:
    slow = predict_offloaded_decode(
        ARCH, H100, host(100), 256, CONTEXT, memory_calibration=CALIBRATION
    )
    fast = predict_offloaded_decode(
        ARCH, H100, host(200), 256, CONTEXT, memory_calibration=CALIBRATION
    )
    assert fast.attention_s == pytest.approx(slow.attention_s / 2, rel=1e-9)
    for p in (slow, fast):
        assert p.step_s >= max(p.linear_s, p.attention_s, p.transfer_s)
        assert p.step_s <= p.linear_s + p.attention_s + p.transfer_s + 0.01
    kv_bytes = 256 * (CONTEXT + 1) * ARCH.kv_bytes_per_token
    assert slow.attention_s == pytest.approx(kv_bytes / (100e9 * 0.5), rel=1e-9)
    # Per layer, the exchange carries q, k, v out and the output back for every sequence.
    assert slow.per_layer_exchange_s(ARCH.num_layers) > CALIBRATION.allreduce_latency_s


def test_the_planner_places_offloaded_attention_on_host_memory_and_the_sim_agrees() -> None:
    base = deployment().spec
    hardware = base.hardware.model_copy(update={"accelerator_classes": ["h100", "host-h100"]})
    slo = base.slo.model_copy(update={"tpot_ms": 200.0})  # a throughput-minded SLO
    spec = base.model_copy(
        update={"serving_mode": ServingMode.ATTENTION_OFFLOAD, "hardware": hardware, "slo": slo}
    )
    offers = [ClassOffer("h100", H100), ClassOffer("host-h100", host())]
    # Left to choose, the planner keeps the KV in HBM: host DRAM is too slow to win here.
    auto = plan_deployment(spec.model_copy(update={"serving_mode": ServingMode.AUTO}), offers)
    assert {p.accelerator_class for p in auto.pools} == {"h100"}
    # Told to offload, and the DRAM coming with the node (a two-socket host's 600 GB/s at no
    # extra cost), it puts the attention in host memory, one host per decode replica.
    memory = host(bandwidth_gbps=600.0).model_copy(update={"cost_per_hour": 0.0})
    offers = [ClassOffer("h100", H100), ClassOffer("host-h100", memory)]
    the_plan = plan_deployment(spec, offers)
    attention = next(p for p in the_plan.pools if p.role is PoolRole.ATTENTION)
    decode = next(p for p in the_plan.pools if p.role is PoolRole.DECODE)
    assert attention.accelerator_class == "host-h100"
    assert attention.tensor_parallel == 1 and attention.replicas == decode.replicas
    assert attention.attention_for == decode.name
    # One lone request: its decode in the simulator takes the prediction's steps.
    arch = spec.model.architecture
    lone = workload([0.0], [1000], [40])
    nodes = {"h100": 1, "host-h100": 1}
    _, result = simulate(
        the_plan, lone, cluster(nodes, classes={"h100": H100, "host-h100": memory})
    )
    steps = [
        predict_offloaded_decode(
            arch,
            H100,
            memory,
            1,
            1000 + i,
            compute_tp=decode.tensor_parallel,
            attention_devices=attention.tensor_parallel,
        ).step_s
        for i in range(39)
    ]
    decode_s = result.e2e_s[0] - result.ttft_s[0]  # the first token includes the KV transfer
    assert decode_s == pytest.approx(sum(steps), rel=1e-6)


# ---- the step's structure: the engine's sub-batch pipeline -----------------------------------


def offloaded(host_spec: object, micro_batches: int, calibration: object = CALIBRATION) -> object:
    from tessera.policies.attention_offload import OffloadedDecodePerformance

    return OffloadedDecodePerformance(
        ARCH, H100, 1, host_spec, 1, None, calibration, micro_batches=micro_batches
    )


def test_one_sub_batch_is_the_serial_sum_of_its_stages() -> None:
    perf = offloaded(host(), 1)
    contexts = [CONTEXT] * 64
    cost = perf.iteration(decode_context_tokens=contexts)
    overhead = perf.compute.calibration.iteration_overhead_s
    linear_s, attention_s, transfer_s = perf.stage_times_s(contexts)
    assert cost.time_s == pytest.approx(linear_s + attention_s + transfer_s + overhead, rel=1e-12)


def test_two_sub_batches_hide_the_dense_work_and_exchange_behind_the_scan() -> None:
    slow_dram = host(bandwidth_gbps=20.0)  # the scan dominates: both sub-batches' scans bound it
    contexts = [CONTEXT] * 256
    serial = offloaded(slow_dram, 1).iteration(decode_context_tokens=contexts)
    pipelined = offloaded(slow_dram, 2).iteration(decode_context_tokens=contexts)
    overhead = offloaded(slow_dram, 2).compute.calibration.iteration_overhead_s
    assert pipelined.time_s == pytest.approx(pipelined.memory_s + overhead, rel=1e-12)
    assert pipelined.memory_s == pytest.approx(serial.memory_s, rel=1e-12)  # same KV scanned
    assert pipelined.time_s < serial.time_s
    # A slow link instead: the compute side's exchanges of both sub-batches bound the step.
    slow_link = offloaded(host(bandwidth_gbps=5000.0, link_gbps=0.05), 2)
    cost = slow_link.iteration(decode_context_tokens=contexts)
    assert cost.time_s == pytest.approx(cost.compute_s + cost.communication_s + overhead)


def test_each_sub_batch_makes_its_own_pass_over_the_weights() -> None:
    contexts = [CONTEXT] * 8  # small: the dense layers are bound by reading the weights
    one = offloaded(host(), 1).stage_times_s(contexts)[0]
    two = offloaded(host(), 2).stage_times_s(contexts)[0]
    assert two == pytest.approx(2 * one, rel=0.05)


def test_fewer_rows_than_sub_batches_run_as_one() -> None:
    contexts = [CONTEXT]
    assert offloaded(host(), 2).sub_batch_rows(1) == [1]
    assert offloaded(host(), 2).iteration(decode_context_tokens=contexts).time_s == (
        offloaded(host(), 1).iteration(decode_context_tokens=contexts).time_s
    )
    assert offloaded(host(), 2).sub_batch_rows(5) == [2, 3]  # the engine's cuts: decode * i // n


def test_the_step_depends_on_the_total_context_only() -> None:
    """The simulator's fast-forward prices a batch by its total context."""
    perf = offloaded(host(bandwidth_gbps=20.0), 2)
    even = perf.iteration(decode_context_tokens=[CONTEXT] * 8).time_s
    skewed = perf.iteration(decode_context_tokens=[8 * CONTEXT] + [0] * 7).time_s
    assert even == pytest.approx(skewed, rel=1e-12)


def test_the_scan_rate_measured_on_the_host_sets_the_attention_time() -> None:
    from tessera.policies.host_memory import scan_calibration

    calibration = scan_calibration(
        scan_gbps=40.0, dram_read_gbps=80.0, exchange_latency_s=1e-4, source="bench"
    )
    assert calibration.memory_efficiency == pytest.approx(0.5)
    assert calibration.source == "bench"
    prediction = predict_offloaded_decode(
        ARCH, H100, host(bandwidth_gbps=80.0), 256, CONTEXT, memory_calibration=calibration
    )
    kv_bytes = 256 * (CONTEXT + 1) * ARCH.kv_bytes_per_token
    assert prediction.attention_s == pytest.approx(kv_bytes / 40e9, rel=1e-9)
    with pytest.raises(ValueError, match="scan_gbps"):
        scan_calibration(scan_gbps=0.0, dram_read_gbps=80.0, exchange_latency_s=0.0, source="x")


def test_micro_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        offloaded(host(), 0)


def test_the_colocated_step_reads_weights_and_kv_at_their_measured_rates() -> None:
    """The H200 calibration's KV rate is its most KV-dominated decode (longest context, largest
    batch): 0.917 of the measured copy bandwidth, against 0.782 for the weights."""
    from tessera.api.accelerator_class import PeakTflops
    from tessera.policies.efficiency import calibration_for

    h200 = H100.model_copy(
        update={
            "model": "H200-SXM-141GB",
            "memory_gib": 141,
            "memory_bandwidth_gbps": 4800.0,
            "peak_tflops": PeakTflops(bf16=989.0),
        }
    )
    calibration = calibration_for(h200)
    assert calibration.kv_memory_efficiency == pytest.approx(0.917 * 4183.9 / 4800, rel=1e-9)
    assert calibration.memory_efficiency == pytest.approx(0.681)
    batch = 240
    step = predict_decode(ARCH, h200, batch, CONTEXT).step_s
    kv_bytes = (batch * CONTEXT + batch) * ARCH.kv_bytes_per_token
    expected = ARCH.weight_bytes / (4800e9 * 0.681) + kv_bytes / (4800e9 * 0.917 * 4183.9 / 4800)
    assert step == pytest.approx(expected + calibration.iteration_overhead_s, rel=1e-9)
