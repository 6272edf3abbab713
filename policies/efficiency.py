"""Per-accelerator calibration of the performance model: achieved fractions of the roofs.

Defaults are conservative published-style efficiencies; a file in policies/calibration/ named
for the device model (e.g. h100.yaml, written by bench/engine_bench.py from a measured run)
overrides them. Files are matched by a lower-case key contained in the class's `model` string.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from typing import Any

import yaml
from tessera.api.accelerator_class import AcceleratorClassSpec


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of peak and fixed costs for one accelerator model."""

    compute_efficiency: float = 0.55
    """Fraction of peak dense FLOP/s a prefill GEMM reaches."""
    memory_efficiency: float = 0.75
    """Fraction of HBM bandwidth a decode step reaches."""
    interconnect_efficiency: float = 0.7
    allreduce_latency_s: float = 10e-6
    iteration_overhead_s: float = 1.5e-3
    """Scheduling and kernel-launch time per iteration (CUDA graphs bring it down)."""
    memory_utilization: float = 0.9
    activation_reserve_bytes: float = 2 * 2**30
    idle_power_fraction: float = 0.12
    compute_bound_power_fraction: float = 0.95
    memory_bound_power_fraction: float = 0.6
    source: str = "defaults"
    kv_memory_efficiency: float | None = None
    """Fraction of HBM bandwidth a decode step's KV reads reach (None: memory_efficiency).
    Measured: the decode efficiency at the longest context and largest batch measured (the
    most KV-dominated step), scaled to the datasheet as memory_efficiency is; the weights keep
    memory_efficiency, the lowest over all contexts (H200: KV 0.80, weights 0.68)."""


def _from_mapping(data: dict[str, Any]) -> Calibration:
    known = {f.name for f in fields(Calibration)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            values[key] = value if key == "source" else float(value)
    decode = data.get("decode_efficiency")
    if isinstance(decode, dict) and decode:
        # Efficiency measured at large batch is the one the bandwidth roof should carry.
        largest = max(decode, key=lambda batch: int(batch))
        values.setdefault("memory_efficiency", float(decode[largest]))
    by_context = data.get("decode_efficiency_by_context")
    measured = data.get("measured_hbm_bandwidth_gbps")
    datasheet = data.get("datasheet_hbm_bandwidth_gbps")
    if isinstance(by_context, dict) and by_context and measured and datasheet:
        longest = by_context[max(by_context, key=lambda context: int(context))]
        if isinstance(longest, dict) and longest:
            largest = longest[max(longest, key=lambda batch: int(batch))]
            # The table is against the measured copy bandwidth; the model multiplies datasheet.
            values.setdefault(
                "kv_memory_efficiency", float(largest) * float(measured) / float(datasheet)
            )
    prefill = data.get("prefill_efficiency")
    if isinstance(prefill, int | float):
        values.setdefault("compute_efficiency", float(prefill))
    return replace(Calibration(), **values)


@cache
def _calibration_files() -> dict[str, Calibration]:
    folder = resources.files("tessera.policies").joinpath("calibration")
    found: dict[str, Calibration] = {}
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            data = yaml.safe_load(entry.read_text()) or {}
            if isinstance(data, dict):
                found[entry.name.rsplit(".", 1)[0].lower()] = _from_mapping(data)
    return found


def calibration_for(accelerator: AcceleratorClassSpec) -> Calibration:
    """The calibration whose key the device model contains, else the defaults."""
    model = accelerator.model.lower().replace("-", "").replace(" ", "")
    for key, calibration in sorted(_calibration_files().items(), key=lambda kv: -len(kv[0])):
        if key.replace("-", "") in model:
            return calibration
    return Calibration()
