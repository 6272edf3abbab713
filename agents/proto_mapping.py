"""The agent contract's mapping between its protobuf messages (api/agent/v1/agent.proto) and the
plain Python types on each side, both directions, in one place.

- To the wire (the agent, `agents/server.py`): a device's `DeviceInfo` and `DeviceReading`
  (agents/backend.py) and a serving instance's `InstanceStats` (agents/instance_stats.py)
  become `DeviceInfo`, `DeviceSample` and `InstanceSample` messages; Control answers become
  `PowerLimitResponse` and `ClocksResponse`.
- From the wire (the operator's collector, `operator/collector.py`): a `DeviceSample` becomes a
  `DeviceTelemetry`, an `InstanceSample` an `InstanceStats` again, so the agent and the
  operator share one instance type.

proto3 `optional` fields carry "not measured": a None is left absent on the way out and an
absent field reads back as None, never as the message's zero default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tessera.agents.backend import ClockLock, DeviceInfo, DeviceKind, DeviceReading
from tessera.agents.instance_stats import InstanceStats
from tessera.api.agent.v1 import agent_pb2

SCHEMA_VERSION = 1
"""Minor version of agent.proto this code was built from (see the versioning notes there)."""

_KIND = {
    DeviceKind.GPU: agent_pb2.DEVICE_KIND_GPU,
    DeviceKind.NPU: agent_pb2.DEVICE_KIND_NPU,
    DeviceKind.CPU: agent_pb2.DEVICE_KIND_CPU,
}


def _set_present(message: object, **fields: float | int | None) -> None:
    """Set the proto3 `optional` fields that were measured; leave the others absent."""
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


# -- to the wire (the agent) -------------------------------------------------------------------


def device_info_to_proto(info: DeviceInfo) -> agent_pb2.DeviceInfo:
    message = agent_pb2.DeviceInfo(
        uuid=info.uuid,
        index=info.index,
        kind=_KIND[info.kind],
        vendor=info.vendor,
        model=info.model,
        backend=info.backend,
        power_limit_settable=info.power_limit_settable,
        clocks_lockable=info.clocks_lockable,
    )
    _set_present(
        message,
        power_limit_min_w=info.power_limit_min_w,
        power_limit_max_w=info.power_limit_max_w,
        power_limit_default_w=info.power_limit_default_w,
        sm_clock_min_mhz=info.sm_clock_min_mhz,
        sm_clock_max_mhz=info.sm_clock_max_mhz,
        memory_total_bytes=info.memory_total_bytes,
    )
    return message


def reading_to_proto(reading: DeviceReading, info: DeviceInfo | None) -> agent_pb2.DeviceSample:
    message = agent_pb2.DeviceSample(
        uuid=reading.uuid, index=reading.index, throttle_reasons=list(reading.throttle_reasons)
    )
    _set_present(
        message,
        power_w=reading.power_w,
        energy_j=reading.energy_j,
        power_limit_w=reading.power_limit_w,
        power_limit_min_w=info.power_limit_min_w if info else None,
        power_limit_max_w=info.power_limit_max_w if info else None,
        sm_clock_mhz=reading.sm_clock_mhz,
        memory_clock_mhz=reading.memory_clock_mhz,
        utilization_ratio=reading.utilization_ratio,
        memory_utilization_ratio=reading.memory_utilization_ratio,
        memory_used_bytes=reading.memory_used_bytes,
        memory_total_bytes=reading.memory_total_bytes,
        temperature_c=reading.temperature_c,
        locked_sm_clock_min_mhz=reading.locked_sm_clock_min_mhz,
        locked_sm_clock_max_mhz=reading.locked_sm_clock_max_mhz,
    )
    return message


_INSTANCE_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceStats))
"""`InstanceStats` carries exactly `InstanceSample`'s fields, by the same names (checked by
tests/test_agent_proto.py), so each direction maps them by name; tuples are repeated fields."""


def instance_to_proto(stats: InstanceStats) -> agent_pb2.InstanceSample:
    return agent_pb2.InstanceSample(**{name: getattr(stats, name) for name in _INSTANCE_FIELDS})


def power_limit_response(
    uuid: str, in_force_w: float, info: DeviceInfo
) -> agent_pb2.PowerLimitResponse:
    """The answer to SetPowerLimit / ResetPowerLimit: the limit in force and the device's range."""
    response = agent_pb2.PowerLimitResponse(
        schema_version=SCHEMA_VERSION, device_uuid=uuid, power_limit_w=in_force_w
    )
    _set_present(
        response,
        power_limit_min_w=info.power_limit_min_w,
        power_limit_max_w=info.power_limit_max_w,
        power_limit_default_w=info.power_limit_default_w,
    )
    return response


