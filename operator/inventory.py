"""What the fleet offers one ModelDeployment: accelerator classes and their free devices (pure).

Capacity of a class = the devices on the schedulable, ready nodes its nodeSelector matches
(allocatable `<resourceName>`; for a CPU class, `acceleratorsPerNode` sockets per node), less
what the plans of the *other* ModelDeployments hold on it. A class with no matching node has
unknown capacity (None): the planner then plans without a bound, the pods wait for nodes, and a
cluster autoscaler (or the person reading the plan) provides them. Planning on paper works the
same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.utils import parse_quantity
from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.model_deployment import Plan
from tessera.policies.capacity import ClassOffer


def node_selector_query(class_spec: AcceleratorClassSpec) -> str:
    """The labelSelector that lists a class's nodes."""
    return ",".join(f"{key}={value}" for key, value in sorted(class_spec.node_selector.items()))


def _schedulable(node: Mapping[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            return False
    return True


def _matches(node: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def class_capacity(
    class_spec: AcceleratorClassSpec, nodes: Iterable[Mapping[str, Any]]
) -> int | None:
    """Devices of a class on the given nodes; None when no node matches its selector."""
    matching = [n for n in nodes if _matches(n, class_spec.node_selector)]
    if not matching:
        return None
    total = 0
    for node in matching:
        if not _schedulable(node):
            continue
        if class_spec.kind == "CPU" or class_spec.resource_name == "cpu":
            total += class_spec.accelerators_per_node
            continue
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        quantity = allocatable.get(class_spec.resource_name)
        if quantity is not None:
            total += int(parse_quantity(str(quantity)))
    return total


def held_by_plans(plans: Iterable[Plan]) -> dict[str, int]:
    """Devices each class gives to the given plans."""
    held: dict[str, int] = {}
    for plan in plans:
        for name, count in plan.devices_by_class().items():
            held[name] = held.get(name, 0) + count
    return held


def build_offers(
    classes: Mapping[str, AcceleratorClassSpec],
    capacity: Mapping[str, int | None],
    other_plans: Iterable[Plan],
) -> list[ClassOffer]:
    """One offer per class (sorted by name) with what the other deployments leave free."""
    held = held_by_plans(other_plans)
    offers = []
    for name in sorted(classes):
        total = capacity.get(name)
        free = None if total is None else max(0, total - held.get(name, 0))
        offers.append(ClassOffer(name, classes[name], free))
    return offers
