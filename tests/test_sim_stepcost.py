"""Closed-form runs of decode iterations agree with the performance model iteration by
iteration; a power cap slows iterations by the class power model, which follows the
measurements it was fitted to."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_samples import CLASSES, deployment
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.perfmodel import IterationCost, PrefillChunk, ReplicaPerformance
from tessera.policies.power_model import Actuation, class_power_model, h100_model
from tessera.sim.stepcost import DecodeCostShapeError, DecodeCurve, StepCost

ARCH = deployment().spec.model.architecture
MODELS = {
    "h100": ReplicaPerformance(ARCH, CLASSES["h100"], 1),
    "a100-tp2": ReplicaPerformance(ARCH, CLASSES["a100"], 2),
    "l40s": ReplicaPerformance(ARCH, CLASSES["l40s"], 1),
    "offloaded": OffloadedDecodePerformance(ARCH, CLASSES["h100"], 1, CLASSES["a100"], 2),
}
CURVES: dict[tuple[str, int], DecodeCurve] = {}


def _curve(model: str, batch: int) -> DecodeCurve:
    key = (model, batch)
    if key not in CURVES:
        CURVES[key] = DecodeCurve(MODELS[model], batch, batch * ARCH.max_context_tokens)
    return CURVES[key]


def _stepwise(model: str, contexts: list[int], steps: int) -> list[float]:
    perf = MODELS[model]
    return [
        perf.iteration(decode_context_tokens=[c + j for c in contexts]).time_s for j in range(steps)
    ]


@settings(max_examples=60, deadline=None)
@given(
    model=st.sampled_from(sorted(MODELS)),
    batch=st.sampled_from([1, 2, 7, 32, 150, 300]),
    data=st.data(),
)
def test_a_run_costs_the_sum_of_its_iterations(model: str, batch: int, data: st.DataObject) -> None:
    contexts = data.draw(st.lists(st.integers(1, 3000), min_size=batch, max_size=batch))
    steps = data.draw(st.integers(1, 400))
    times = _stepwise(model, contexts, steps)
    total, compute = _curve(model, batch).run(sum(contexts), steps)
    assert total == pytest.approx(sum(times), rel=1e-9)
    assert 0.0 <= compute <= total * (1 + 1e-12)
    elapsed = data.draw(st.floats(0.0, sum(times) * 1.2))
    done = _curve(model, batch).steps_until(sum(contexts), steps, elapsed)
    cumulative = 0.0
    expected = steps
    for j, t in enumerate(times, start=1):
        cumulative += t
        if cumulative > elapsed * (1 + 1e-12):
            expected = j
            break
    assert abs(done - expected) <= 1  # the boundary itself may round either way


def test_curves_find_the_roofline_kink() -> None:
    # A large batch of short contexts is compute-bound (FLOPs per weight byte); as contexts
    # grow, reading the KV cache makes it bandwidth-bound.
    curve = _curve("h100", 400)
    assert curve.bound[0] is True and curve.bound[-1] is False
    assert 2 <= len(curve.nodes) <= 6
    kink = curve.nodes[1]
    start = [max(1, kink // 400 - 100)] * 400
    times = _stepwise("h100", start, 300)
    total, compute = curve.run(sum(start), 300)
    assert total == pytest.approx(sum(times), rel=1e-9)
    assert 0 < compute < total


class SpreadSensitive:
    """A model whose decode cost depends on the longest context, not only the total."""

    kv_capacity_tokens = 10**6

    def iteration(
        self, prefill: object = (), decode_context_tokens: list[int] | tuple[int, ...] = ()
    ) -> IterationCost:
        longest = max(decode_context_tokens, default=0)
        return IterationCost(1e-3 + longest * 1e-6, 0.0, 1e-3, 0.0)

    def power_w(self, busy_fraction: float, compute_bound: bool) -> float:
        return 100.0


def test_a_model_the_closed_form_cannot_sum_is_refused_with_the_fix() -> None:
    with pytest.raises(DecodeCostShapeError, match="fast_forward=False"):
        DecodeCurve(SpreadSensitive(), 4, 4 * 1024)


SHARED_PROBE = Path(__file__).resolve().parents[2] / "shared/data/h100_power_probe.json"
PROBE_AGREEMENT = 0.11
"""The calibration's own statement of how far the short-loop probe's slowdowns are from the
bench's (agents/calibration/h100_power.json, `sources.probe`)."""


def test_power_cap_slowdowns_come_from_the_class_power_model_and_follow_the_measurements() -> None:
    calibration = json.loads(
        resources.files("tessera.agents").joinpath("calibration", "h100_power.json").read_text()
    )["workloads"]
    measured = {
        bound: next(
            p for p in calibration[phase]["power_limit_points"] if p["power_limit_w"] == 200
        )
        for bound, phase in ((True, "prefill"), (False, "decode"))
    }
    tdp = CLASSES["h100"].tdp_w
    model = class_power_model("h100", CLASSES["h100"])
    at_200 = StepCost(MODELS["h100"], ARCH.max_context_tokens, 200 / tdp, model)
    assert at_200.slowdown_compute == pytest.approx(measured[True]["slowdown"], rel=1e-3)
    assert at_200.slowdown_memory == pytest.approx(measured[False]["slowdown"], rel=1e-3)
    limit = Actuation(power_limit_w=200.0)
    assert at_200.slowdown_compute == model.phase_slowdown(True, limit)
    assert at_200.slowdown_memory == model.phase_slowdown(False, limit)
    if SHARED_PROBE.is_file():  # the independent probe agrees with the fitted model
        probe = json.loads(SHARED_PROBE.read_text())["at_200W_cap"]
        for slowdown, kernel in ((at_200.slowdown_compute, "prefill_gemm"),
                                 (at_200.slowdown_memory, "decode_gemv")):  # fmt: skip
            assert slowdown == pytest.approx(probe[kernel]["slowdown"], rel=PROBE_AGREEMENT)
    # Without a class model: the measured H100 at the same fraction of TDP.
    default = StepCost(MODELS["h100"], ARCH.max_context_tokens, 0.5)
    half = Actuation(power_limit_w=0.5 * h100_model().tdp_w)
    assert default.slowdown_compute == h100_model().phase_slowdown(True, half)
    free = StepCost(MODELS["h100"], ARCH.max_context_tokens, 1.0, model)
    assert free.slowdown_compute == free.slowdown_memory == 1.0
    caps = [0.3 + 0.05 * i for i in range(15)]
    for bound in (True, False):
        slowdowns = [
            getattr(
                StepCost(MODELS["h100"], ARCH.max_context_tokens, c, model),
                "slowdown_compute" if bound else "slowdown_memory",
            )
            for c in caps
        ]
        assert all(a >= b for a, b in itertools.pairwise(slowdowns))
        assert slowdowns[0] > 1.0


def test_step_cost_applies_the_cap_to_the_binding_roof() -> None:
    perf = MODELS["h100"]
    capped = StepCost(perf, ARCH.max_context_tokens, cap_fraction=300 / 700)
    free = StepCost(perf, ARCH.max_context_tokens)
    prefill = [PrefillChunk(4096)]
    ratio = capped.iteration(prefill, [])[0] / free.iteration(prefill, [])[0]
    assert ratio == pytest.approx(capped.slowdown_compute)
    decode_ratio = capped.iteration([], [1000] * 8)[0] / free.iteration([], [1000] * 8)[0]
    assert decode_ratio == pytest.approx(capped.slowdown_memory)
    assert capped.slowdown_compute > capped.slowdown_memory >= 1.0
