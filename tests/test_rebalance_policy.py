"""The rebalancer's pure parts: the fragmentation objective, scheduling constraints, the rules a
plan must keep, and decide()'s round logic, on small hand-built clusters."""

from __future__ import annotations

import pytest
from tessera.api.rebalance_policy import MovableSpec, RebalancePolicySpec
from tessera.policies.fragmentation import FragmentationObjective, ReplicaShape, shapes_from_pods
from tessera.policies.rebalance import decide
from tessera.policies.rebalance_exact import solve_exact
from tessera.policies.rebalance_fast import solve_fast
from tessera.policies.rebalance_model import (
    ClusterSnapshot,
    MatchExpression,
    Move,
    Node,
    NodeRequirement,
    Pod,
    RebalanceProblem,
    RebalanceRules,
    Resources,
    SnapshotError,
    Taint,
    Toleration,
    plan_violations,
)

ACC = "tessera.dev/accelerator"


def gpu_node(name: str, accelerator: str = "h100", gpus: int = 8) -> Node:
    return Node(name, Resources(gpus, 128_000, 1_048_576), ((ACC, accelerator),))


def gpu_pod(name: str, node: str, gpus: int, **kw: object) -> Pod:
    return Pod(name, node, Resources(gpus, 1000 * gpus, 1024 * gpus), **kw)  # type: ignore[arg-type]


def four_gpu_shape() -> list[ReplicaShape]:
    return [ReplicaShape("gpu4", Resources(4, 4000, 4096))]


def scattered() -> ClusterSnapshot:
    """The issue's example: 16 GPUs free, two on each of eight nodes; no 4-GPU replica fits."""
    nodes = tuple(gpu_node(f"n{i}") for i in range(8))
    pods = tuple(
        gpu_pod(f"p{i}-{j}", f"n{i}", 2, pdbs=(f"pdb{i}",)) for i in range(8) for j in range(3)
    )
    return ClusterSnapshot(nodes, pods, {f"pdb{i}": 1 for i in range(8)})


def test_fragmentation_counts_replicas_that_fit_not_free_devices() -> None:
    problem = RebalanceProblem.build(scattered(), RebalanceRules(move_budget=4))
    objective = FragmentationObjective(problem, four_gpu_shape())
    assert problem.free[:, 0].sum() == 16
    assert objective.pool[0] == 4
    assert objective.fragmentation(problem.free) == pytest.approx(1.0)
    # Move one 2-GPU pod from n0 to n1: n0 has 4 free (one replica fits), n1 none.
    free = problem.free_after([Move("p0-0", "n0", "n1")])
    assert objective.fit_counts(free)["gpu4"] == 1
    assert objective.fragmentation(free) == pytest.approx(0.75)


def test_cpu_and_memory_limit_fits() -> None:
    node = Node("n", Resources(8, 10_000, 1_000_000))
    pod = Pod("p", "n", Resources(0, 6_000, 0))
    problem = RebalanceProblem.build(ClusterSnapshot((node,), (pod,)), RebalanceRules(1))
    objective = FragmentationObjective(problem, [ReplicaShape("gpu2", Resources(2, 3_000, 1_000))])
    # 8 GPUs free would take four 2-GPU replicas; 4 free cores take one.
    assert objective.fit_counts(problem.free)["gpu2"] == 1


def test_shapes_from_pods_follow_the_size_mix() -> None:
    problem = RebalanceProblem.build(scattered(), RebalanceRules(1))
    shapes = shapes_from_pods(problem)
    assert [(s.requests.gpu, s.weight) for s in shapes] == [(2, 1.0)]


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        (MatchExpression("a", "In", ("x", "y")), {"a": "y"}, True),
        (MatchExpression("a", "In", ("x",)), {}, False),
        (MatchExpression("a", "NotIn", ("x",)), {}, True),
        (MatchExpression("a", "NotIn", ("x",)), {"a": "x"}, False),
        (MatchExpression("a", "Exists"), {"a": ""}, True),
        (MatchExpression("a", "DoesNotExist"), {"a": ""}, False),
        (MatchExpression("a", "Gt", ("3",)), {"a": "4"}, True),
        (MatchExpression("a", "Lt", ("3",)), {"a": "4"}, False),
        (MatchExpression("a", "Gt", ("3",)), {"a": "x"}, False),
    ],
)
def test_match_expressions(expression: MatchExpression, labels: dict, expected: bool) -> None:
    assert expression.matches(labels) is expected


