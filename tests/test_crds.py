"""crds/ is generated from the models, structural, and agrees with the models on validity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from api_samples import EXAMPLES, chat_deployment, example_documents
from tessera.api.crdgen import build_crds, render_crd_files

ROOT = Path(__file__).resolve().parent.parent


def test_crds_directory_matches_models() -> None:
    expected = render_crd_files()
    on_disk = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert on_disk == expected, "crds/ drifted from tessera.api: run `tessera crds`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_walk(value, f"{path}[{index}]"))
    return found


@pytest.mark.parametrize("crd", build_crds(), ids=lambda c: c["metadata"]["name"])
def test_schema_is_structural(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for forbidden in ("$ref", "anyOf", "allOf", "oneOf", "title", "const", "$defs"):
            assert forbidden not in node, f"{forbidden} at {path}"
        if "properties" in node and path.rsplit(".", 1)[-1] != "properties":
            assert node.get("type") == "object", f"object without type at {path}"
            assert node.get("additionalProperties") is None, f"both at {path}"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"]
    assert crd["spec"]["names"]["categories"] == ["tessera"]


def _schema_for(kind: str) -> dict[str, Any]:
    for crd in build_crds():
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(kind)


EXAMPLE_DOCUMENTS = [
    document
    for name in sorted(path.name for path in EXAMPLES.glob("*.yaml"))
    for document in example_documents(name)
]


@pytest.mark.parametrize(
    "document",
    EXAMPLE_DOCUMENTS,
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_examples_pass_the_crd_schema(document: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(_schema_for(document["kind"])).validate(document)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["spec"]["slo"].update(ttftMs=0), "ttftMs"),
        (lambda d: d["spec"].update(servingMode="split-brain"), "servingMode"),
        (lambda d: d["spec"]["model"]["architecture"].pop("numLayers"), "numLayers"),
        (lambda d: d["spec"]["slo"].update(percentile="high"), "percentile"),
    ],
)
def test_crd_schema_rejects_invalid_specs(mutate: Any, field: str) -> None:
    document = chat_deployment()
    mutate(document)
    validator = jsonschema.Draft4Validator(_schema_for("ModelDeployment"))
    errors = list(validator.iter_errors(document))
    assert errors
    assert any(field in ".".join(map(str, e.absolute_path)) + e.message for e in errors)


def test_crd_yaml_parses_back() -> None:
    for text in render_crd_files().values():
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"
