"""Live migration and autoscaling in the simulator (sim/migration.py, sim/autoscale.py): requests
move without being lost or duplicated and KV is never overcommitted; an aborted migration leaves
the request where it was; the stall is what the costs say; scaling follows the observed rate,
down only after the delay, and a drained replica stops being paid once empty."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sim_samples import CLASSES, deployment, plan, pool, random_workload, schedulers, workload
from tessera.api.model_deployment import PoolRole, ServingMode
from tessera.policies.dispatch import DispatchPolicy
from tessera.policies.migration import MigrationSettings
from tessera.policies.placement import plan_deployment
from tessera.policies.replan import ReplanSettings
from tessera.sim.autoscale import AutoscaleSettings, ReplicaState, SimulatedAutoscaler
from tessera.sim.cluster import Cluster
from tessera.sim.migration import MigrationCosts, SimulatedMigrator
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.workload import Workload

COLOCATED = plan(pool(PoolRole.COLOCATED, "h100", 2))
DISAGGREGATED = plan(pool(PoolRole.PREFILL, "h100", 1), pool(PoolRole.DECODE, "h100", 3))


def imbalanced() -> Workload:
    """Round robin over two replicas: every long answer lands on replica 0."""
    count = 120
    output = [900 if i % 2 == 0 else 20 for i in range(count)]
    return workload([i * 0.05 for i in range(count)], [600] * count, output)


def build(
    the_plan=COLOCATED,  # type: ignore[no-untyped-def]
    load: Workload | None = None,
    kv_capacity_tokens: int | None = 60_000,
    dispatch: DispatchPolicy = DispatchPolicy.ROUND_ROBIN,
    nodes: int = 1,
) -> Simulation:
    dep = deployment(max_context_tokens=4096)
    setup = DeploymentSetup(
        "chat", dep.spec, the_plan, schedulers(chunked=True, budget=512), dispatch
    )
    config = SimConfig(seed=0, kv_capacity_tokens=kv_capacity_tokens)
    cluster = Cluster("test", dict(CLASSES), {"h100": nodes})
    return Simulation(cluster, [setup], [load or imbalanced()], config)


def check_conservation(simulation: Simulation, load: Workload) -> None:
    result = simulation.run()
    assert (result.finish_count == 1).all(), "a request was lost or finished twice"
    assert (result.output_tokens == load.output_tokens).all()
    for deployment_ in simulation.deployments:
        for p in deployment_.pools:
            for instance in p.instances:
                assert instance.peak_used_blocks <= instance.total_blocks
                assert instance.used_blocks == 0, f"{instance.name} leaked KV blocks"
                assert not instance.running and not instance.waiting and not instance.incoming


def test_an_imbalanced_pool_migrates_and_loses_no_request() -> None:
    load = imbalanced()
    simulation = build(load=load)
    migrator = SimulatedMigrator(simulation, MigrationSettings(source_min_load=0.1))
    check_conservation(simulation, load)
    stats = migrator.stats
    assert stats.committed > 0
    assert stats.by_reason.get("balance", 0) > 0
    assert not migrator.moving and not any(migrator.reserved.values())
    # Both replicas decoded long answers: the load was spread.
    assert all(i.iterations > 0 for i in simulation.deployments[0].entry.instances)


def test_migration_balances_the_decode_pool_of_a_disaggregated_plan() -> None:
    load = random_workload(200, rate_per_s=30.0, max_prompt=1500, max_output=800)
    simulation = build(DISAGGREGATED, load, kv_capacity_tokens=30_000)
    migrator = SimulatedMigrator(simulation, MigrationSettings(source_min_load=0.2))
    check_conservation(simulation, load)
    assert migrator.stats.committed > 0


def test_a_migration_outrun_by_its_request_aborts_and_the_request_finishes_at_home() -> None:
    load = imbalanced()
    simulation = build(load=load)
    slow = MigrationCosts(precopy_gbps=1e-6)  # pre-copy would take hours
    migrator = SimulatedMigrator(simulation, MigrationSettings(source_min_load=0.1), slow)
    check_conservation(simulation, load)
    assert migrator.stats.started > 0
    assert migrator.stats.committed == 0
    assert sum(migrator.stats.aborted.values()) == migrator.stats.started


def test_the_stall_is_the_measured_one_when_given(tmp_path: Path) -> None:
    measured = tmp_path / "costs.json"
    points = [
        {"context_tokens": 1024, "stall_ms": 100.0, "precopy_bytes": 2e9, "precopy_s": 0.1},
        {"context_tokens": 4096, "stall_ms": 400.0, "precopy_bytes": 4e9, "precopy_s": 0.2},
    ]
    measured.write_text(json.dumps({"points": points}))
    costs = MigrationCosts.from_json(measured)
    assert costs.precopy_gbps == pytest.approx(20.0)
    assert costs.stall_s(2560, copy_s=0.0) == pytest.approx(0.25)
    assert costs.stall_s(100_000, copy_s=0.0) == pytest.approx(0.4)  # flat past the ends
    load = imbalanced()
    simulation = build(load=load)
    migrator = SimulatedMigrator(simulation, MigrationSettings(source_min_load=0.1), costs)
    check_conservation(simulation, load)
    stalls = np.array(migrator.stats.stall_s)
    assert len(stalls) > 0 and ((stalls >= 0.1) & (stalls <= 0.4)).all()


def test_the_modelled_stall_is_the_last_tokens_over_the_link() -> None:
    load = imbalanced()
    simulation = build(load=load)
    migrator = SimulatedMigrator(simulation, MigrationSettings(source_min_load=0.1))
    check_conservation(simulation, load)
    perf = simulation.deployments[0].entry.instances[0].cost.perf
    one_block = perf.kv_transfer_time_s(16, 50.0)  # h100: 50 GB/s network
    stalls = np.array(migrator.stats.stall_s)
    assert len(stalls) and (stalls > 0).all()
    # Pre-copy overlaps decoding: what stops the request is a few blocks, not its context.
    longest = perf.kv_transfer_time_s(4096, 50.0)
    assert stalls.max() < longest / 10
    assert np.median(stalls) < 20 * one_block


def test_bad_costs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precopy_gbps"):
        MigrationCosts(precopy_gbps=0.0)
    with pytest.raises(ValueError, match="stall_context_tokens must increase"):
        MigrationCosts(stall_context_tokens=(2.0, 1.0), stall_ms=(1.0, 1.0))
    bench = tmp_path / "migration_bench.json"  # bench/migration_bench.py's shape: repeats
    rows = [
        {"context_tokens": 1024, "stall_ms": ms, "precopy_mib": 128.0, "precopy_s": 0.01}
        for ms in (10.0, 12.0, 30.0)
    ]
    bench.write_text(json.dumps({"rows": rows, "median_stall_ms_by_context": {"1024": 12.0}}))
    from_bench = MigrationCosts.from_json(bench)
    assert from_bench.stall_ms == (12.0,)
    assert from_bench.precopy_gbps == pytest.approx(128 * 2**20 / 0.01 / 1e9)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        MigrationCosts.from_json(bad)


# ---- autoscaling ------------------------------------------------------------------------------


def stepped_load() -> Workload:
    """1 req/s, then 25 req/s for 100 s, then 1 req/s again (Poisson, seeded); long answers, so
    that replicas drained when the load falls still hold requests."""
    rng = np.random.default_rng(3)
    times: list[float] = []
    for start, end, rate in ((0, 40, 1.0), (40, 140, 25.0), (140, 300, 1.0)):
        t = float(start)
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= end:
                break
            times.append(t)
    count = len(times)
    return workload(
        times, rng.integers(100, 1500, count).tolist(), rng.integers(200, 1500, count).tolist()
    )


@functools.cache
def autoscaled(migration: bool) -> tuple[Simulation, SimulatedAutoscaler, SimulatedMigrator | None]:
    """The planner's colocated H100 layout, built with 8 replicas, 1 in service at first."""
    load = stepped_load()
    spec = deployment(max_context_tokens=4096).spec.model_copy(
        update={"serving_mode": ServingMode.COLOCATED}
    )
    cluster = Cluster("test", dict(CLASSES), {"h100": 1})
    planned = plan_deployment(spec, [o for o in cluster.offers() if o.name == "h100"])
    top = planned.model_copy(
        update={"pools": [p.model_copy(update={"replicas": 8}) for p in planned.pools]}
    )
    setup = DeploymentSetup("chat", spec, top, dispatch=DispatchPolicy.LEAST_VIRTUAL_USAGE)
    simulation = Simulation(cluster, [setup], [load], SimConfig(seed=0))
    settings = AutoscaleSettings(
        interval_s=10.0,
        window_s=30.0,
        startup_s=5.0,
        replan=ReplanSettings(
            scale_down_delay_s=60.0, relayout_min_gain=math.inf, relayout_delay_s=math.inf
        ),
    )
    scaler = SimulatedAutoscaler(simulation, {top.pools[0].name: 1}, settings)
    migrator = SimulatedMigrator(simulation) if migration else None
    check_conservation(simulation, load)
    return simulation, scaler, migrator


