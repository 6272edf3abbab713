"""A simulated cluster: accelerator classes and how many nodes of each.

The YAML is the AcceleratorClass documents users `kubectl apply`, plus one `SimulatedCluster`
document that says how many nodes of each class exist (on a real cluster the operator counts
them). SimulatedCluster is a simulator input, not a custom resource.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.common import ApiModel
from tessera.api.loader import InvalidResourceError, describe_validation_error, parse_resource
from tessera.policies.capacity import ClassOffer
from tessera.policies.efficiency import Calibration
from tessera.sim.transfer import MeasuredTransport


class SimulatedClusterMeta(ApiModel):
    name: str = Field(min_length=1, description="Cluster name, shown in reports.")


class SimulatedCluster(ApiModel):
    """Node counts per accelerator class, and optional per-class device power caps."""

    api_version: Literal["tessera.dev/v1alpha1"] = Field(
        default="tessera.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["SimulatedCluster"] = "SimulatedCluster"
    metadata: SimulatedClusterMeta
    nodes: dict[str, int] = Field(
        description="Nodes per AcceleratorClass name; devices = nodes x acceleratorsPerNode."
    )
    power_cap_w: dict[str, float] = Field(
        default_factory=dict,
        description="Power limit per device of a class, watts (slows its iterations).",
    )
    kv_link_gbps: float | None = Field(
        default=None,
        gt=0,
        description="Bandwidth of prefill-to-decode KV transfers, GB/s; default: the lower "
        "networkBandwidthGbps of the two classes.",
    )
    kv_transport_measurement: str | None = Field(
        default=None,
        description="A bench/kv_transfer_bench.py JSON file (relative to this file): KV "
        "transfers cost its fitted latency + bytes / bandwidth (wins over kvLinkGbps).",
    )
    kv_transport: str = Field(
        default="tcp", description="Which measured transport of that file (tcp, cuda_ipc)."
    )


class ClusterError(ValueError):
    """The cluster files are inconsistent (a node count for an undefined class, no classes)."""


@dataclass
class Cluster:
    """Classes and capacity the simulator places deployments on."""

    name: str
    classes: dict[str, AcceleratorClassSpec]
    nodes: dict[str, int]
    power_cap_w: dict[str, float] = field(default_factory=dict)
    kv_link_gbps: float | None = None
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    """Per-class calibration overrides (tests use them to zero fixed overheads)."""
    kv_transport: MeasuredTransport | None = None
    """Measured KV transport (sim/transfer.py); every transfer costs what it measured."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.nodes) - set(self.classes))
        if unknown:
            raise ClusterError(
                f"cluster {self.name}: nodes names undefined AcceleratorClass(es) "
                f"{', '.join(unknown)}; defined: {', '.join(sorted(self.classes)) or 'none'}"
            )
        for name, count in self.nodes.items():
            if count < 0:
                raise ClusterError(f"cluster {self.name}: nodes.{name} must be >= 0, got {count}")
        for name, cap in self.power_cap_w.items():
            spec = self.classes.get(name)
            if spec is None:
                raise ClusterError(f"cluster {self.name}: powerCapW names unknown class {name}")
            low = spec.min_power_cap_w or 0.0
            if not low <= cap <= spec.tdp_w:
                raise ClusterError(
                    f"cluster {self.name}: powerCapW.{name} = {cap} W is outside "
                    f"[{low:g}, {spec.tdp_w:g}] W (minPowerCapW..tdpW)"
                )

    def accelerators(self, name: str) -> int:
        return self.nodes.get(name, 0) * self.classes[name].accelerators_per_node

    @property
    def total_accelerators(self) -> int:
        return sum(self.accelerators(name) for name in self.nodes)

    def offers(self, allocated: Mapping[str, int] | None = None) -> list[ClassOffer]:
        """Planner offers: every class with nodes, its free devices after `allocated`."""
        allocated = allocated or {}
        return [
            ClassOffer(
                name, self.classes[name], max(0, self.accelerators(name) - allocated.get(name, 0))
            )
            for name in sorted(self.nodes)
            if self.nodes[name] > 0
        ]

    def with_classes(self, classes: Mapping[str, AcceleratorClassSpec]) -> Cluster:
        """A copy with some class specs replaced (e.g. faster hardware for a what-if)."""
        merged = {**self.classes, **classes}
        return Cluster(
            self.name,
            merged,
            dict(self.nodes),
            dict(self.power_cap_w),
            self.kv_link_gbps,
            dict(self.calibrations),
            self.kv_transport,
        )


def load_cluster(paths: Iterable[Path | str]) -> Cluster:
    """The cluster described by AcceleratorClass (and optional SimulatedCluster) documents.

    Node counts come from the SimulatedCluster document's `nodes:` when there is one, else from
    each AcceleratorClass's `status.nodes`: the count the operator reports on a real cluster, so
    a file of AcceleratorClasses exported from a cluster simulates that cluster as it is.
    """
    classes: dict[str, AcceleratorClassSpec] = {}
    status_nodes: dict[str, int] = {}
    clusters: list[SimulatedCluster] = []
    cluster_dirs: list[Path] = []
    names: list[str] = []
    for path in paths:
        path = Path(path)
        names.append(path.stem)
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as error:
            raise InvalidResourceError(f"{path}: not valid YAML: {error}") from error
        for index, document in enumerate(documents):
            where = f"{path}[{index}]"
            if isinstance(document, dict) and document.get("kind") == "SimulatedCluster":
                try:
                    clusters.append(SimulatedCluster.model_validate(document))
                    cluster_dirs.append(path.parent)
                except ValidationError as error:
                    raise InvalidResourceError(
                        describe_validation_error(error, f"{where} SimulatedCluster")
                    ) from error
                continue
            resource = parse_resource(document, where)
            if isinstance(resource, AcceleratorClass):
                classes[resource.metadata.name] = resource.spec
                if resource.status is not None and resource.status.nodes > 0:
                    status_nodes[resource.metadata.name] = resource.status.nodes
    if len(clusters) > 1:
        raise ClusterError(f"expected at most one SimulatedCluster document, found {len(clusters)}")
    if not classes:
        raise ClusterError("the cluster files define no AcceleratorClass")
    if clusters:
        (spec,) = clusters
        measured = None
        if spec.kv_transport_measurement is not None:
            file = cluster_dirs[0] / spec.kv_transport_measurement
            try:
                measured = MeasuredTransport.from_bench(file, spec.kv_transport)
            except (OSError, ValueError, KeyError) as error:
                raise ClusterError(f"kvTransportMeasurement {file}: {error}") from error
        return Cluster(
            spec.metadata.name,
            classes,
            dict(spec.nodes),
            dict(spec.power_cap_w),
            spec.kv_link_gbps,
            kv_transport=measured,
        )
    if not status_nodes:
        raise ClusterError(
            "no node counts: add a SimulatedCluster document with nodes: {CLASS: COUNT}, or "
            "status.nodes to the AcceleratorClasses"
        )
    return Cluster("-".join(names), classes, status_nodes)
