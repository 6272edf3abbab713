"""The rebalancer's view of a cluster: nodes, pods, disruption budgets, and the moves it may make.

Plain data in, plain data out (no Kubernetes): the controller translates Node/Pod/PDB objects
into a `ClusterSnapshot`, `RebalanceProblem.build` compiles it into arrays the solvers share
(free capacity per node, which pod may go where), and a solver returns `Move`s. `plan_violations`
is the one place that says what a legal plan is; both solvers' results and the tests go through it.

Scheduling constraints honoured: nodeSelector, required node affinity (terms of In / NotIn /
Exists / DoesNotExist / Gt / Lt expressions on node labels, ORed), NoSchedule/NoExecute taints
against tolerations, and capacity on GPUs, CPU and memory. Inter-pod (anti-)affinity is not
modelled, so the caller marks such pods unmovable rather than risk breaking it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tessera.api.common import PriorityTier

RESOURCES: tuple[str, ...] = ("gpu", "cpu_m", "memory_mib")
"""Resource axes, in the column order of every capacity array."""


@dataclass(frozen=True)
class Resources:
    """An amount of each resource: accelerators, CPU millicores, memory in MiB."""

    gpu: int = 0
    cpu_m: int = 0
    memory_mib: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.gpu, self.cpu_m, self.memory_mib)


@dataclass(frozen=True)
class MatchExpression:
    """One node-label expression of a required node-affinity term (Kubernetes semantics)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        if self.operator == "DoesNotExist":
            return value is None
        if self.operator in ("Gt", "Lt"):
            try:
                number, bound = int(value or ""), int(self.values[0])
            except (ValueError, IndexError):
                return False
            return number > bound if self.operator == "Gt" else number < bound
        raise ValueError(
            f"matchExpressions operator {self.operator!r}: valid are In, NotIn, Exists, "
            "DoesNotExist, Gt, Lt"
        )


@dataclass(frozen=True)
class Toleration:
    """A pod's toleration; an empty key with operator Exists tolerates every taint."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and self.value == taint.value


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class NodeRequirement:
    """Where a pod may run: nodeSelector AND (any one required-affinity term) AND tolerations."""

    node_selector: tuple[tuple[str, str], ...] = ()
    affinity_terms: tuple[tuple[MatchExpression, ...], ...] = ()
    tolerations: tuple[Toleration, ...] = ()

    def admits(self, node: Node) -> bool:
        labels = node.labels_map
        if any(labels.get(k) != v for k, v in self.node_selector):
            return False
        if self.affinity_terms and not any(
            all(e.matches(labels) for e in term) for term in self.affinity_terms
        ):
            return False
        return all(
            any(t.tolerates(taint) for t in self.tolerations)
            for taint in node.taints
            if taint.effect in ("NoSchedule", "NoExecute")
        )


@dataclass(frozen=True)
class Node:
    name: str
    capacity: Resources
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[Taint, ...] = ()

    @property
    def labels_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Pod:
    """A running workload. `movable` is the caller's verdict on kind, owner and label selector;
    priority tiers and PDBs are applied here, from the round's rules."""

    name: str
    node: str
    requests: Resources
    priority: PriorityTier = "normal"
    requirement: NodeRequirement = NodeRequirement()
    pdbs: tuple[str, ...] = ()
    movable: bool = True


@dataclass(frozen=True)
class ClusterSnapshot:
    """Nodes in scope, every pod bound to them, each PDB's disruptionsAllowed, and the pods
    waiting for room (`pending`: their node is ignored; they only say what shapes are wanted)."""

    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    disruptions_allowed: Mapping[str, int] = field(default_factory=dict)
    pending: tuple[Pod, ...] = ()


@dataclass(frozen=True)
class RebalanceRules:
    move_budget: int
    exclude_priorities: tuple[PriorityTier, ...] = ("critical",)

    def __post_init__(self) -> None:
        if self.move_budget < 0:
            raise ValueError(f"moveBudget {self.move_budget}: must be >= 0")


