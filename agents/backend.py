"""One interface for every kind of device a node agent drives: GPUs, NPUs and CPU packages.

The gRPC server, the Prometheus exporter and the benchmarks talk only to `DeviceBackend`, so a
node with NVIDIA GPUs (NVML), one with Ascend NPUs (npu-smi), a CPU-only node (powercap) and CI
(the simulated device) all run the same agent. A reading holds `None` where the backend cannot
measure a field: the agent never reports a number it did not read.

Errors are typed so that the server can map each to one gRPC status code (see
`tessera.agents.server.STATUS_OF_ERROR`): a caller learns whether to fix the request, wait, or
give up on the device.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass

# Why clocks can be held down, named after NVML's clocks-event reasons (GPU idle left out: it is
# not a throttle). Other backends use the same names where they report reasons at all.
THROTTLE_REASONS: tuple[str, ...] = (
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)


class DeviceKind(enum.StrEnum):
    GPU = "GPU"
    NPU = "NPU"
    CPU = "CPU"


class BackendError(Exception):
    """A device or its driver failed; the message names the device and the call."""


class DeviceNotFoundError(BackendError, LookupError):
    """No device with this uuid on the node."""


class OutOfRangeError(BackendError, ValueError):
    """A control value outside what the device allows; nothing was changed."""


class NotSupportedError(BackendError):
    """The device or backend has no such control or field."""


class PermissionDeniedError(BackendError):
    """The driver refused the change (controls need root or CAP_SYS_ADMIN on the node)."""


class DeviceUnavailableError(BackendError):
    """The device or its driver cannot be reached now (driver not loaded, GPU lost, timeout)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is and which controls it allows; fixed for the agent's lifetime."""

    uuid: str
    index: int
    kind: DeviceKind
    vendor: str
    model: str
    backend: str
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None
    sm_clock_min_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    memory_total_bytes: int | None = None
    power_limit_settable: bool = False
    clocks_lockable: bool = False


@dataclass(frozen=True)
class DeviceReading:
    """One sample of one device; `None` means not measured by this backend."""

    uuid: str
    index: int
    timestamp_s: float
    power_w: float | None = None
    energy_j: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    locked_sm_clock_min_mhz: int | None = None
    locked_sm_clock_max_mhz: int | None = None


@dataclass(frozen=True)
class ClockLock:
    """The SM clock lock in force: `locked` False means the driver picks clocks freely."""

    locked: bool
    min_mhz: int | None = None
    max_mhz: int | None = None
    current_sm_clock_mhz: int | None = None


def check_power_limit(info: DeviceInfo, power_limit_w: float) -> None:
    """Refuse a power limit the device does not allow, before anything touches the device."""
    if not info.power_limit_settable:
        raise NotSupportedError(f"device {info.uuid} ({info.backend}): power limit is not settable")
    low, high = info.power_limit_min_w, info.power_limit_max_w
    if low is None or high is None:
        raise NotSupportedError(f"device {info.uuid}: the power limit range is unknown")
    if not low <= power_limit_w <= high:
        raise OutOfRangeError(
            f"device {info.uuid}: power limit {power_limit_w:g} W is outside the allowed range "
            f"[{low:g}, {high:g}] W"
        )


def check_clock_lock(info: DeviceInfo, min_mhz: int, max_mhz: int) -> None:
    """Refuse an SM clock lock outside the device's clocks or with its bounds reversed."""
    if not info.clocks_lockable:
        raise NotSupportedError(f"device {info.uuid} ({info.backend}): clocks cannot be locked")
    if min_mhz > max_mhz:
        raise OutOfRangeError(
            f"device {info.uuid}: sm_clock_min_mhz {min_mhz} is above sm_clock_max_mhz {max_mhz}"
        )
    low, high = info.sm_clock_min_mhz, info.sm_clock_max_mhz
    if low is None or high is None:
        raise NotSupportedError(f"device {info.uuid}: the SM clock range is unknown")
    if min_mhz < low or max_mhz > high:
        raise OutOfRangeError(
            f"device {info.uuid}: SM clock lock [{min_mhz}, {max_mhz}] MHz is outside the "
            f"supported range [{low}, {high}] MHz"
        )


class DeviceBackend(abc.ABC):
    """The devices of one kind on this node, their readings and their controls.

    Implementations must be safe to call from several threads: the gRPC server serves control
    calls while the sampler reads.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def devices(self) -> Sequence[DeviceInfo]:
        """Every device this backend drives, in index order."""

    @abc.abstractmethod
    def read(self, uuid: str) -> DeviceReading:
        """Sample one device now."""

    def set_power_limit(self, uuid: str, power_limit_w: float) -> float:
        """Set the board power limit; return the limit in force, read back from the device."""
        raise NotSupportedError(f"device {uuid} ({self.name}): power limit is not settable")

    def reset_power_limit(self, uuid: str) -> float:
        """Put the default power limit back; return the limit in force."""
        info = self.info(uuid)
        if info.power_limit_default_w is None:
            raise NotSupportedError(f"device {uuid} ({self.name}): no default power limit")
        return self.set_power_limit(uuid, info.power_limit_default_w)

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> ClockLock:
        """Lock the SM clock into [min_mhz, max_mhz]; return the lock in force."""
        raise NotSupportedError(f"device {uuid} ({self.name}): clocks cannot be locked")

    def reset_sm_clocks(self, uuid: str) -> ClockLock:
        """Release an SM clock lock; return the (unlocked) state in force."""
        raise NotSupportedError(f"device {uuid} ({self.name}): clocks cannot be locked")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release the driver (NVML shutdown, file handles)."""

    def info(self, uuid: str) -> DeviceInfo:
        for device in self.devices():
            if device.uuid == uuid:
                return device
        known = ", ".join(d.uuid for d in self.devices()) or "none"
        raise DeviceNotFoundError(f"no device {uuid!r} on this node ({self.name}); known: {known}")
