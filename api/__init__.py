"""Every contract of Tessera: the custom resources (pydantic v2) and the agent protocol (.proto).

The pydantic models here are the single source of truth; `crds/*.yaml` are generated from them
by `tessera crds`, and a test fails when the two drift apart.
"""

from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.common import GROUP, VERSION, Condition
from tessera.api.model_deployment import (
    ModelArchitecture,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    Plan,
    PoolPlan,
)
from tessera.api.power_budget import PowerBudget, PowerBudgetSpec
from tessera.api.rebalance_policy import RebalancePolicy, RebalancePolicySpec

__all__ = [
    "GROUP",
    "VERSION",
    "AcceleratorClass",
    "AcceleratorClassSpec",
    "Condition",
    "ModelArchitecture",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "Plan",
    "PoolPlan",
    "PowerBudget",
    "PowerBudgetSpec",
    "RebalancePolicy",
    "RebalancePolicySpec",
]