@dataclass(frozen=True)
class Move:
    pod: str
    source: str
    target: str


class SnapshotError(ValueError):
    """The snapshot is inconsistent (a pod on an unknown node, a node over its capacity)."""


@dataclass
class RebalanceProblem:
    """A snapshot compiled for the solvers.

    Pods with the same requests and the same node requirement share a *signature*: which nodes
    can take one of them does not depend on which one it is, so the solvers reason about
    signatures when choosing targets and about single pods only when choosing what to disrupt.
    """

    snapshot: ClusterSnapshot
    rules: RebalanceRules
    node_names: list[str]
    capacity: np.ndarray  # (nodes, resources)
    free: np.ndarray  # (nodes, resources), before any move
    pod_node: np.ndarray  # (pods,) node index
    pod_requests: np.ndarray  # (pods, resources)
    pod_signature: np.ndarray  # (pods,) signature index
    signature_requests: np.ndarray  # (signatures, resources)
    admits: np.ndarray  # (signatures, nodes) bool: requirement holds and it fits an empty node
    movable: np.ndarray  # (pods,) bool, after rules and PDBs with no disruption left
    pdb_names: list[str]
    pod_pdbs: list[tuple[int, ...]]
    pdb_allowed: np.ndarray  # (pdbs,)
    node_index: dict[str, int] = field(default_factory=dict)
    pod_index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, snapshot: ClusterSnapshot, rules: RebalanceRules) -> RebalanceProblem:
        nodes = snapshot.nodes
        node_index = {n.name: i for i, n in enumerate(nodes)}
        if len(node_index) != len(nodes):
            raise SnapshotError("snapshot.nodes: node names must be unique")
        capacity = np.array([n.capacity.as_tuple() for n in nodes], dtype=np.int64).reshape(
            len(nodes), len(RESOURCES)
        )
        pods = snapshot.pods
        pod_index = {p.name: i for i, p in enumerate(pods)}
        if len(pod_index) != len(pods):
            raise SnapshotError("snapshot.pods: pod names must be unique")
        unknown = [p.name for p in pods if p.node not in node_index]
        if unknown:
            raise SnapshotError(f"pods {unknown[:3]} are bound to nodes not in the snapshot")
        pod_node = np.array([node_index[p.node] for p in pods], dtype=np.int64)
        pod_requests = np.array([p.requests.as_tuple() for p in pods], dtype=np.int64).reshape(
            len(pods), len(RESOURCES)
        )
        used = np.zeros_like(capacity)
        np.add.at(used, pod_node, pod_requests)
        free = capacity - used
        over = np.nonzero((free < 0).any(axis=1))[0]
        if over.size:
            raise SnapshotError(f"node {nodes[over[0]].name} is over its capacity")

        sig_of: dict[tuple[Resources, NodeRequirement], int] = {}
        pod_signature = np.array(
            [sig_of.setdefault((p.requests, p.requirement), len(sig_of)) for p in pods],
            dtype=np.int64,
        )
        signatures = list(sig_of)
        signature_requests = np.array(
            [r.as_tuple() for r, _ in signatures], dtype=np.int64
        ).reshape(len(signatures), len(RESOURCES))
        admits = np.zeros((len(signatures), len(nodes)), dtype=bool)
        for s, (_, requirement) in enumerate(signatures):
            admits[s] = [requirement.admits(n) for n in nodes]
        admits &= (signature_requests[:, None, :] <= capacity[None, :, :]).all(axis=2)

        pdb_names = sorted({name for p in pods for name in p.pdbs})
        pdb_pos = {name: i for i, name in enumerate(pdb_names)}
        pdb_allowed = np.array(
            [max(0, int(snapshot.disruptions_allowed.get(n, 0))) for n in pdb_names],
            dtype=np.int64,
        )
        pod_pdbs = [tuple(pdb_pos[n] for n in p.pdbs) for p in pods]
        excluded = set(rules.exclude_priorities)
        movable = np.array(
            [
                p.movable
                and p.priority not in excluded
                and all(pdb_allowed[i] > 0 for i in pod_pdbs[k])
                for k, p in enumerate(pods)
            ],
            dtype=bool,
        )
        return cls(
            snapshot=snapshot,
            rules=rules,
            node_names=[n.name for n in nodes],
            capacity=capacity,
            free=free,
            pod_node=pod_node,
            pod_requests=pod_requests,
            pod_signature=pod_signature,
            signature_requests=signature_requests,
            admits=admits,
            movable=movable,
            pdb_names=pdb_names,
            pod_pdbs=pod_pdbs,
            pdb_allowed=pdb_allowed,
            node_index=node_index,
            pod_index=pod_index,
        )

    def free_after(self, moves: Iterable[Move]) -> np.ndarray:
        """Free capacity per node once every move has landed."""
        free = self.free.copy()
        for move in moves:
            req = self.pod_requests[self.pod_index[move.pod]]
            free[self.node_index[move.source]] += req
            free[self.node_index[move.target]] -= req
        return free

    def moves_from_indices(self, pairs: Iterable[tuple[int, int]]) -> list[Move]:
        """(pod index, target node index) pairs as named moves."""
        return [
            Move(self.snapshot.pods[p].name, self.node_names[self.pod_node[p]], self.node_names[t])
            for p, t in pairs
        ]


