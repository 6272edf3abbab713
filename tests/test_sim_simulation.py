"""Laws of the simulator: conservation, memory safety, agreement with the performance model,
scaling with hardware speed, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sim_samples import (
    CLASSES,
    NO_OVERHEAD,
    cluster,
    deployment,
    plan,
    pool,
    random_workload,
    scaled_class,
    schedulers,
    simulate,
    workload,
)
from tessera.api.model_deployment import Plan, PoolRole
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.perfmodel import PrefillChunk, ReplicaPerformance
from tessera.sim.instance import KvOvercommitError
from tessera.sim.simulation import DeploymentSetup, Simulation, SimulationSetupError

ARCH = deployment().spec.model.architecture
C = PoolRole.COLOCATED
P = PoolRole.PREFILL
D = PoolRole.DECODE
A = PoolRole.ATTENTION

PLANS: dict[str, Plan] = {
    "colocated": plan(pool(C, "h100", 2), pool(C, "a100", 1)),
    "disaggregated": plan(pool(P, "h100", 1), pool(D, "a100", 2)),
    "attention-offload": plan(pool(P, "h100", 1), pool(D, "h100", 1), pool(A, "a100", 1)),
}


def _instances(simulation: Simulation) -> list:
    return [i for d in simulation.deployments for p in d.pools for i in p.instances]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked"])
@pytest.mark.parametrize("layout", sorted(PLANS))
def test_every_request_finishes_once_and_kv_is_never_overcommitted(
    layout: str, chunked: bool
) -> None:
    # A small KV cache and a high rate force preemptions (recomputation) everywhere.
    dep = deployment(max_context_tokens=2048)
    load = random_workload(300, rate_per_s=40.0, max_prompt=1500, max_output=500)
    simulation, result = simulate(
        PLANS[layout],
        load,
        scheduler=schedulers(chunked=chunked, budget=512),
        the_deployment=dep,
        kv_capacity_tokens=4096,
    )
    assert (result.finish_count == 1).all()
    assert not result.rejected.any()
    assert result.preemption_count > 0, "the scenario must exercise preemption"
    assert (result.output_tokens == load.output_tokens).all()
    for instance in _instances(simulation):
        assert instance.peak_used_blocks <= instance.total_blocks
        assert instance.used_blocks == 0, f"{instance.name} leaked KV blocks"
        assert instance.pending_prefill_tokens == 0, f"{instance.name} miscounts prefill work"
        assert not instance.running and not instance.waiting and not instance.incoming
    assert (result.first_token_s >= result.arrival_s).all()
    assert (result.finish_s >= result.first_token_s).all()


def test_overcommitting_kv_blocks_is_caught() -> None:
    setup = DeploymentSetup("chat", deployment().spec, PLANS["colocated"], schedulers())
    simulation = Simulation(cluster(), [setup], [workload([0.0], [100], [10])])
    instance = _instances(simulation)[0]
    instance.used_blocks = instance.total_blocks + 1
    with pytest.raises(KvOvercommitError, match="KV blocks in use"):
        instance._check_blocks()


def test_prompts_longer_than_the_context_are_rejected_not_lost() -> None:
    load = workload([0.0, 1.0, 2.0], [100, 9000, 8000], [10, 10, 500])
    _, result = simulate(PLANS["colocated"], load)
    assert result.rejected.tolist() == [False, True, False]
    assert result.finish_count.tolist() == [1, 0, 1]
    assert result.output_tokens[2] == ARCH.max_context_tokens - 8000
    assert result.attainment() < 1.0


def _decode_sum(
    perf: ReplicaPerformance | OffloadedDecodePerformance, prompt: int, out: int
) -> float:
    return sum(perf.iteration(decode_context_tokens=[prompt + i]).time_s for i in range(out - 1))


LONE = workload([0.0, 500.0, 1000.0], [1000, 37, 3000], [50, 2, 300])
"""Requests far apart: each runs alone."""


@pytest.mark.parametrize("fast_forward", [True, False], ids=["fast-forward", "every-iteration"])
def test_one_request_at_a_time_takes_the_performance_models_sums(fast_forward: bool) -> None:
    _, result = simulate(plan(pool(C, "h100", 1)), LONE, fast_forward=fast_forward)
    perf = ReplicaPerformance(ARCH, CLASSES["h100"], 1)
    for i, (prompt, out) in enumerate(zip(LONE.prompt_tokens, LONE.output_tokens, strict=True)):
        prefill = perf.iteration(prefill=[PrefillChunk(int(prompt))]).time_s
        assert result.ttft_s[i] == pytest.approx(prefill, rel=1e-9)
        expected = prefill + _decode_sum(perf, int(prompt), int(out))
        assert result.e2e_s[i] == pytest.approx(expected, rel=1e-9)


def test_chunked_prefill_alone_takes_the_sum_of_its_chunks() -> None:
    _, result = simulate(plan(pool(C, "a100", 1)), LONE, scheduler=schedulers(True, 512))
    perf = ReplicaPerformance(ARCH, CLASSES["a100"], 1)
    for i, (prompt, out) in enumerate(zip(LONE.prompt_tokens, LONE.output_tokens, strict=True)):
        chunks = [PrefillChunk(min(512, int(prompt) - d), d) for d in range(0, int(prompt), 512)]
        prefill = sum(perf.iteration(prefill=[c]).time_s for c in chunks)
        assert result.ttft_s[i] == pytest.approx(prefill, rel=1e-9)
        expected = prefill + _decode_sum(perf, int(prompt), int(out))
        assert result.e2e_s[i] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("layout", ["disaggregated", "attention-offload"])
def test_disaggregated_latency_includes_the_kv_transfer(layout: str) -> None:
    the_plan = PLANS[layout]
    _, result = simulate(the_plan, LONE)
    prefill_perf = ReplicaPerformance(ARCH, CLASSES["h100"], 1)
    if layout == "disaggregated":
        decode_perf: ReplicaPerformance | OffloadedDecodePerformance = ReplicaPerformance(
            ARCH, CLASSES["a100"], 1
        )
        link = min(CLASSES["h100"].network_bandwidth_gbps, CLASSES["a100"].network_bandwidth_gbps)
    else:
        decode_perf = OffloadedDecodePerformance(ARCH, CLASSES["h100"], 1, CLASSES["a100"], 1)
        link = min(CLASSES["h100"].network_bandwidth_gbps, CLASSES["a100"].network_bandwidth_gbps)
    for i, (prompt, out) in enumerate(zip(LONE.prompt_tokens, LONE.output_tokens, strict=True)):
        prefill = prefill_perf.iteration(prefill=[PrefillChunk(int(prompt))]).time_s
        transfer = prefill_perf.kv_transfer_time_s(int(prompt), link)
        assert transfer > 0
        assert result.transfer_s[i] == pytest.approx(transfer, rel=1e-9)
        assert result.ttft_s[i] == pytest.approx(prefill + transfer, rel=1e-9)
        expected = prefill + transfer + _decode_sum(decode_perf, int(prompt), int(out))
        assert result.e2e_s[i] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked"])
@pytest.mark.parametrize("layout", sorted(PLANS))
def test_fast_forward_matches_stepping_every_iteration(layout: str, chunked: bool) -> None:
    # Dispatch by request counts: KV occupancy, which least-tokens reads, is published when an
    # instance's batch changes, so stepping every iteration would give the router fresher
    # numbers and legitimately different choices.
    dep = deployment(max_context_tokens=2048)
    load = random_workload(150, rate_per_s=25.0, max_prompt=1500, max_output=300)
    runs = [
        simulate(
            PLANS[layout],
            load,
            scheduler=schedulers(chunked, 512),
            the_deployment=dep,
            dispatch=DispatchPolicy.LEAST_REQUESTS,
            kv_capacity_tokens=6144,
            fast_forward=fast,
        )[1]
        for fast in (True, False)
    ]
    fast, exact = runs
    assert exact.iterations == fast.iterations
    assert exact.preemption_count == fast.preemption_count > 0
    np.testing.assert_allclose(fast.first_token_s, exact.first_token_s, rtol=1e-9)
    np.testing.assert_allclose(fast.finish_s, exact.finish_s, rtol=1e-9)
    assert fast.events < exact.events


@pytest.mark.parametrize("layout", sorted(PLANS))
def test_doubling_hardware_speed_halves_every_latency(layout: str) -> None:
    # Fixed per-iteration overheads do not scale with hardware: zero them. Arrivals twice as
    # fast keep the same queueing, so every time in the run should halve exactly.
    dep = deployment(max_context_tokens=2048)
    load = random_workload(120, rate_per_s=20.0, max_prompt=1500, max_output=300)
    calibrations = {name: NO_OVERHEAD for name in CLASSES}
    slow_cluster = cluster(calibrations=calibrations)
    fast_cluster = cluster(
        calibrations=calibrations,
        classes={name: scaled_class(spec, 2.0) for name, spec in CLASSES.items()},
    )
    config = schedulers(True, 512)
    _, slow = simulate(PLANS[layout], load, slow_cluster, config, dep, kv_capacity_tokens=6144)
    _, fast = simulate(
        PLANS[layout], load.scaled(2.0), fast_cluster, config, dep, kv_capacity_tokens=6144
    )
    assert slow.preemption_count == fast.preemption_count > 0
    np.testing.assert_allclose(fast.ttft_s, slow.ttft_s / 2, rtol=1e-9)
    np.testing.assert_allclose(fast.tpot_s, slow.tpot_s / 2, rtol=1e-9)
    np.testing.assert_allclose(fast.e2e_s, slow.e2e_s / 2, rtol=1e-9)


def test_same_seed_same_results_and_another_seed_differs() -> None:
    load = random_workload(200, rate_per_s=30.0)
    runs = [
        simulate(PLANS["colocated"], load, dispatch=DispatchPolicy.POWER_OF_TWO, seed=seed)[1]
        for seed in (7, 7, 8)
    ]
    first, again, other = runs
    for name in ("first_token_s", "finish_s", "preemptions", "power_w"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert first.energy_j == again.energy_j
    assert not np.array_equal(first.finish_s, other.finish_s)


def test_idle_cluster_draws_idle_power_for_the_whole_run() -> None:
    _, result = simulate(plan(pool(C, "h100", 2)), workload([0.0, 600.0], [10, 10], [2, 2]))
    idle_w = 2 * CLASSES["h100"].idle_power_w  # type: ignore[operator]
    busy_s = float(np.nansum(result.e2e_s))
    assert result.energy_j >= idle_w * result.makespan_s
    assert result.energy_j <= idle_w * result.makespan_s + busy_s * 2 * CLASSES["h100"].tdp_w


def test_power_cap_stretches_iterations_by_the_class_power_model() -> None:
    from tessera.policies.power_model import Actuation, class_power_model

    one = workload([0.0], [4000], [2])
    _, free = simulate(plan(pool(C, "h100", 1)), one)
    _, capped = simulate(plan(pool(C, "h100", 1)), one, cluster(power_cap_w={"h100": 200.0}))
    model = class_power_model("h100", CLASSES["h100"])
    slowdown = model.phase_slowdown(True, Actuation(power_limit_w=200.0))
    assert slowdown > 3
    assert capped.ttft_s[0] == pytest.approx(free.ttft_s[0] * slowdown, rel=1e-9)
    assert capped.power_w.max() <= 200.0 + 1e-9


def test_a_pool_whose_kv_cannot_hold_one_context_is_refused() -> None:
    with pytest.raises(SimulationSetupError, match="maxContextTokens"):
        simulate(
            PLANS["colocated"],
            workload([0.0], [10], [2]),
            kv_capacity_tokens=1024,
        )
