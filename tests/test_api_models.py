"""The API models accept the examples and reject bad specs with messages naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from api_samples import EXAMPLES, chat_deployment
from tessera.api.loader import InvalidResourceError, load_resources, parse_resource
from tessera.api.model_deployment import ModelDeployment, ServingMode, TrafficProfile


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path: Any) -> None:
    assert load_resources(path)


def test_camel_case_round_trip() -> None:
    document = chat_deployment()
    deployment = parse_resource(document)
    assert isinstance(deployment, ModelDeployment)
    assert deployment.spec.slo.ttft_ms == 500
    assert deployment.spec.serving_mode is ServingMode.AUTO
    wire = deployment.to_wire()
    assert wire["spec"]["slo"]["ttftMs"] == 500
    assert parse_resource(wire) == deployment


def _broken(path: str, value: Any) -> dict[str, Any]:
    document = chat_deployment()
    node = document
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.slo.ttftMs", -5, "spec.slo.ttftMs"),
        ("spec.slo.attainmentTarget", 1.5, "spec.slo.attainmentTarget"),
        ("spec.servingMode", "split-brain", "spec.servingMode"),
        ("spec.model.architecture.numKeyValueHeads", 5, "numKeyValueHeads"),
        ("spec.pools.decode", {"minReplicas": 9, "maxReplicas": 2}, "spec.pools.decode"),
        ("spec.traffic.profile", KeyError, "spec.traffic"),
        ("spec.slo.ttftMS", 100, "spec.slo.ttftMS"),
    ],
)
def test_invalid_specs_name_the_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(InvalidResourceError) as raised:
        parse_resource(_broken(path, value), "sample")
    assert expected in str(raised.value)
    assert "llama3-8b-chat" in str(raised.value)


def test_wrong_kind_is_named() -> None:
    with pytest.raises(InvalidResourceError, match="not a Tessera resource"):
        parse_resource({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})


def test_profile_fills_lengths() -> None:
    deployment = parse_resource(chat_deployment())
    assert isinstance(deployment, ModelDeployment)
    prompt, output = deployment.spec.traffic.resolved_lengths()
    assert deployment.spec.traffic.profile is TrafficProfile.CHAT
    assert prompt.mean > output.mean > 0


def test_parameter_count_of_llama3_8b_shape() -> None:
    deployment = parse_resource(chat_deployment())
    assert isinstance(deployment, ModelDeployment)
    parameters = deployment.spec.model.architecture.resolved_parameter_count
    assert 7.9e9 < parameters < 8.1e9
    assert deployment.spec.model.architecture.kv_bytes_per_token == 128 * 1024