def test_the_pool_scales_up_with_the_rate_and_down_only_after_the_delay() -> None:
    simulation, scaler, _ = autoscaled(migration=False)
    counts = [(d.time_s, sum(d.replicas.values())) for d in scaler.decisions]
    peak_time, peak = max(counts, key=lambda c: c[1])
    assert peak > 1 and 40 <= peak_time <= 160
    ups = [d for d in scaler.decisions if d.changed and d.reason.startswith("scale up")]
    downs = [d for d in scaler.decisions if d.changed and d.reason.startswith("scale down")]
    assert ups and downs
    last_up = max(d.time_s for d in ups)
    assert min(d.time_s for d in downs) >= last_up + 60.0  # the hysteresis delay
    assert counts[-1][1] < peak
    assert scaler.drained > 0
    makespan = float(np.nanmax(simulation.finish_s))
    assert 0 < scaler.replica_hours(makespan) < 8 * makespan / 3600  # never all 8, all along


def test_a_draining_replica_gets_no_new_request_and_migration_empties_it_sooner() -> None:
    _, plain, _ = autoscaled(migration=False)
    _, moved, migrator = autoscaled(migration=True)
    assert migrator is not None and migrator.stats.by_reason.get("drain", 0) > 0
    assert plain.drained and moved.drained
    assert max(plain.drain_s) > 0, "the scenario must drain replicas that still hold requests"
    assert max(moved.drain_s) < max(plain.drain_s)
    for scaler in (plain, moved):
        off = [r for r in scaler.replicas if r.state is ReplicaState.OFF]
        assert off and all(not r.instance.running for r in off)
