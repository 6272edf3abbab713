"""Every custom resource model either validates a document or names the field that is wrong.

Hypothesis replaces one field of a complete, valid document of each kind (every optional number
set, status included) with a hostile value: NaN, infinities, negatives, huge numbers, strings,
lists, maps, None. The model must then accept it, in which case its wire form is JSON the API
server can carry (finite floats, int64 integers) and reads back the same, or raise a pydantic
ValidationError whose location is the field (or whose model-level message names it).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from api_samples import chat_deployment, example_documents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.common import CustomResource
from tessera.api.loader import InvalidResourceError, parse_resource
from tessera.api.model_deployment import ModelDeployment
from tessera.api.power_budget import PowerBudget
from tessera.api.rebalance_policy import RebalancePolicy

Path = tuple[str | int, ...]

CONDITION = {
    "type": "Ready",
    "status": "True",
    "reason": "PlanApplied",
    "message": "ok",
    "lastTransitionTime": "2026-12-01T20:00:00Z",
    "observedGeneration": 3,
}


def _deployment() -> dict[str, Any]:
    document = chat_deployment()
    document["spec"]["model"]["architecture"].update({"headDim": 128, "parameterCount": 8 * 10**9})
    document["spec"]["traffic"]["promptTokens"] = {"mean": 1000, "stddev": 500, "max": 8192}
    document["spec"]["traffic"]["outputTokens"] = {"mean": 200, "stddev": 100, "max": 2048}
    document["spec"]["hardware"] = {"acceleratorClasses": ["h100"], "maxAccelerators": 16}
    document["status"] = {
        "observedGeneration": 3,
        "conditions": [CONDITION],
        "readyReplicas": 2,
        "endpoint": "http://x:8000",
        "plan": {
            "mode": "colocated",
            "costPerHour": 8.0,
            "powerW": 1400.0,
            "predictedTtftMs": 120.5,
            "predictedTpotMs": 30.5,
            "predictedAttainment": 0.95,
            "simulatedAttainment": 0.93,
            "rationale": "cheapest",
            "pools": [
                {
                    "name": "colocated-h100",
                    "role": "colocated",
                    "acceleratorClass": "h100",
                    "tensorParallel": 1,
                    "replicas": 2,
                    "prefillChunkTokens": 512,
                    "maxRunningRequests": 128,
                    "predictedLoad": {
                        "requestRatePerSecond": 5.0,
                        "tokensPerSecond": 6000.0,
                        "utilization": 0.5,
                    },
                }
            ],
        },
    }
    return document


def _accelerator_class() -> dict[str, Any]:
    document = copy.deepcopy(example_documents("accelerator-classes.yaml")[0])
    document["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    document["status"] = {"nodes": 2, "capacity": 16, "allocated": 4}
    return document


def _power_budget() -> dict[str, Any]:
    return {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": "row-a"},
        "spec": {
            "nodeSelector": {"row": "a"},
            "budgetW": 20000.0,
            "oversubscriptionRatio": 1.25,
            "thresholds": {"capAbove": 0.95, "uncapBelow": 0.85, "emergencyAbove": 1.0},
            "actions": ["lower-power-limit", "migrate"],
            "minPowerFraction": 0.5,
            "priorityOrder": ["low", "normal"],
            "controlIntervalSeconds": 2.0,
        },
        "status": {
            "observedGeneration": 1,
            "conditions": [CONDITION],
            "drawW": 15000.5,
            "cappedDevices": 3,
        },
    }


def _rebalance_policy() -> dict[str, Any]:
    return {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "RebalancePolicy",
        "metadata": {"name": "nightly"},
        "spec": {
            "nodeSelector": {"pool": "gpu"},
            "intervalSeconds": 300.0,
            "moveBudget": 5,
            "objective": "power",
            "movable": {
                "kinds": ["Pod", "VirtualMachine"],
                "selector": {"app": "x"},
                "excludePriorities": ["critical"],
                "useLiveMigration": True,
            },
            "minImprovement": 0.02,
            "dryRun": False,
        },
        "status": {
            "observedGeneration": 1,
            "conditions": [CONDITION],
            "lastRoundTime": "2026-12-01T20:00:00Z",
            "movesLastRound": 2,
        },
    }


SAMPLES: dict[type[CustomResource], dict[str, Any]] = {
    ModelDeployment: _deployment(),
    AcceleratorClass: _accelerator_class(),
    PowerBudget: _power_budget(),
    RebalancePolicy: _rebalance_policy(),
}


def _leaves(node: Any, path: Path = ()) -> list[Path]:
    """Paths of every scalar in a document (mapping values and list items)."""
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(node, list):
        return [leaf for i, value in enumerate(node) for leaf in _leaves(value, (*path, i))]
    return [path]


def _replaced(document: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    node: Any = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


LEAVES = [(model, path) for model, sample in SAMPLES.items() for path in _leaves(sample)]


def _get(document: dict[str, Any], path: Path) -> Any:
    node: Any = document
    for part in path:
        node = node[part]
    return node


NUMERIC_LEAVES = [
    pytest.param(model, path, id=f"{model.__name__}.{'.'.join(map(str, path))}")
    for model, path in LEAVES
    if isinstance(_get(SAMPLES[model], path), int | float)
    and not isinstance(_get(SAMPLES[model], path), bool)
]

HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0, -1, 2**63, 2**70]),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _names_field(problem: dict[str, Any], path: Path) -> bool:
    """The error is located at the field (or inside it), or at an enclosing model whose
    message names the field."""
    loc = tuple(problem["loc"])
    if loc[: len(path)] == path:
        return True
    return path[: len(loc)] == loc and str(path[-1]) in problem["msg"]


def _storable(node: Any) -> bool:
    """Numbers the API server can store: finite floats, integers that fit an int64."""
    if isinstance(node, dict):
        return all(_storable(v) for v in node.values())
    if isinstance(node, list):
        return all(_storable(v) for v in node)
    if isinstance(node, float):
        return math.isfinite(node)
    return not isinstance(node, int) or -(2**63) <= node < 2**63


def test_the_samples_are_valid() -> None:
    for model, sample in SAMPLES.items():
        resource = model.model_validate(sample)
        assert model.model_validate(resource.to_wire()) == resource


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from(LEAVES), value=HOSTILE)
def test_a_model_validates_or_names_the_field(
    leaf: tuple[type[CustomResource], Path], value: Any
) -> None:
    model, path = leaf
    document = _replaced(SAMPLES[model], path, value)
    try:
        resource = model.model_validate(document)
    except ValidationError as error:
        problems = error.errors()
        assert problems
        assert all(_names_field(p, path) for p in problems), (path, value, problems)
        return
    wire = resource.to_wire()
    assert _storable(wire), (path, value, wire)
    json.dumps(wire, allow_nan=False)  # the API server takes JSON: no NaN or Infinity in it
    assert model.model_validate(wire) == resource


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(("model", "path"), NUMERIC_LEAVES)
def test_non_finite_numbers_are_invalid_in_every_field(
    model: type[CustomResource], path: Path, value: float
) -> None:
    document = _replaced(SAMPLES[model], path, value)
    with pytest.raises(InvalidResourceError) as raised:
        parse_resource(document, "sample")
    field = ".".join(map(str, path))
    assert f"  {field}: " in str(raised.value)


@pytest.mark.parametrize(("model", "path"), NUMERIC_LEAVES)
def test_integers_beyond_int64_are_invalid_in_every_field(
    model: type[CustomResource], path: Path
) -> None:
    """A 400-digit numLayers used to validate and then overflow the planner's arithmetic."""
    document = _replaced(SAMPLES[model], path, 10**400)
    with pytest.raises(InvalidResourceError) as raised:
        parse_resource(document, "sample")
    assert f"  {'.'.join(map(str, path))}: " in str(raised.value)
