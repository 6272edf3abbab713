"""How fragmented free capacity is: how many replicas of each requested shape still fit.

A cluster with 16 free GPUs, two on each of eight nodes, has no room for a 4-GPU replica. For
each replica shape s (GPUs, CPU, memory, and the nodes it may use) we count `fits_s`, the
replicas that fit on the free capacity node by node, and compare it with `pool_s`, the replicas
that would fit if all free capacity were one node. The fragmentation of s is 1 - fits_s/pool_s
(the share of free capacity a replica of s cannot use) and the cluster's is the weighted mean
over shapes (weights: the size mix of the pods that ask for them).

Moves inside the cluster leave the total free capacity, hence every pool_s, unchanged, so
fragmentation is 1 - sum_s coef_s * fits_s with fixed coefficients coef_s = w_s / pool_s:
linear in the per-node fits, which is what lets the exact solver be a MIP and the fast one
score a move by looking at its two nodes only.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tessera.policies.rebalance_model import NodeRequirement, RebalanceProblem, Resources

CPU_SHAPE_WEIGHT = 0.1
"""Weight of the CPU-only shape beside the GPU shapes: the fleet exists for its accelerators,
but a node whose CPU or memory is gone cannot take even a small sidecar-free job."""


@dataclass(frozen=True)
class ReplicaShape:
    """A replica the cluster should keep room for, and how much that room matters."""

    name: str
    requests: Resources
    requirement: NodeRequirement = field(default_factory=NodeRequirement)
    weight: float = 1.0


def shapes_from_pods(problem: RebalanceProblem, max_shapes: int = 8) -> list[ReplicaShape]:
    """The replica shapes the cluster's own pods ask for, running or pending.

    GPU pods are grouped by (GPU count, node requirement), with the median CPU and memory of the
    group and its share of GPU pods as weight; CPU-only pods give one shape (their median
    requests) weighted CPU_SHAPE_WEIGHT. The `max_shapes` heaviest are kept.
    """
    groups: defaultdict[tuple[int, NodeRequirement], list[Resources]] = defaultdict(list)
    cpu_only: list[Resources] = []
    for pod in (*problem.snapshot.pods, *problem.snapshot.pending):
        if pod.requests.gpu > 0:
            groups[(pod.requests.gpu, pod.requirement)].append(pod.requests)
        elif pod.requests.cpu_m > 0 or pod.requests.memory_mib > 0:
            cpu_only.append(pod.requests)
    total = sum(len(v) for v in groups.values())
    shapes = [
        ReplicaShape(
            name=f"gpu{gpu}-{i}",
            requests=_median(members, gpu),
            requirement=requirement,
            weight=len(members) / total,
        )
        for i, ((gpu, requirement), members) in enumerate(
            sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0][0]))
        )
    ]
    shapes = shapes[:max_shapes]
    if cpu_only:
        shapes.append(ReplicaShape("cpu", _median(cpu_only, 0), weight=CPU_SHAPE_WEIGHT))
    return shapes


def _median(members: Sequence[Resources], gpu: int) -> Resources:
    return Resources(
        gpu=gpu,
        cpu_m=int(np.median([m.cpu_m for m in members])),
        memory_mib=int(np.median([m.memory_mib for m in members])),
    )


class FragmentationObjective:
    """fits, score and fragmentation of any free-capacity array of the problem's nodes.

    `score` = sum_s coef_s * fits_s = 1 - fragmentation; solvers maximise it.
    """

    def __init__(self, problem: RebalanceProblem, shapes: Sequence[ReplicaShape]) -> None:
        if not shapes:
            raise ValueError("shapes: at least one replica shape is needed")
        if any(s.weight < 0 for s in shapes):
            raise ValueError("shapes: weights must be >= 0")
        nodes = problem.snapshot.nodes
        self.shapes = list(shapes)
        self.demand = np.array([s.requests.as_tuple() for s in shapes], dtype=np.int64)
        if (self.demand <= 0).all(axis=1).any():
            raise ValueError("shapes: every shape must request some resource")
        self._asks = [np.nonzero(self.demand[:, r] > 0)[0] for r in range(self.demand.shape[1])]
        self.mask = np.array([[s.requirement.admits(n) for n in nodes] for s in shapes], bool)
        pool_free = problem.free.sum(axis=0)
        self.pool = self._fits_rows(pool_free[None, :])[:, 0]
        weight = np.array([s.weight for s in shapes], dtype=float) * (self.pool > 0)
        self.weight = weight / weight.sum() if weight.sum() > 0 else weight
        self.coef = np.where(self.pool > 0, self.weight / np.maximum(self.pool, 1), 0.0)

    def _fits_rows(self, free_rows: np.ndarray) -> np.ndarray:
        """(shapes, rows) replicas of each shape that fit each row, ignoring node masks.

        Float division (exact here: integers below 2**53, and a quotient's fraction is at least
        1/demand) is several times faster than numpy's integer floor division.
        """
        free_rows = np.maximum(free_rows, 0).astype(np.float64)
        out = np.full((self.demand.shape[0], free_rows.shape[0]), np.inf)
        for r in range(self.demand.shape[1]):
            asks = self._asks[r]
            if asks.size:
                quotient = free_rows[None, :, r] / self.demand[asks, r][:, None].astype(float)
                out[asks] = np.minimum(out[asks], quotient)
        return np.floor(out).astype(np.int64)

    def fits(self, free_rows: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
        """(shapes, rows) replicas of each shape that fit on each node's free capacity."""
        mask = self.mask if nodes is None else self.mask[:, nodes]
        return self._fits_rows(free_rows) * mask

    def node_scores(self, free_rows: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Each node's share of the score, for rows of free capacity on those nodes."""
        return self.coef @ self.fits(free_rows, nodes)

    def score(self, free: np.ndarray) -> float:
        return float(self.coef @ self.fits(free).sum(axis=1))

    def fragmentation(self, free: np.ndarray) -> float:
        """0: every shape fits as often as if free capacity were pooled; 1: none fits."""
        return 1.0 - self.score(free) if self.weight.sum() > 0 else 0.0

    def per_shape(self, free: np.ndarray) -> dict[str, float]:
        """Fragmentation of each shape with any pooled room, by shape name."""
        fits = self.fits(free).sum(axis=1)
        return {
            s.name: 1.0 - float(fits[i]) / float(self.pool[i])
            for i, s in enumerate(self.shapes)
            if self.pool[i] > 0
        }

    def fit_counts(self, free: np.ndarray) -> Counter[str]:
        fits = self.fits(free).sum(axis=1)
        return Counter({s.name: int(fits[i]) for i, s in enumerate(self.shapes)})
