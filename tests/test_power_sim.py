"""The PowerBudget controller inside the simulator (sim/power.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sim_samples import cluster, deployment, plan, pool, random_workload, schedulers
from tessera.api.model_deployment import PoolRole
from tessera.api.power_budget import PowerBudgetSpec
from tessera.policies.perfmodel import PrefillChunk
from tessera.policies.power_model import Actuation, class_power_model
from tessera.sim.metrics import RunResult
from tessera.sim.power import PowerOutcome, SimulatedPowerController
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation
from tessera.sim.stepcost import StepCost

PRIORITIES = {"chat": "high", "batch": "low"}
INTERVAL_S = 1.0


def build() -> Simulation:
    spec = deployment().spec
    layout = plan(pool(PoolRole.PREFILL, "h100", 1), pool(PoolRole.DECODE, "h100", 1))
    setups = [
        DeploymentSetup(name, spec.model_copy(update={"priority": tier}), layout, schedulers())
        for name, tier in PRIORITIES.items()
    ]
    loads = [random_workload(500, 9.0, seed=s, max_prompt=2500, max_output=300) for s in (1, 2)]
    return Simulation(cluster({"h100": 1}), setups, loads, SimConfig(seed=0))


def run(budget_w: float | None) -> tuple[RunResult, PowerOutcome | None]:
    simulation = build()
    controller = None
    if budget_w is not None:
        spec = PowerBudgetSpec(budget_w=budget_w, control_interval_seconds=INTERVAL_S)
        controller = SimulatedPowerController(simulation, spec, PRIORITIES)
    result = simulation.run()
    return result, controller.outcome(result.makespan_s) if controller else None


@pytest.fixture(scope="module")
def reference() -> RunResult:
    return run(None)[0]


def test_a_budget_that_never_binds_changes_nothing(reference: RunResult) -> None:
    result, outcome = run(1e6)
    assert outcome is not None
    np.testing.assert_array_equal(result.finish_s, reference.finish_s)
    assert result.energy_j == pytest.approx(reference.energy_j)  # pool tracks still fed
    assert outcome.summary()["capping_rounds"] == 0
    np.testing.assert_allclose(outcome.draw_w, outcome.uncapped_w)
    assert outcome.decisions >= int(reference.makespan_s / INTERVAL_S) - 1
    model = class_power_model("h100", cluster().classes["h100"])
    assert outcome.draw_w.min() >= 4 * model.idle_w - 1e-6
    assert outcome.draw_w.max() <= 4 * model.busy_draw_w(1.0) + 1e-6


def test_a_tight_budget_slows_low_priority_first_and_holds_the_budget(
    reference: RunResult,
) -> None:
    uncapped = run(1e6)[1]
    assert uncapped is not None
    peak_w = float(uncapped.draw_w.max())
    budget_w = 0.65 * peak_w  # above what the floors allow (4 x 350 W), below long peaks
    result, outcome = run(budget_w)
    assert outcome is not None
    share = outcome.capped_share_by_priority
    assert share["low"] > 0.0
    assert share["low"] >= share["high"]
    over_uncapped_s = float((uncapped.draw_w > budget_w).sum()) * uncapped.bin_s
    assert sum(outcome.breaches_s()) < 0.5 * over_uncapped_s
    unchecked = PowerOutcome(
        uncapped.bin_s, INTERVAL_S, budget_w, uncapped.draw_w, uncapped.draw_w, [], {}, 0
    )
    assert unchecked.longest_breach_s() > 2 * INTERVAL_S  # without the controller: long ones
    assert outcome.longest_breach_s() <= 2 * INTERVAL_S

    # Who paid: the low tier's requests slowed more than the high tier's.
    def mean_e2e(r: RunResult, index: int) -> float:
        return float(np.nanmean(r.e2e_s[r.deployment == index]))

    low = mean_e2e(result, 1) / mean_e2e(reference, 1)
    high = mean_e2e(result, 0) / mean_e2e(reference, 0)
    assert low > 1.0
    assert low > high


def test_capped_iterations_take_the_models_phase_slowdowns() -> None:
    simulation = build()
    base = simulation.deployments[0].pools[0].instances[0].cost
    model = class_power_model("h100", cluster().classes["h100"])
    limit = Actuation(power_limit_w=300.0)
    capped = StepCost.under(base, model, limit)
    prefill = [PrefillChunk(4096)]
    base_s, bound = base.iteration(prefill, [])
    capped_s, _ = capped.iteration(prefill, [])
    assert bound
    assert capped_s == pytest.approx(base_s * model.phase_slowdown(True, limit))
    decode = [1024] * 8
    base_s, bound = base.iteration([], decode)
    capped_s, _ = capped.iteration([], decode)
    assert not bound
    assert capped_s == pytest.approx(base_s * model.phase_slowdown(False, limit))
    assert model.phase_slowdown(True, limit) > model.phase_slowdown(False, limit) > 1.0
