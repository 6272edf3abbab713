"""Pieces shared by every Tessera resource: the base model, conditions, resource metadata."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from pydantic.alias_generators import to_camel

GROUP = "tessera.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

PriorityTier = Literal["critical", "high", "normal", "low"]
"""Tiers of importance: power capping and migration touch low tiers first."""

PRIORITY_TIERS_LOW_FIRST: tuple[PriorityTier, ...] = ("low", "normal", "high", "critical")

INT64_MAX = 2**63 - 1
"""Largest integer the API server stores (a CRD `integer` is an int64)."""


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, snake_case in Python, no unknown fields.

    Unknown fields are errors (not silently dropped) so that a typo in a spec is reported with
    the field's name instead of being ignored. Non-finite numbers (YAML's `.inf`, `.nan`) are
    errors in every float field: no bound like `gt=0` excludes infinity, JSON (and so the API
    server) cannot carry them, and a planner or simulator fed one divides by it.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        """Integers beyond int64 (in a field, or a list's or mapping's values) are refused: the
        API server cannot store them, and the planner's float arithmetic overflows on them (a
        400-digit numLayers crashed it)."""
        items = list(value.values()) if isinstance(value, dict) else value
        for item in items if isinstance(items, list) else [value]:
            if isinstance(item, int) and not -INT64_MAX - 1 <= item <= INT64_MAX:
                raise ValueError(f"must fit a Kubernetes int64 (|x| <= {INT64_MAX})")
        return value

    def to_wire(self) -> dict[str, Any]:
        """The Kubernetes (camelCase, no nulls) form of this object."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel_rules(*rules: tuple[str, str]) -> ConfigDict:
    """ApiModel config carrying Kubernetes CEL validation rules (rule, message) into the CRD.

    The same constraints are enforced by the models' validators; the rules let the API server
    reject an invalid object at `kubectl apply` time too.
    """
    validations: list[JsonValue] = [{"rule": rule, "message": message} for rule, message in rules]
    extra: dict[str, JsonValue] = {"x-kubernetes-validations": validations}
    return ConfigDict(**ApiModel.model_config, json_schema_extra=extra)


class Condition(ApiModel):
    """One status condition, in the shape of Kubernetes' metav1.Condition."""

    type: str = Field(description="Condition type: Ready, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition.")
    reason: str = Field(
        default="",
        description="One CamelCase word a program can match on, e.g. PlanApplied or Infeasible.",
    )
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was set from."
    )


def utc_now() -> datetime:
    """The current time in UTC, whole seconds (Kubernetes' RFC 3339 timestamps carry none)."""
    return datetime.now(UTC).replace(microsecond=0)


class ObjectMeta(BaseModel):
    """The subset of Kubernetes ObjectMeta Tessera reads; anything else is kept as-is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class CustomResourceInfo(BaseModel):
    """How a resource is published as a CRD (names, scope, printer columns)."""

    kind: str
    plural: str
    singular: str
    short_names: list[str]
    scope: Literal["Namespaced", "Cluster"]
    categories: list[str] = Field(default_factory=lambda: ["tessera"])
    printer_columns: list[dict[str, Any]] = Field(default_factory=list)


class CustomResource(BaseModel):
    """Base of a whole custom resource: apiVersion, kind, metadata, spec, status."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    crd: ClassVar[CustomResourceInfo]

    api_version: Literal["tessera.dev/v1alpha1"] = Field(
        default="tessera.dev/v1alpha1", alias="apiVersion"
    )
    kind: str
    metadata: ObjectMeta

    def to_wire(self) -> dict[str, Any]:
        """The Kubernetes (camelCase, no nulls) form of this object."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
