"""Synthetic fragmented clusters for the rebalancer: seeded, with realistic size mixes.

A cluster is grown the way real ones fragment: deployments of GPU replicas (1, 2, 4 and 8
devices, most of them small, as in published GPU-cluster traces: Alibaba PAI 2020, Microsoft
Philly) and CPU pods are placed one pod at a time by a kube-scheduler-like rule (filter on
requirement and free capacity, score a sample of nodes, LeastAllocated: spread), then part of
them leave and others arrive, twice. Spreading plus churn leaves free GPUs in scattered pairs and
triples: the state a rebalancer is for.

Node kinds, replica size mix, priority tiers and PDBs are module constants so a bench can say
what it ran on; everything random comes from one `numpy.random.Generator(seed)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tessera.api.common import PriorityTier
from tessera.policies.rebalance_model import (
    ClusterSnapshot,
    MatchExpression,
    Node,
    NodeRequirement,
    Pod,
    Resources,
    Taint,
    Toleration,
)

GIB = 1024


@dataclass(frozen=True)
class NodeKind:
    accelerator: str
    gpus: int
    cores: int
    memory_gib: int
    share: float
    cores_per_gpu: int
    memory_gib_per_gpu: int


NODE_KINDS: tuple[NodeKind, ...] = (
    NodeKind("h100", 8, 192, 2048, 0.35, 20, 200),
    NodeKind("a100", 8, 128, 1024, 0.30, 14, 100),
    NodeKind("l40s", 4, 64, 512, 0.20, 14, 100),
    NodeKind("cpu", 0, 96, 384, 0.15, 0, 0),
)
GPU_SIZE_MIX: dict[int, float] = {1: 0.45, 2: 0.25, 4: 0.20, 8: 0.10}
"""Share of GPU deployments by replica size (small jobs dominate GPU-cluster traces)."""
CPU_FACTORS: tuple[float, ...] = (0.5, 1.0, 1.5)
"""A replica's CPU and memory per GPU, relative to its node kind's fair share."""
CPU_POD_SIZES: tuple[tuple[int, int], ...] = ((1, 2), (2, 4), (4, 16), (8, 32), (16, 64))
"""(cores, GiB) of CPU-only pods."""
TIER_MIX: dict[PriorityTier, float] = {"critical": 0.1, "high": 0.2, "normal": 0.5, "low": 0.2}
ANY_GPU_SHARE = 0.25
"""Share of GPU deployments that accept either H100 or A100 (required node affinity)."""
TAINTED_GPU_NODE_SHARE = 0.5
"""Share of GPU nodes tainted for GPU pods only (CPU pods do not tolerate it)."""
GPU_TAINT = Taint("nvidia.com/gpu", "present", "NoSchedule")
ZONES = ("zone-a", "zone-b", "zone-c")
SCORED_NODES = 64
"""Feasible nodes the placement scores per pod, as kube-scheduler's percentageOfNodesToScore."""


@dataclass(frozen=True)
class _Template:
    """One deployment: what each replica asks for and how it may be disrupted."""

    name: str
    requests: Resources
    requirement: NodeRequirement
    priority: PriorityTier
    pdb: str | None
    movable: bool