def test_unknown_operator_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid are In, NotIn"):
        MatchExpression("a", "Near").matches({})


def test_requirement_selector_affinity_and_taints() -> None:
    tainted = Node("t", Resources(8), ((ACC, "a100"),), (Taint("gpu", "yes", "NoSchedule"),))
    plain = gpu_node("p", "h100")
    any_gpu = NodeRequirement(affinity_terms=((MatchExpression(ACC, "In", ("a100", "h100")),),))
    assert any_gpu.admits(plain) and not any_gpu.admits(tainted)
    tolerant = NodeRequirement(
        affinity_terms=any_gpu.affinity_terms, tolerations=(Toleration("gpu", "Exists"),)
    )
    assert tolerant.admits(tainted)
    pinned = NodeRequirement(node_selector=((ACC, "h100"),), tolerations=tolerant.tolerations)
    assert pinned.admits(plain) and not pinned.admits(tainted)
    assert NodeRequirement(tolerations=(Toleration(operator="Exists"),)).admits(tainted)
    prefer = Node("q", Resources(8), (), (Taint("gpu", "yes", "PreferNoSchedule"),))
    assert NodeRequirement().admits(prefer)


def test_snapshot_errors_name_the_object() -> None:
    with pytest.raises(SnapshotError, match="not in the snapshot"):
        RebalanceProblem.build(
            ClusterSnapshot((gpu_node("a"),), (gpu_pod("p", "b", 1),)), RebalanceRules(1)
        )
    with pytest.raises(SnapshotError, match="node a is over its capacity"):
        RebalanceProblem.build(
            ClusterSnapshot((gpu_node("a", gpus=2),), (gpu_pod("p", "a", 4),)), RebalanceRules(1)
        )
    with pytest.raises(ValueError, match="moveBudget -1"):
        RebalanceRules(-1)


def test_plan_violations_names_each_broken_rule() -> None:
    nodes = (gpu_node("a"), gpu_node("b"), gpu_node("c", "l40s", 4))
    pods = (
        gpu_pod("crit", "a", 1, priority="critical"),
        gpu_pod("x1", "a", 1, pdbs=("pdb",)),
        gpu_pod("x2", "a", 1, pdbs=("pdb",)),
        gpu_pod("pinned", "a", 1, requirement=NodeRequirement(node_selector=((ACC, "h100"),))),
        gpu_pod("big", "a", 3),
        gpu_pod("fill", "c", 2),
        gpu_pod("bare", "a", 1, movable=False),
    )
    problem = RebalanceProblem.build(ClusterSnapshot(nodes, pods, {"pdb": 1}), RebalanceRules(2))
    assert plan_violations(problem, [Move("x1", "a", "b"), Move("big", "a", "b")]) == []

    def errors(*moves: Move) -> str:
        return " | ".join(plan_violations(problem, list(moves)))

    assert "exceed moveBudget 2" in errors(*(Move(p, "a", "b") for p in ("x1", "big", "bare")))
    assert "crit: not movable" in errors(Move("crit", "a", "b"))
    assert "bare: not movable" in errors(Move("bare", "a", "b"))
    assert "PDB pdb: 2 disruptions, 1 allowed" in errors(Move("x1", "a", "b"), Move("x2", "a", "b"))
    assert "node c does not admit it" in errors(Move("pinned", "a", "c"))
    assert "over capacity" in errors(Move("big", "a", "c"))
    assert "not another node" in errors(Move("big", "a", "a"))
    assert "source b is not its node" in errors(Move("big", "b", "c"))


