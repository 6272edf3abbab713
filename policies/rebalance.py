"""One rebalancing round, decided: the entry point the RebalancePolicy controller calls.

snapshot + spec -> `RebalancePlan` (the moves, fragmentation before and after, and why nothing
moves when nothing does). The solver is the fast policy unless the caller asks for the exact
one (benches, tests). Every plan is checked against `plan_violations` before it is returned,
and a plan that does not cut fragmentation by the share `minImprovement` of what it was (0.02:
by 2 %) is replaced by no moves: a round's evictions are not free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from tessera.api.rebalance_policy import RebalancePolicySpec
from tessera.policies.fragmentation import (
    FragmentationObjective,
    ReplicaShape,
    shapes_from_pods,
)
from tessera.policies.rebalance_fast import FastOptions, solve_fast
from tessera.policies.rebalance_model import (
    ClusterSnapshot,
    Move,
    RebalanceProblem,
    RebalanceRules,
    SolverResult,
    plan_violations,
)

Solver = Literal["fast", "exact"]


class IllegalPlanError(RuntimeError):
    """A solver returned a plan that breaks a rule: a bug, never acted on."""


@dataclass(frozen=True)
class RebalancePlan:
    moves: tuple[Move, ...]
    fragmentation_before: float
    fragmentation_after: float
    solver: str
    solver_status: str
    reason: str
    """Why the plan is what it is: Improves, BelowMinImprovement, NothingToMove, NoBudget."""
    per_shape_before: dict[str, float] = field(default_factory=dict)
    per_shape_after: dict[str, float] = field(default_factory=dict)


def rules_from_spec(spec: RebalancePolicySpec) -> RebalanceRules:
    return RebalanceRules(
        move_budget=spec.move_budget,
        exclude_priorities=tuple(spec.movable.exclude_priorities),
    )


def decide(
    snapshot: ClusterSnapshot,
    spec: RebalancePolicySpec,
    shapes: Sequence[ReplicaShape] | None = None,
    solver: Solver = "fast",
    exact_time_limit_s: float = 30.0,
    fast_options: FastOptions | None = None,
) -> RebalancePlan:
    """The moves for this round, or none with the reason."""
    problem = RebalanceProblem.build(snapshot, rules_from_spec(spec))
    shapes = list(shapes) if shapes else shapes_from_pods(problem)
    if not shapes:
        return _nothing(problem, None, "NothingToMove")
    objective = FragmentationObjective(problem, shapes)
    if spec.move_budget == 0:
        return _nothing(problem, objective, "NoBudget")
    result: SolverResult
    if solver == "exact":
        from tessera.policies.rebalance_exact import solve_exact

        result = solve_exact(problem, objective, exact_time_limit_s)
    else:
        result = solve_fast(problem, objective, fast_options)
    errors = plan_violations(problem, result.moves)
    if errors:
        raise IllegalPlanError(f"{result.solver} solver: " + "; ".join(errors[:5]))
    before = objective.fragmentation(problem.free)
    after_free = problem.free_after(result.moves)
    after = objective.fragmentation(after_free)
    if not result.moves:
        return _nothing(problem, objective, "NothingToMove", result)
    if before - after <= 1e-12 or before - after < spec.min_improvement * before:
        return _nothing(problem, objective, "BelowMinImprovement", result)
    return RebalancePlan(
        moves=result.moves,
        fragmentation_before=before,
        fragmentation_after=after,
        solver=result.solver,
        solver_status=result.status,
        reason="Improves",
        per_shape_before=objective.per_shape(problem.free),
        per_shape_after=objective.per_shape(after_free),
    )


def _nothing(
    problem: RebalanceProblem,
    objective: FragmentationObjective | None,
    reason: str,
    result: SolverResult | None = None,
) -> RebalancePlan:
    frag = objective.fragmentation(problem.free) if objective else 0.0
    per_shape = objective.per_shape(problem.free) if objective else {}
    return RebalancePlan(
        moves=(),
        fragmentation_before=frag,
        fragmentation_after=frag,
        solver=result.solver if result else "none",
        solver_status=result.status if result else "skipped",
        reason=reason,
        per_shape_before=per_shape,
        per_shape_after=dict(per_shape),
    )
