"""What the planner may use: accelerator classes with the capacity left for a deployment."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec


@dataclass(frozen=True)
class ClassOffer:
    """One accelerator class and how many of its devices are free for this deployment.

    `free_accelerators` is None when capacity is not known (planning a fleet on paper): the
    planner then sizes the plan without a capacity bound.
    """

    name: str
    spec: AcceleratorClassSpec
    free_accelerators: int | None = None

    @classmethod
    def from_resource(
        cls, resource: AcceleratorClass, free_accelerators: int | None = None
    ) -> ClassOffer:
        """An offer from a resource; capacity from the argument, else from its status."""
        status = resource.status
        if free_accelerators is None and status is not None and status.capacity > 0:
            free_accelerators = max(0, status.capacity - status.allocated)
        return cls(resource.metadata.name, resource.spec, free_accelerators)