def test_excluded_priorities_and_spent_pdbs_are_not_movable() -> None:
    pods = (gpu_pod("low", "a", 1, priority="low"), gpu_pod("spent", "a", 1, pdbs=("p",)))
    snapshot = ClusterSnapshot((gpu_node("a"), gpu_node("b")), pods, {"p": 0})
    problem = RebalanceProblem.build(snapshot, RebalanceRules(4, exclude_priorities=("low",)))
    assert problem.movable.tolist() == [False, False]
    problem = RebalanceProblem.build(snapshot, RebalanceRules(4, exclude_priorities=()))
    assert problem.movable.tolist() == [True, False]


def chain_cluster() -> ClusterSnapshot:
    """Only an ejection chain makes room for an 8-GPU H100 replica: the 8-GPU pod (A100 or
    H100) can leave node `big` only after two 2-GPU pods leave A100 node `prep` for the two
    nodes with 2 GPUs free."""
    any_gpu = NodeRequirement(affinity_terms=((MatchExpression(ACC, "In", ("a100", "h100")),),))
    nodes = (gpu_node("big"), gpu_node("prep", "a100"), gpu_node("s1", "a100"), gpu_node("s2"))
    pods = (
        gpu_pod("eight", "big", 8, requirement=any_gpu),
        gpu_pod("two-a", "prep", 2),
        gpu_pod("two-b", "prep", 2),
        gpu_pod("six-1", "s1", 6, requirement=NodeRequirement(node_selector=((ACC, "a100"),))),
        gpu_pod("six-2", "s2", 6, requirement=NodeRequirement(node_selector=((ACC, "h100"),))),
    )
    return ClusterSnapshot(nodes, pods)


def test_fast_policy_finds_the_ejection_chain_the_mip_finds() -> None:
    problem = RebalanceProblem.build(chain_cluster(), RebalanceRules(3))
    h100_only = NodeRequirement(node_selector=((ACC, "h100"),))
    objective = FragmentationObjective(
        problem, [ReplicaShape("gpu8", Resources(8, 8000, 8192), h100_only)]
    )
    exact, fast = solve_exact(problem, objective, 30), solve_fast(problem, objective)
    assert exact.status == "optimal"
    for result in (exact, fast):
        assert plan_violations(problem, result.moves) == []
        assert objective.fit_counts(problem.free_after(result.moves))["gpu8"] == 1
    assert {m.pod for m in fast.moves} == {"eight", "two-a", "two-b"}
    # With two moves the chain cannot be completed; nothing else helps either.
    problem2 = RebalanceProblem.build(chain_cluster(), RebalanceRules(2))
    objective2 = FragmentationObjective(problem2, objective.shapes)
    assert solve_fast(problem2, objective2).moves == ()
    assert solve_exact(problem2, objective2, 30).moves == ()


def spec(**kw: object) -> RebalancePolicySpec:
    return RebalancePolicySpec.model_validate(kw)


def test_decide_moves_to_defragment_and_reports_before_after() -> None:
    plan = decide(scattered(), spec(moveBudget=4, minImprovement=0.0), four_gpu_shape())
    assert plan.reason == "Improves"
    assert plan.fragmentation_before == pytest.approx(1.0)
    # Each move of a 2-GPU pod can open one 4-GPU slot on its source.
    assert plan.fragmentation_after == pytest.approx(0.0)
    assert len(plan.moves) == 4
    exact = decide(scattered(), spec(moveBudget=4, minImprovement=0.0), four_gpu_shape(), "exact")
    assert exact.fragmentation_after == pytest.approx(plan.fragmentation_after)


def test_decide_skips_small_improvements_and_zero_budgets() -> None:
    small = decide(scattered(), spec(moveBudget=1, minImprovement=0.3), four_gpu_shape())
    assert small.reason == "BelowMinImprovement" and small.moves == ()
    assert small.fragmentation_after == small.fragmentation_before
    assert decide(scattered(), spec(moveBudget=0), four_gpu_shape()).reason == "NoBudget"
    critical = spec(moveBudget=4, movable=MovableSpec(excludePriorities=["normal"]).model_dump())
    assert decide(scattered(), critical, four_gpu_shape()).reason == "NothingToMove"
