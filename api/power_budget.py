"""PowerBudget: a power cap for a group of nodes and how far it may be oversubscribed (POLCA).

Its controller comes later; the contract is fixed now so that agents, the simulator and the
power policy can be written against it.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from tessera.api.common import (
    PRIORITY_TIERS_LOW_FIRST,
    ApiModel,
    Condition,
    CustomResource,
    CustomResourceInfo,
    PriorityTier,
    cel_rules,
)


class CappingThresholds(ApiModel):
    """When to cap and uncap, as fractions of the budget."""

    model_config = cel_rules(
        (
            "self.uncapBelow < self.capAbove && self.capAbove <= self.emergencyAbove",
            "thresholds must satisfy uncapBelow < capAbove <= emergencyAbove",
        )
    )

    cap_above: float = Field(
        default=0.95, gt=0, le=1.5, description="Start capping above this fraction of budget."
    )
    uncap_below: float = Field(
        default=0.85, gt=0, le=1.5, description="Release caps below this fraction (hysteresis)."
    )
    emergency_above: float = Field(
        default=1.0, gt=0, le=2, description="Cap everything to the minimum above this fraction."
    )

    @model_validator(mode="after")
    def _ordered(self) -> CappingThresholds:
        if not self.uncap_below < self.cap_above <= self.emergency_above:
            raise ValueError("thresholds must satisfy uncapBelow < capAbove <= emergencyAbove")
        return self


CappingAction = Literal["lower-power-limit", "lock-clocks", "migrate", "pause-best-effort"]


def _default_actions() -> list[CappingAction]:
    return ["lower-power-limit", "lock-clocks"]


class PowerBudgetSpec(ApiModel):
    """A provisioned power budget over a node group."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Nodes the budget covers (empty: all accelerator nodes)."
    )
    budget_w: float = Field(gt=0, description="Provisioned power for the group, watts.")
    oversubscription_ratio: float = Field(
        default=1.0,
        ge=1.0,
        le=2.0,
        description="Sum of device TDPs allowed, as a multiple of the budget (POLCA: up to ~1.3).",
    )
    thresholds: CappingThresholds = Field(default_factory=CappingThresholds)
    actions: list[CappingAction] = Field(
        default_factory=_default_actions,
        description="Actions in the order they are tried.",
    )
    min_power_fraction: float = Field(
        default=0.5, gt=0, le=1, description="Never cap a device below this fraction of its TDP."
    )
    priority_order: list[PriorityTier] = Field(
        default_factory=lambda: list(PRIORITY_TIERS_LOW_FIRST),
        description="Tiers capped first to last; decode-heavy pools go before prefill in a tier.",
    )
    control_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often telemetry is read and caps decided."
    )


class DeviceCap(ApiModel):
    """One device the controller has slowed: the record a restarted controller starts from."""

    uuid: str = Field(min_length=1, description="Device UUID, as its agent reports it.")
    node: str = Field(default="", description="Node the device is on.")
    agent: str = Field(default="", description="The agent (pod) that controls it.")
    power_limit_w: float | None = Field(default=None, gt=0, description="Power limit set, W.")
    sm_clock_max_mhz: int | None = Field(default=None, gt=0, description="Top SM clock locked.")


class PowerBudgetStatus(ApiModel):
    """What the power controller reports."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    draw_w: float | None = Field(default=None, description="Last measured draw of the group.")
    budget_w: float | None = Field(default=None, description="The budget in force, watts.")
    headroom_w: float | None = Field(
        default=None, description="Budget minus draw (negative while over budget), watts."
    )
    mode: str | None = Field(
        default=None, description="Normal, Holding, Capping, Releasing or Emergency."
    )
    capped_devices: int = Field(default=0, ge=0, description="Devices under a cap now.")
    capped: list[DeviceCap] = Field(
        default_factory=list, description="The devices under a cap or clock lock, and what."
    )
    last_action: str | None = Field(default=None, description="What the controller last did.")
    last_action_time: datetime | None = Field(default=None, description="When it did it.")


class PowerBudget(CustomResource):
    """A power cap for a node group, with oversubscription."""

    crd: ClassVar[CustomResourceInfo] = CustomResourceInfo(
        kind="PowerBudget",
        plural="powerbudgets",
        singular="powerbudget",
        short_names=["pb"],
        scope="Cluster",
        printer_columns=[
            {"name": "Budget-W", "type": "number", "jsonPath": ".spec.budgetW"},
            {"name": "Oversub", "type": "number", "jsonPath": ".spec.oversubscriptionRatio"},
            {"name": "Draw-W", "type": "number", "jsonPath": ".status.drawW"},
        ],
    )

    kind: Literal["PowerBudget"] = "PowerBudget"
    spec: PowerBudgetSpec
    status: PowerBudgetStatus | None = None
