"""RebalancePolicy: periodic moves of pods (and VMs) that cut fragmentation under a move budget.

Reconciled by operator/rebalance_controller.py (pods by eviction, KubeVirt VMs by live
migration); the decision is policies/rebalance.py.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from tessera.api.common import (
    ApiModel,
    Condition,
    CustomResource,
    CustomResourceInfo,
    PriorityTier,
)

MovableKind = Literal["Pod", "VirtualMachine"]


def _default_kinds() -> list[MovableKind]:
    return ["Pod"]


def _default_excluded() -> list[PriorityTier]:
    return ["critical"]


class MovableSpec(ApiModel):
    """What the rebalancer may move."""

    kinds: list[MovableKind] = Field(
        default_factory=_default_kinds, description="Workload kinds that may be moved."
    )
    selector: dict[str, str] = Field(
        default_factory=dict, description="Only workloads with these labels move."
    )
    exclude_priorities: list[PriorityTier] = Field(
        default_factory=_default_excluded, description="Tiers never moved."
    )
    use_live_migration: bool = Field(
        default=True,
        description="Move VirtualMachineInstances by KubeVirt live migration (a "
        "VirtualMachineInstanceMigration to the planned node); false: VMs are never moved, "
        "since the only other move, eviction, stops them.",
    )


class RebalancePolicySpec(ApiModel):
    """How and how often to rebalance."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Nodes in scope.")
    interval_seconds: float = Field(default=300.0, gt=0, description="Time between rounds.")
    move_budget: int = Field(default=5, ge=0, description="Most moves in one round.")
    objective: Literal["fragmentation", "power", "cost"] = Field(
        default="fragmentation", description="What the moves reduce."
    )
    movable: MovableSpec = Field(default_factory=MovableSpec)
    min_improvement: float = Field(
        default=0.02, ge=0, description="Skip a round that improves the objective by less."
    )
    dry_run: bool = Field(default=False, description="Plan and report moves without making them.")


class PlannedMove(ApiModel):
    """One move of the last round: a pod evicted from `sourceNode` to be placed on
    `targetNode`, or a VM live-migrated there, and what happened (Planned in a dry run;
    Evicted, Migrating once its VirtualMachineInstanceMigration exists, Blocked by a PDB,
    Gone, Failed)."""

    pod: str = Field(description="The Pod's name, or the VirtualMachineInstance's.")
    namespace: str
    kind: Literal["Pod", "VirtualMachineInstance"] = "Pod"
    source_node: str
    target_node: str
    result: Literal["Planned", "Evicted", "Migrating", "Blocked", "Gone", "Failed"]
    migration: str | None = Field(
        default=None, description="The VirtualMachineInstanceMigration created for a VM."
    )
    message: str | None = None


class RebalancePolicyStatus(ApiModel):
    """What the rebalancer reports."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    last_round_time: str | None = None
    next_round_time: str | None = None
    moves_last_round: int = Field(default=0, ge=0)
    fragmentation_before: float | None = Field(
        default=None, description="Fragmentation of the nodes in scope before the last round."
    )
    fragmentation_after: float | None = Field(
        default=None, description="Fragmentation once the last round's moves land (predicted)."
    )
    moves: list[PlannedMove] = Field(default_factory=list)


class RebalancePolicy(CustomResource):
    """Periodic, budgeted defragmentation of the fleet."""

    crd: ClassVar[CustomResourceInfo] = CustomResourceInfo(
        kind="RebalancePolicy",
        plural="rebalancepolicies",
        singular="rebalancepolicy",
        short_names=["rbp"],
        scope="Cluster",
        printer_columns=[
            {"name": "Interval", "type": "number", "jsonPath": ".spec.intervalSeconds"},
            {"name": "Budget", "type": "integer", "jsonPath": ".spec.moveBudget"},
            {"name": "Objective", "type": "string", "jsonPath": ".spec.objective"},
        ],
    )

    kind: Literal["RebalancePolicy"] = "RebalancePolicy"
    spec: RebalancePolicySpec
    status: RebalancePolicyStatus | None = None