def clocks_response(uuid: str, lock: ClockLock) -> agent_pb2.ClocksResponse:
    """The answer to LockClocks / ResetClocks: the lock in force."""
    response = agent_pb2.ClocksResponse(
        schema_version=SCHEMA_VERSION, device_uuid=uuid, locked=lock.locked
    )
    _set_present(
        response,
        sm_clock_min_mhz=lock.min_mhz,
        sm_clock_max_mhz=lock.max_mhz,
        sm_clock_mhz=lock.current_sm_clock_mhz,
    )
    return response


# -- from the wire (the operator) --------------------------------------------------------------


@dataclass(frozen=True)
class DeviceTelemetry:
    """One device as its agent last reported it; None where the agent did not measure."""

    uuid: str
    index: int
    power_w: float | None
    energy_j: float | None
    power_limit_w: float | None
    power_limit_min_w: float | None
    power_limit_max_w: float | None
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    utilization_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_c: float | None
    throttle_reasons: tuple[str, ...]
    locked_sm_clock_min_mhz: int | None = None
    locked_sm_clock_max_mhz: int | None = None


def device_from_proto(sample: agent_pb2.DeviceSample) -> DeviceTelemetry:
    return DeviceTelemetry(
        uuid=sample.uuid,
        index=sample.index,
        power_w=_optional(sample, "power_w"),
        energy_j=_optional(sample, "energy_j"),
        power_limit_w=_optional(sample, "power_limit_w"),
        power_limit_min_w=_optional(sample, "power_limit_min_w"),
        power_limit_max_w=_optional(sample, "power_limit_max_w"),
        sm_clock_mhz=_optional(sample, "sm_clock_mhz"),
        memory_clock_mhz=_optional(sample, "memory_clock_mhz"),
        utilization_ratio=_optional(sample, "utilization_ratio"),
        memory_used_bytes=_optional(sample, "memory_used_bytes"),
        memory_total_bytes=_optional(sample, "memory_total_bytes"),
        temperature_c=_optional(sample, "temperature_c"),
        throttle_reasons=tuple(sample.throttle_reasons),
        locked_sm_clock_min_mhz=_optional(sample, "locked_sm_clock_min_mhz"),
        locked_sm_clock_max_mhz=_optional(sample, "locked_sm_clock_max_mhz"),
    )


def instance_from_proto(
    sample: agent_pb2.InstanceSample,
    ttft_samples_s: tuple[float, ...] | None = None,
    tpot_samples_s: tuple[float, ...] | None = None,
) -> InstanceStats:
    """The instance a sample describes. The latency samples are the message's unless given
    (the collector passes its window of recent samples, gathered over many messages)."""
    values: dict[str, Any] = {}
    for name in _INSTANCE_FIELDS:
        value = getattr(sample, name)
        values[name] = value if isinstance(value, str | int | float) else tuple(value)
    if ttft_samples_s is not None:
        values["ttft_samples_s"] = ttft_samples_s
    if tpot_samples_s is not None:
        values["tpot_samples_s"] = tpot_samples_s
    return InstanceStats(**values)
