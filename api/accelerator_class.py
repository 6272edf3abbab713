"""AcceleratorClass: a kind of device in the fleet, its capabilities, cost and how to reach it.

Cluster-scoped, one per hardware kind (like OME's AcceleratorClass). The planner reads the
numbers; the operator uses the node selector and resource name to place pods on it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from tessera.api.common import ApiModel, CustomResource, CustomResourceInfo


class PeakTflops(ApiModel):
    """Dense peak throughput per numeric format, TFLOP/s per device."""

    bf16: float = Field(gt=0, description="bf16 dense TFLOP/s.")
    fp16: float | None = Field(default=None, gt=0, description="fp16 dense TFLOP/s.")
    fp8: float | None = Field(default=None, gt=0, description="fp8 dense TFLOP/s.")
    fp32: float | None = Field(default=None, gt=0, description="fp32 TFLOP/s.")

    def for_dtype(self, dtype: str) -> float:
        """Peak for a format, falling back to bf16 where the device has no faster path."""
        value = getattr(self, dtype, None)
        return float(value) if value is not None else self.bf16


class AcceleratorClassSpec(ApiModel):
    """Capabilities, limits, cost and placement of one device kind."""

    vendor: str = Field(min_length=1, description="Vendor, e.g. nvidia, amd, huawei, intel.")
    kind: Literal["GPU", "NPU", "CPU"] = Field(description="Device kind.")
    model: str = Field(min_length=1, description="Device model, e.g. H100-SXM5-80GB.")
    memory_gib: float = Field(gt=0, description="Device memory, GiB.")
    memory_bandwidth_gbps: float = Field(
        gt=0, description="Device memory bandwidth, GB/s (10^9 bytes per second)."
    )
    peak_tflops: PeakTflops = Field(description="Dense peak TFLOP/s per numeric format.")
    tdp_w: float = Field(gt=0, description="Board power limit at default (TDP), watts.")
    min_power_cap_w: float | None = Field(
        default=None, gt=0, description="Lowest settable power limit, watts."
    )
    idle_power_w: float | None = Field(default=None, ge=0, description="Idle draw, watts.")
    interconnect_bandwidth_gbps: float = Field(
        default=0.0,
        ge=0,
        description="Device-to-device bandwidth inside a node (NVLink/HCCS), GB/s per direction.",
    )
    network_bandwidth_gbps: float = Field(
        default=25.0, gt=0, description="Node network bandwidth for KV transfer, GB/s."
    )
    accelerators_per_node: int = Field(default=8, ge=1, description="Devices per node.")
    cost_per_hour: float = Field(ge=0, description="Cost of one device for an hour (any currency).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels that select nodes of this class."
    )
    resource_name: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource per device, e.g. nvidia.com/gpu or huawei.com/Ascend910.",
    )
    tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="Tolerations pods need on these nodes."
    )

    @model_validator(mode="after")
    def _cap_below_tdp(self) -> AcceleratorClassSpec:
        if self.min_power_cap_w is not None and self.min_power_cap_w > self.tdp_w:
            raise ValueError(
                f"minPowerCapW ({self.min_power_cap_w}) must not exceed tdpW ({self.tdp_w})"
            )
        return self

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


class AcceleratorClassStatus(ApiModel):
    """Capacity the operator found for the class."""

    nodes: int = Field(default=0, ge=0, description="Nodes matching the selector.")
    capacity: int = Field(default=0, ge=0, description="Devices on those nodes.")
    allocated: int = Field(default=0, ge=0, description="Devices Tessera plans hold.")


class AcceleratorClass(CustomResource):
    """A kind of accelerator (or CPU) in the fleet."""

    crd: ClassVar[CustomResourceInfo] = CustomResourceInfo(
        kind="AcceleratorClass",
        plural="acceleratorclasses",
        singular="acceleratorclass",
        short_names=["ac", "accel"],
        scope="Cluster",
        printer_columns=[
            {"name": "Vendor", "type": "string", "jsonPath": ".spec.vendor"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Memory", "type": "number", "jsonPath": ".spec.memoryGib"},
            {"name": "Cost/h", "type": "number", "jsonPath": ".spec.costPerHour"},
            {"name": "Capacity", "type": "integer", "jsonPath": ".status.capacity"},
        ],
    )

    kind: Literal["AcceleratorClass"] = "AcceleratorClass"
    spec: AcceleratorClassSpec
    status: AcceleratorClassStatus | None = None
