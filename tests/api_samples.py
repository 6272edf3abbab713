"""Shared sample resources for API and planner tests, read from the bundled examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.model_deployment import ModelDeploymentSpec, Plan
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import plan_deployment

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def chat_deployment() -> dict[str, Any]:
    """A fresh copy of the Llama-3-8B chat ModelDeployment document."""
    return copy.deepcopy(example_documents("llama3-8b-chat.yaml")[0])


def example_classes() -> dict[str, AcceleratorClassSpec]:
    """The bundled AcceleratorClasses by name (examples/accelerator-classes.yaml)."""
    resources = [
        AcceleratorClass.model_validate(d) for d in example_documents("accelerator-classes.yaml")
    ]
    return {r.metadata.name: r.spec for r in resources}


def spec_of(**changes: Any) -> ModelDeploymentSpec:
    """The chat ModelDeployment's spec with top-level `changes` applied."""
    document = chat_deployment()
    document["spec"].update(changes)
    return ModelDeploymentSpec.model_validate(document["spec"])


def plan_for(spec: ModelDeploymentSpec) -> Plan:
    """The planner's choice for `spec` over every bundled class."""
    return plan_deployment(spec, [ClassOffer(n, s) for n, s in example_classes().items()])