def generate_cluster(
    nodes: int, seed: int, gpu_utilization: float = 0.8, churn_rounds: int = 2
) -> ClusterSnapshot:
    """A fragmented cluster of `nodes` nodes with about `gpu_utilization` of its GPUs in use."""
    if nodes < 1:
        raise ValueError(f"nodes {nodes}: must be >= 1")
    if not 0 < gpu_utilization < 1:
        raise ValueError(f"gpu_utilization {gpu_utilization}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    node_list = _nodes(nodes, rng)
    templates = _templates(max(8, nodes // 8), rng)
    return _Placer(node_list, templates, rng).grow(gpu_utilization, churn_rounds)


def _nodes(count: int, rng: np.random.Generator) -> list[Node]:
    kinds = rng.choice(len(NODE_KINDS), size=count, p=[k.share for k in NODE_KINDS])
    out = []
    for i, k in enumerate(kinds):
        kind = NODE_KINDS[k]
        taints = (GPU_TAINT,) if kind.gpus and rng.random() < TAINTED_GPU_NODE_SHARE else ()
        labels = (("tessera.dev/accelerator", kind.accelerator), ("zone", str(rng.choice(ZONES))))
        out.append(
            Node(
                f"{kind.accelerator}-{i:05d}",
                Resources(kind.gpus, kind.cores * 1000, kind.memory_gib * GIB),
                labels,
                taints,
            )
        )
    return out


def _templates(count: int, rng: np.random.Generator) -> list[_Template]:
    gpu_kinds = [k for k in NODE_KINDS if k.gpus]
    tiers = list(TIER_MIX)
    tolerate = (Toleration(GPU_TAINT.key, "Exists", effect="NoSchedule"),)
    out = []
    for i in range(count):
        tier: PriorityTier = tiers[rng.choice(len(tiers), p=list(TIER_MIX.values()))]
        roll = rng.random()
        pdb = None if roll < 0.2 else f"pdb-{i}"
        movable = bool(rng.random() >= 0.05)
        if rng.random() < 0.8:
            size = int(rng.choice(list(GPU_SIZE_MIX), p=list(GPU_SIZE_MIX.values())))
            if rng.random() < ANY_GPU_SHARE and size <= 8:
                kind = gpu_kinds[1]
                expression = MatchExpression("tessera.dev/accelerator", "In", ("a100", "h100"))
                requirement = NodeRequirement(affinity_terms=((expression,),), tolerations=tolerate)
            else:
                fitting = [k for k in gpu_kinds if k.gpus >= size]
                kind = fitting[rng.choice(len(fitting))]
                selector = (("tessera.dev/accelerator", kind.accelerator),)
                requirement = NodeRequirement(node_selector=selector, tolerations=tolerate)
            factor = float(rng.choice(CPU_FACTORS))
            requests = Resources(
                size,
                int(size * kind.cores_per_gpu * factor * 1000),
                int(size * kind.memory_gib_per_gpu * factor * GIB),
            )
        else:
            cores, gib = CPU_POD_SIZES[rng.choice(len(CPU_POD_SIZES))]
            requests, requirement = Resources(0, cores * 1000, gib * GIB), NodeRequirement()
        out.append(_Template(f"d{i:04d}", requests, requirement, tier, pdb, movable))
    return out


class _Placer:
    """Places pods one at a time like kube-scheduler's default profile (LeastAllocated)."""

    def __init__(
        self, nodes: list[Node], templates: list[_Template], rng: np.random.Generator
    ) -> None:
        self.nodes, self.templates, self.rng = nodes, templates, rng
        self.capacity = np.array([n.capacity.as_tuple() for n in nodes], dtype=np.int64)
        self.free = self.capacity.copy()
        self.admits = np.array([[t.requirement.admits(n) for n in nodes] for t in templates])
        self.pods: dict[str, tuple[int, int]] = {}  # name -> (template, node)
        self.serial = 0
        gpu_templates = [i for i, t in enumerate(templates) if t.requests.gpu]
        cpu_templates = [i for i, t in enumerate(templates) if not t.requests.gpu]
        self.gpu_templates, self.cpu_templates = gpu_templates, cpu_templates

    def place(self, t: int) -> bool:
        req = np.array(self.templates[t].requests.as_tuple())
        feasible = np.nonzero(self.admits[t] & (self.free >= req).all(axis=1))[0]
        if feasible.size == 0:
            return False
        if feasible.size > SCORED_NODES:
            feasible = self.rng.choice(feasible, SCORED_NODES, replace=False)
        share = (self.free[feasible] - req) / np.maximum(self.capacity[feasible], 1)
        node = int(feasible[np.argmax(share.sum(axis=1))])
        self.free[node] -= req
        self.pods[f"{self.templates[t].name}-{self.serial}"] = (t, node)
        self.serial += 1
        return True

    def fill(self, gpu_utilization: float) -> None:
        total = self.capacity[:, 0].sum()
        failures = 0
        while failures < 50 and (total - self.free[:, 0].sum()) < gpu_utilization * total:
            if self.cpu_templates and self.rng.random() < 0.3:
                t = self.cpu_templates[self.rng.integers(len(self.cpu_templates))]
            else:
                t = self.gpu_templates[self.rng.integers(len(self.gpu_templates))]
            failures = 0 if self.place(t) else failures + 1

    def remove_share(self, share: float) -> None:
        names = list(self.pods)
        for i in self.rng.choice(len(names), int(share * len(names)), replace=False):
            t, node = self.pods.pop(names[i])
            self.free[node] += np.array(self.templates[t].requests.as_tuple())

    def grow(self, gpu_utilization: float, churn_rounds: int) -> ClusterSnapshot:
        self.fill(gpu_utilization)
        for _ in range(churn_rounds):
            self.remove_share(0.3)
            self.fill(gpu_utilization)
        pods = []
        for name, (t, node) in self.pods.items():
            template = self.templates[t]
            pods.append(
                Pod(
                    name=name,
                    node=self.nodes[node].name,
                    requests=template.requests,
                    priority=template.priority,
                    requirement=template.requirement,
                    pdbs=(template.pdb,) if template.pdb else (),
                    movable=template.movable,
                )
            )
        pdbs = sorted({t.pdb for t in self.templates if t.pdb})
        allowed = {p: int(self.rng.random() >= 0.1) for p in pdbs}
        return ClusterSnapshot(tuple(self.nodes), tuple(pods), allowed)
