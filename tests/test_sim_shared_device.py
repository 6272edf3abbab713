"""Instances that time-share one device (sim/shared_device.py): processor sharing.

The ground truth is the same run with every instance on a device of its own: there each step's
wall time is its work. Sharing must divide speed by the number of busy members, re-time a step
in flight when another member starts or ends one, never lose or invent work, and leave pools
outside a SharedDevice untouched."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
from sim_samples import CLASSES, cluster, deployment, plan, random_workload, schedulers, workload
from tessera.api.model_deployment import Plan, PoolPlan, PoolRole
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.efficiency import calibration_for
from tessera.sim.metrics import RunResult
from tessera.sim.shared_device import SharedDevice, even_split_capacity
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation, SimulationSetupError
from tessera.sim.workload import Workload

DEPLOYMENT = deployment(max_context_tokens=4096)
C, P, D = PoolRole.COLOCATED, PoolRole.PREFILL, PoolRole.DECODE


def _pool(name: str, role: PoolRole, accelerator: str = "h100", replicas: int = 1) -> PoolPlan:
    return PoolPlan(
        name=name, role=role, accelerator_class=accelerator, tensor_parallel=1, replicas=replicas
    )


TWO_COLOCATED = plan(_pool("a", C), _pool("b", C))
"""Two colocated instances; a request at t=0 goes to a, the next (a busy) to b."""
DISAGGREGATED = plan(_pool("prefill", P), _pool("decode", D))


def _run(
    the_plan: Plan,
    load: Workload,
    shared: tuple[str, ...] = (),
    kv_capacity_tokens: Mapping[str, int] | None = None,
    fast_forward: bool = True,
    dispatch: DispatchPolicy = DispatchPolicy.LEAST_TOKENS,
) -> tuple[Simulation, RunResult]:
    setup = DeploymentSetup("chat", DEPLOYMENT.spec, the_plan, schedulers(), dispatch)
    devices = (SharedDevice("chat", shared, dict(kv_capacity_tokens or {})),) if shared else ()
    config = SimConfig(seed=0, fast_forward=fast_forward, shared_devices=devices)
    simulation = Simulation(cluster({"h100": 1}), [setup], [load], config)
    return simulation, simulation.run()


def _busy_s(simulation: Simulation, pool: int) -> float:
    """Wall seconds the pool's instances were busy (its power track's busy time)."""
    track = simulation.deployments[0].pools[pool].power
    return sum(track.compute) + sum(track.memory)


@pytest.mark.parametrize("fast_forward", [True, False], ids=["fast-forward", "every-iteration"])
def test_two_busy_instances_each_take_twice_as_long(fast_forward: bool) -> None:
    load = workload([0.0, 0.0], [1000, 1000], [50, 50])
    own, alone = _run(TWO_COLOCATED, load, fast_forward=fast_forward)
    together, shared = _run(TWO_COLOCATED, load, ("a", "b"), fast_forward=fast_forward)
    assert alone.iterations == shared.iterations
    np.testing.assert_allclose(shared.ttft_s, 2 * alone.ttft_s, rtol=1e-9)
    np.testing.assert_allclose(shared.e2e_s, 2 * alone.e2e_s, rtol=1e-9)
    # Busy time stretches with its split by roof: a compute-bound prefill stays compute-bound.
    for pool in (0, 1):
        mine = own.deployments[0].pools[pool].power
        ours = together.deployments[0].pools[pool].power
        assert sum(mine.compute) > 0 and sum(mine.memory) > 0
        assert sum(ours.compute) == pytest.approx(2 * sum(mine.compute), rel=1e-9)
        assert sum(ours.memory) == pytest.approx(2 * sum(mine.memory), rel=1e-9)


@pytest.mark.parametrize(
    ("the_plan", "shared"),
    [(TWO_COLOCATED, ("a", "b")), (DISAGGREGATED, ("prefill", "decode"))],
    ids=["colocated", "disaggregated"],
)
def test_a_member_alone_on_the_device_runs_at_full_speed(
    the_plan: Plan, shared: tuple[str, ...]
) -> None:
    # Requests far apart: one member busy at a time (a disaggregated request's prefill ends
    # before its decode starts).
    load = workload([0.0, 500.0, 1000.0], [1000, 37, 3000], [50, 2, 300])
    _, alone = _run(the_plan, load)
    _, together = _run(the_plan, load, shared)
    np.testing.assert_allclose(together.first_token_s, alone.first_token_s, rtol=1e-12)
    np.testing.assert_allclose(together.finish_s, alone.finish_s, rtol=1e-12)


@pytest.mark.parametrize("second_prompt", [3000, 200], ids=["first-ends-first", "second-first"])
def test_a_step_started_mid_step_is_retimed_exactly(second_prompt: int) -> None:
    # One prefill each (output 1: the request ends with its first token). Alone they take
    # w1 and w2. The second starts at x = w1 / 2, when the first has w1 - x of work left; from
    # then on each runs at half speed until one ends, then the other at full speed.
    probe = workload([0.0, 0.0], [2000, second_prompt], [1, 1])
    _, alone = _run(TWO_COLOCATED, probe)
    w1, w2 = alone.ttft_s
    x = w1 / 2
    load = workload([0.0, x], [2000, second_prompt], [1, 1])
    _, shared = _run(TWO_COLOCATED, load, ("a", "b"))
    # Either the first ends first, having shared for w1 - x of work, or the second ends first,
    # after 2 * w2, and the first then finishes its work alone; the last ends at w1 + w2.
    first_ends_first = w2 > w1 - x
    expected = [x + 2 * (w1 - x), w1 + w2] if first_ends_first else [w1 + w2, x + 2 * w2]
    assert first_ends_first == (second_prompt == 3000), "the scenario must hit its case"
    np.testing.assert_allclose(shared.finish_s, expected, rtol=1e-12)


def test_sharing_conserves_work() -> None:
    # Every request arrives at t=0, so each instance runs the same steps in the same order as
    # on a device of its own, only slower; the device never idles while work remains, so the
    # last request ends after the sum of both instances' work.
    rng = np.random.default_rng(5)
    count = 40
    load = workload(
        [0.0] * count, rng.integers(16, 2000, count).tolist(), rng.integers(2, 300, count).tolist()
    )
    own, alone = _run(TWO_COLOCATED, load)
    work_a, work_b = _busy_s(own, 0), _busy_s(own, 1)
    assert work_a > 0 and work_b > 0
    together, shared = _run(TWO_COLOCATED, load, ("a", "b"))
    assert shared.iterations == alone.iterations
    assert float(np.max(shared.finish_s)) == pytest.approx(work_a + work_b, rel=1e-9)
    # Stretched by sharing, each instance is busy from t=0 until its last request: the one with
    # less work ends after twice its work, the other at the makespan.
    busy = sorted((_busy_s(together, 0), _busy_s(together, 1)))
    assert busy[0] == pytest.approx(2 * min(work_a, work_b), rel=1e-9)
    assert busy[1] == pytest.approx(work_a + work_b, rel=1e-9)


def test_fast_forwarded_runs_match_stepping_every_iteration_on_a_shared_device() -> None:
    # Arrivals and KV transfers cut decode runs of the decode member while the prefill member
    # slows it down and speeds it up: the cut must find the iteration in progress from the work
    # done, not the wall time. Dispatch by counts, as test_sim_simulation's twin does.
    load = random_workload(150, rate_per_s=6.0, max_prompt=1500, max_output=300)
    runs = [
        _run(
            DISAGGREGATED,
            load,
            ("prefill", "decode"),
            fast_forward=fast,
            dispatch=DispatchPolicy.LEAST_REQUESTS,
        )[1]
        for fast in (True, False)
    ]
    fast, exact = runs
    assert exact.iterations == fast.iterations
    np.testing.assert_allclose(fast.first_token_s, exact.first_token_s, rtol=1e-9)
    np.testing.assert_allclose(fast.finish_s, exact.finish_s, rtol=1e-9)
    assert fast.events < exact.events
    # And sharing costs something at this load: the same run on two devices is faster.
    _, own = _run(DISAGGREGATED, load, dispatch=DispatchPolicy.LEAST_REQUESTS)
    assert float(np.mean(own.e2e_s)) < float(np.mean(fast.e2e_s))


def test_pools_outside_a_shared_device_are_unchanged() -> None:
    load = random_workload(120, rate_per_s=8.0, max_prompt=1500, max_output=300)
    other = random_workload(120, rate_per_s=8.0, seed=2, max_prompt=1500, max_output=300)
    setups = [
        DeploymentSetup("chat", DEPLOYMENT.spec, DISAGGREGATED, schedulers()),
        DeploymentSetup("other", DEPLOYMENT.spec, TWO_COLOCATED, schedulers()),
    ]
    shared = (SharedDevice("chat", ("prefill", "decode")),)
    results = [
        Simulation(cluster({"h100": 2}), setups, [load, other], SimConfig(shared_devices=s)).run()
        for s in ((), shared)
    ]
    own, partly = results
    mine = own.deployment == 1
    assert mine.sum() == len(other)
    np.testing.assert_array_equal(partly.finish_s[mine], own.finish_s[mine])
    np.testing.assert_array_equal(partly.first_token_s[mine], own.first_token_s[mine])
    assert not np.array_equal(partly.finish_s[~mine], own.finish_s[~mine])


def test_each_member_holds_its_own_kv_share() -> None:
    simulation, _ = _run(
        DISAGGREGATED,
        workload([0.0], [100], [5]),
        ("prefill", "decode"),
        kv_capacity_tokens={"prefill": 8192, "decode": 40_000},
    )
    prefill, decode = (p.instances[0] for p in simulation.deployments[0].pools)
    assert prefill.capacity_tokens == 8192
    assert decode.capacity_tokens == 40_000
    assert prefill.share is decode.share is not None
    # Not given: an even split of the device's memory, weights in each half.
    simulation, _ = _run(DISAGGREGATED, workload([0.0], [100], [5]), ("prefill", "decode"))
    prefill = simulation.deployments[0].pools[0].instances[0]
    whole = prefill.cost.perf.kv_capacity_tokens
    half = even_split_capacity(prefill.cost.perf, 2)
    assert half is not None and 0 < half < whole / 2
    assert prefill.capacity_tokens == half // 16 * 16


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ((SharedDevice("nope", ("a", "b")),), "deployment nope"),
        ((SharedDevice("chat", ("a", "c")),), "pool c"),
        ((SharedDevice("chat", ("a", "b")), SharedDevice("chat", ("b", "x"))), "two SharedDevices"),
    ],
)
def test_bad_shared_devices_are_named(devices: tuple[SharedDevice, ...], message: str) -> None:
    setup = DeploymentSetup("chat", DEPLOYMENT.spec, TWO_COLOCATED, schedulers())
    with pytest.raises(SimulationSetupError, match=message):
        Simulation(
            cluster(), [setup], [workload([0.0], [10], [2])], SimConfig(shared_devices=devices)
        )


def test_pools_on_different_hardware_cannot_share() -> None:
    mixed = plan(_pool("a", C), _pool("b", C, "a100"))
    setup = DeploymentSetup("chat", DEPLOYMENT.spec, mixed, schedulers())
    config = SimConfig(shared_devices=(SharedDevice("chat", ("a", "b")),))
    with pytest.raises(SimulationSetupError, match="same replicas, acceleratorClass"):
        Simulation(cluster(), [setup], [workload([0.0], [10], [2])], config)


@pytest.mark.parametrize(
    ("pools", "kv", "message"),
    [
        (("a",), {}, "at least 2"),
        (("a", "a"), {}, "twice"),
        (("a", "b"), {"c": 10}, "names c"),
        (("a", "b"), {"a": 0}, r"kv_capacity_tokens\[a\] must be > 0"),
    ],
)
def test_a_shared_device_checks_its_fields(
    pools: tuple[str, ...], kv: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SharedDevice("chat", pools, kv)


def _overlap_run(
    prompts: list[int], overhead_s: float, overlap: bool
) -> tuple[Simulation, RunResult]:
    """Two single-prefill requests at t=0 on the two colocated members, under `overhead_s`
    of per-iteration host-side work."""
    setup = DeploymentSetup("chat", DEPLOYMENT.spec, TWO_COLOCATED, schedulers())
    devices = (SharedDevice("chat", ("a", "b"), overlap_host_overhead=True),) if overlap else ()
    calibration = replace(calibration_for(CLASSES["h100"]), iteration_overhead_s=overhead_s)
    simulation = Simulation(
        cluster({"h100": 1}, calibrations={"h100": calibration}),
        [setup],
        [workload([0.0, 0.0], prompts, [1, 1])],
        SimConfig(shared_devices=devices),
    )
    return simulation, simulation.run()


@pytest.mark.parametrize(
    ("prompts", "overhead_s", "case"),
    [
        ([2000, 2000], 1.5e-3, "both-slowed"),
        ([2000, 16], 0.01, "light-one-at-full-speed"),
        ([4000, 16], 0.5, "no-one-slowed"),
    ],
)
def test_host_overhead_leaves_the_device_to_the_other_member(
    prompts: list[int], overhead_s: float, case: str
) -> None:
    # Each step of work w holds the device for f = 1 - h / w. The device is split max-min
    # fairly between the demands: the lighter gets min(f_light, 1/2), the heavier the rest up
    # to its f; a member progresses at granted / f, and at 1 once the other has finished.
    _, alone = _overlap_run(prompts, overhead_s, overlap=False)
    w = alone.finish_s
    f = 1 - overhead_s / w
    light = int(np.argmin(f))
    heavy = 1 - light
    granted = np.empty(2)
    granted[light] = min(f[light], 0.5)
    granted[heavy] = min(f[heavy], 1 - granted[light])
    rate = granted / f
    first = int(np.argmin(w / rate))  # ends first, at w / rate
    other = 1 - first
    expected = np.empty(2)
    expected[first] = w[first] / rate[first]
    expected[other] = expected[first] + (w[other] - expected[first] * rate[other])
    _, shared = _overlap_run(prompts, overhead_s, overlap=True)
    np.testing.assert_allclose(shared.finish_s, expected, rtol=1e-12)
    # Each scenario exercises the case it is named after.
    slowed = rate < 1
    assert {
        "both-slowed": slowed.all(),
        "light-one-at-full-speed": slowed[heavy] and not slowed[light],
        "no-one-slowed": not slowed.any(),
    }[case]


def test_overlapping_host_overhead_keeps_fast_forward_close_to_stepping() -> None:
    # A fast-forwarded decode run holds the device for one fraction over the run, stepping
    # for each iteration's own: close, not equal.
    load = random_workload(150, rate_per_s=6.0, max_prompt=1500, max_output=300)
    setup = DeploymentSetup(
        "chat", DEPLOYMENT.spec, DISAGGREGATED, schedulers(), DispatchPolicy.LEAST_REQUESTS
    )
    devices = (SharedDevice("chat", ("prefill", "decode"), overlap_host_overhead=True),)
    runs = [
        Simulation(
            cluster({"h100": 1}),
            [setup],
            [load],
            SimConfig(fast_forward=fast, shared_devices=devices),
        ).run()
        for fast in (True, False)
    ]
    fast, exact = runs
    np.testing.assert_allclose(fast.finish_s, exact.finish_s, rtol=1e-3)
    _, plain = _run(
        DISAGGREGATED, load, ("prefill", "decode"), dispatch=DispatchPolicy.LEAST_REQUESTS
    )
    # Host work off the device: less contention than plain processor sharing.
    assert float(np.mean(fast.e2e_s)) < float(np.mean(plain.e2e_s))
