"""Reading Tessera resources from YAML, with errors that name the file, object and field."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError
from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.common import API_VERSION, CustomResource
from tessera.api.model_deployment import ModelDeployment
from tessera.api.power_budget import PowerBudget
from tessera.api.rebalance_policy import RebalancePolicy

RESOURCE_TYPES: dict[str, type[CustomResource]] = {
    cls.crd.kind: cls for cls in (ModelDeployment, AcceleratorClass, PowerBudget, RebalancePolicy)
}

R = TypeVar("R", bound=CustomResource)


class InvalidResourceError(ValueError):
    """A resource document does not match its model; the message names every bad field."""


def describe_validation_error(error: ValidationError, where: str) -> str:
    """One line per problem, each naming the field path as it is spelled in YAML."""
    lines = [f"{where} is invalid:"]
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(document)"
        lines.append(f"  {path}: {problem['msg']}")
    return "\n".join(lines)


def parse_resource(document: dict[str, Any], where: str = "document") -> CustomResource:
    """A typed resource from one decoded YAML/JSON document."""
    if not isinstance(document, dict):
        raise InvalidResourceError(f"{where}: expected a mapping, got {type(document).__name__}")
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION or kind not in RESOURCE_TYPES:
        raise InvalidResourceError(
            f"{where}: apiVersion/kind {api_version}/{kind} is not a Tessera resource "
            f"(expected {API_VERSION} and one of {', '.join(sorted(RESOURCE_TYPES))})"
        )
    name = (document.get("metadata") or {}).get("name", "?")
    try:
        return RESOURCE_TYPES[kind].model_validate(document)
    except ValidationError as error:
        raise InvalidResourceError(
            describe_validation_error(error, f"{where} {kind}/{name}")
        ) from error


def load_resources(path: Path | str) -> list[CustomResource]:
    """All Tessera resources in a (multi-document) YAML file; other kinds are an error."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as error:
        raise InvalidResourceError(f"{path}: not valid YAML: {error}") from error
    return [parse_resource(doc, f"{path}[{index}]") for index, doc in enumerate(documents)]


def load_kind(paths: Iterable[Path | str], kind: type[R]) -> list[R]:
    """Every resource of one kind in the files; other Tessera kinds are skipped."""
    found: list[R] = []
    for path in paths:
        found.extend(r for r in load_resources(path) if isinstance(r, kind))
    return found


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def validate_command(files: tuple[str, ...]) -> None:
    """Validate Tessera resources in FILES; exit 1 naming every invalid field."""
    failed = False
    for file in files:
        try:
            resources = load_resources(file)
        except InvalidResourceError as error:
            click.echo(str(error), err=True)
            failed = True
            continue
        for resource in resources:
            click.echo(f"{file}: {resource.kind}/{resource.metadata.name} ok")
    if failed:
        raise SystemExit(1)