def plan_violations(problem: RebalanceProblem, moves: Sequence[Move]) -> list[str]:
    """Every rule the plan breaks, as readable lines; empty for a legal plan.

    Legal: at most moveBudget moves, each of a distinct movable pod (not an excluded tier, every
    PDB covering it with a disruption left) from its own node to a different node that admits
    it, no PDB disrupted more than it allows, and no node over capacity once all moves land.
    """
    errors: list[str] = []
    budget = problem.rules.move_budget
    if len(moves) > budget:
        errors.append(f"{len(moves)} moves exceed moveBudget {budget}")
    seen: set[str] = set()
    disrupted: defaultdict[int, int] = defaultdict(int)
    for move in moves:
        k = problem.pod_index.get(move.pod)
        if k is None:
            errors.append(f"pod {move.pod}: not in the snapshot")
            continue
        if move.pod in seen:
            errors.append(f"pod {move.pod}: moved twice")
        seen.add(move.pod)
        if problem.node_names[problem.pod_node[k]] != move.source:
            errors.append(f"pod {move.pod}: source {move.source} is not its node")
        if not problem.movable[k]:
            errors.append(f"pod {move.pod}: not movable (tier, PDB or owner)")
        t = problem.node_index.get(move.target)
        if t is None or move.target == move.source:
            errors.append(f"pod {move.pod}: target {move.target} is not another node")
        elif not problem.admits[problem.pod_signature[k], t]:
            errors.append(f"pod {move.pod}: node {move.target} does not admit it")
        for pdb in problem.pod_pdbs[k]:
            disrupted[pdb] += 1
    for pdb, count in disrupted.items():
        if count > problem.pdb_allowed[pdb]:
            errors.append(
                f"PDB {problem.pdb_names[pdb]}: {count} disruptions, "
                f"{problem.pdb_allowed[pdb]} allowed"
            )
    if not errors:
        over = np.nonzero((problem.free_after(moves) < 0).any(axis=1))[0]
        errors.extend(f"node {problem.node_names[n]}: over capacity after the moves" for n in over)
    return errors


@dataclass(frozen=True)
class SolverResult:
    """A solver's moves; `score_bound` is an upper bound on the reachable score where the solver
    proves one (the MIP's dual bound), so a heuristic's gap can be stated against it."""

    solver: str
    moves: tuple[Move, ...]
    status: str
    score_bound: float | None = None
