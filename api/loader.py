"""Reading Tessera resources from YAML, with errors that name the file, object and field."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel, ValidationError
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


def describe_validation_error(
    error: ValidationError, where: str, model: type[BaseModel] | None = None
) -> str:
    """One line per problem, each naming the field path as it is spelled in YAML and, for a
    bounded number, its valid range (pydantic's "should be a finite number" names no range)."""
    lines = [f"{where} is invalid:"]
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(document)"
        bounds = field_bounds(model, problem["loc"]) if model is not None else None
        suffix = f" (valid range: {bounds})" if bounds else ""
        lines.append(f"  {path}: {problem['msg']}{suffix}")
    return "\n".join(lines)


_BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def field_bounds(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The numeric bounds of the field at `loc` (YAML spelling), e.g. "> 0, <= 1", if any.

    Walks the model's fields, through optionals, lists and mappings, so the range shown is the
    one the model enforces, not a copy that could drift from it.
    """
    annotation: Any = model
    field = None
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for name, f in annotation.model_fields.items() if part in (name, f.alias)),
                None,
            )
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict) and typing.get_args(annotation):
            field, annotation = None, typing.get_args(annotation)[-1]
        else:
            return None
    if field is None:
        return None
    bounds = [
        f"{_BOUND_SYMBOLS[kind]} {getattr(meta, kind):g}"
        for meta in field.metadata
        for kind in _BOUND_SYMBOLS
        if isinstance(getattr(meta, kind, None), int | float)
    ]
    return ", ".join(bounds) or None


def _strip_optional(annotation: Any) -> Any:
    """X from `X | None` (or Optional[X]); anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


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
            describe_validation_error(error, f"{where} {kind}/{name}", RESOURCE_TYPES[kind])
        ) from error


def load_resources(path: Path | str) -> list[CustomResource]:
    """All Tessera resources in a (multi-document) YAML file; other kinds are an error, and so
    is a file with no document at all (an empty file is a mistake, not a valid set of none)."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as error:
        raise InvalidResourceError(f"{path}: not valid YAML: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidResourceError(f"{path}: cannot be read: {error}") from error
    if not documents:
        raise InvalidResourceError(
            f"{path}: no YAML documents (empty file); expected Tessera resources"
        )
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
    """Validate Tessera resources in FILES; exit 2 naming every invalid field (or empty file)."""
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
        raise SystemExit(2)
