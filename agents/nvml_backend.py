"""NVIDIA GPUs through NVML (nvidia-ml-py, the `pynvml` module NVIDIA publishes).

Every NVML call goes through `NvmlBackend._call`, which turns an `NVMLError` into one of the
typed errors of `tessera.agents.backend` with a message naming the call, the device and what to
do about it; the server maps those to gRPC status codes. A field the GPU does not support
(NVML_ERROR_NOT_SUPPORTED) is reported as not measured rather than as an error.

Controls need root (or CAP_SYS_ADMIN) on the node; without it NVML answers NO_PERMISSION, which
reaches the operator as PERMISSION_DENIED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tessera.agents.backend import (
    THROTTLE_REASONS,
    BackendError,
    ClockLock,
    DeviceBackend,
    DeviceInfo,
    DeviceKind,
    DeviceNotFoundError,
    DeviceReading,
    DeviceUnavailableError,
    NotSupportedError,
    OutOfRangeError,
    PermissionDeniedError,
    check_clock_lock,
    check_power_limit,
)

log = logging.getLogger(__name__)

# NVML return codes (nvml.h `nvmlReturn_t`) -> (error type, what to do). Names are looked up
# on the pynvml module so that a code the installed version lacks is simply skipped.
_ERROR_TABLE: dict[str, tuple[type[BackendError], str]] = {
    "NVML_ERROR_NOT_SUPPORTED": (NotSupportedError, "this GPU or driver does not offer it"),
    "NVML_ERROR_FUNCTION_NOT_FOUND": (NotSupportedError, "the driver is too old for this call"),
    "NVML_ERROR_DEPRECATED": (NotSupportedError, "the driver dropped this call"),
    "NVML_ERROR_FREQ_NOT_SUPPORTED": (OutOfRangeError, "pick a supported clock"),
    "NVML_ERROR_INVALID_ARGUMENT": (OutOfRangeError, "the driver refused the value"),
    "NVML_ERROR_NO_PERMISSION": (
        PermissionDeniedError,
        "run the agent as root or with CAP_SYS_ADMIN (the chart's securityContext)",
    ),
    "NVML_ERROR_NOT_FOUND": (DeviceNotFoundError, "the device is gone; rediscover devices"),
    "NVML_ERROR_GPU_NOT_FOUND": (DeviceNotFoundError, "the device is gone; rediscover devices"),
    "NVML_ERROR_UNINITIALIZED": (DeviceUnavailableError, "NVML is not initialised"),
    "NVML_ERROR_DRIVER_NOT_LOADED": (
        DeviceUnavailableError,
        "the NVIDIA kernel driver is not loaded on this node",
    ),
    "NVML_ERROR_LIBRARY_NOT_FOUND": (
        DeviceUnavailableError,
        "libnvidia-ml.so was not found: run the agent with the NVIDIA container runtime",
    ),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (
        DeviceUnavailableError,
        "the NVML library and the kernel driver differ in version: reboot or reinstall",
    ),
    "NVML_ERROR_GPU_IS_LOST": (
        DeviceUnavailableError,
        "the GPU fell off the bus: drain the node and reset the GPU",
    ),
    "NVML_ERROR_RESET_REQUIRED": (DeviceUnavailableError, "the GPU needs a reset"),
    "NVML_ERROR_TIMEOUT": (DeviceUnavailableError, "the driver timed out; try again"),
    "NVML_ERROR_NOT_READY": (DeviceUnavailableError, "the driver is not ready; try again"),
    "NVML_ERROR_IN_USE": (DeviceUnavailableError, "another process holds the setting"),
    "NVML_ERROR_INSUFFICIENT_POWER": (
        DeviceUnavailableError,
        "a power cable is not connected properly",
    ),
    "NVML_ERROR_IRQ_ISSUE": (DeviceUnavailableError, "the kernel reports an interrupt problem"),
    "NVML_ERROR_MEMORY": (DeviceUnavailableError, "the driver ran out of host memory"),
    "NVML_ERROR_NO_DATA": (DeviceUnavailableError, "no data yet; try again"),
}

# Bits of nvmlDeviceGetCurrentClocksEventReasons (nvml.h nvmlClocksEventReason*), in the order
# of THROTTLE_REASONS; bit 0x1 (GPU idle) is not a throttle.
_THROTTLE_BITS: tuple[tuple[int, str], ...] = tuple(
    zip((0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100), THROTTLE_REASONS, strict=True)
)


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """The names of the throttle bits set in an NVML clocks-event mask."""
    return tuple(name for bit, name in _THROTTLE_BITS if mask & bit)


def map_nvml_error(nvml: Any, error: Exception, call: str, device: str) -> BackendError:
    """The typed backend error for an NVMLError raised by `call` on `device`."""
    code = getattr(error, "value", None)
    for name, (error_type, hint) in _ERROR_TABLE.items():
        if code is not None and getattr(nvml, name, object()) == code:
            return error_type(f"NVML {call} on {device} failed: {error} ({name}); {hint}")
    return BackendError(f"NVML {call} on {device} failed: {error} (code {code})")


class NvmlBackend(DeviceBackend):
    """Every NVIDIA GPU NVML sees on the node.

    `nvml` is the pynvml module; tests may pass a stand-in with the same functions. A power
    limit change is returned once NVML's enforced limit follows it, or after `settle_timeout_s`
    with whatever is enforced then.
    """

    name = "nvml"

    def __init__(
        self, nvml: Any = None, settle_timeout_s: float = 2.0, settle_poll_s: float = 0.02
    ) -> None:
        self.settle_timeout_s = settle_timeout_s
        self.settle_poll_s = settle_poll_s
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._lock = threading.RLock()
        self._call("nvmlInit", "the node")
        self._handles: dict[str, Any] = {}
        self._locks: dict[str, tuple[int, int]] = {}
        infos = []
        count = self._call("nvmlDeviceGetCount", "the node")
        for index in range(count):
            handle = self._call("nvmlDeviceGetHandleByIndex", f"GPU {index}", index)
            uuid = str(self._call("nvmlDeviceGetUUID", f"GPU {index}", handle))
            self._handles[uuid] = handle
            infos.append(self._describe(index, uuid, handle))
        self._infos = tuple(infos)

    def _call(self, call: str, device: str, *args: Any) -> Any:
        """Call the NVML function named `call`, turning NVMLError into a typed error."""
        fn: Callable[..., Any] = getattr(self._nvml, call)
        try:
            return fn(*args)
        except self._nvml.NVMLError as error:
            raise map_nvml_error(self._nvml, error, call, device) from error

    def _optional(self, call: str, device: str, *args: Any) -> Any:
        """A reading that some GPUs lack: None on NOT_SUPPORTED, typed error otherwise."""
        try:
            return self._call(call, device, *args)
        except NotSupportedError:
            return None

    def _describe(self, index: int, uuid: str, handle: Any) -> DeviceInfo:
        name = self._call("nvmlDeviceGetName", uuid, handle)
        constraints = self._optional(
            "nvmlDeviceGetPowerManagementLimitConstraints",
            uuid,
            handle,
        )
        default_mw = self._optional(
            "nvmlDeviceGetPowerManagementDefaultLimit",
            uuid,
            handle,
        )
        memory = self._optional("nvmlDeviceGetMemoryInfo", uuid, handle)
        sm_min, sm_max = self._sm_clock_range(uuid, handle)
        return DeviceInfo(
            uuid=uuid,
            index=index,
            kind=DeviceKind.GPU,
            vendor="nvidia",
            model=str(name),
            backend=self.name,
            power_limit_min_w=constraints[0] / 1000.0 if constraints else None,
            power_limit_max_w=constraints[1] / 1000.0 if constraints else None,
            power_limit_default_w=default_mw / 1000.0 if default_mw is not None else None,
            sm_clock_min_mhz=sm_min,
            sm_clock_max_mhz=sm_max,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            power_limit_settable=constraints is not None,
            clocks_lockable=sm_min is not None and sm_max is not None,
        )

    def _sm_clock_range(self, uuid: str, handle: Any) -> tuple[int | None, int | None]:
        """Lowest and highest supported graphics clocks at the highest memory clock."""
        memory_clocks = self._optional("nvmlDeviceGetSupportedMemoryClocks", uuid, handle)
        if not memory_clocks:
            return None, None
        graphics = self._optional(
            "nvmlDeviceGetSupportedGraphicsClocks",
            uuid,
            handle,
            max(memory_clocks),
        )
        if not graphics:
            return None, None
        return int(min(graphics)), int(max(graphics))

    def devices(self) -> Sequence[DeviceInfo]:
        return self._infos

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is None:
            self.info(uuid)  # raises DeviceNotFoundError naming the known devices
            raise DeviceNotFoundError(f"no NVML handle for {uuid}")
        return handle

    def read(self, uuid: str) -> DeviceReading:
        nvml = self._nvml
        handle = self._handle(uuid)
        info = self.info(uuid)
        with self._lock:
            power_mw = self._optional("nvmlDeviceGetPowerUsage", uuid, handle)
            energy_mj = self._optional(
                "nvmlDeviceGetTotalEnergyConsumption",
                uuid,
                handle,
            )
            limit_mw = self._optional("nvmlDeviceGetEnforcedPowerLimit", uuid, handle)
            sm_mhz = self._optional("nvmlDeviceGetClockInfo", uuid, handle, nvml.NVML_CLOCK_SM)
            mem_mhz = self._optional("nvmlDeviceGetClockInfo", uuid, handle, nvml.NVML_CLOCK_MEM)
            util = self._optional("nvmlDeviceGetUtilizationRates", uuid, handle)
            memory = self._optional("nvmlDeviceGetMemoryInfo", uuid, handle)
            temperature = self._optional(
                "nvmlDeviceGetTemperature",
                uuid,
                handle,
                nvml.NVML_TEMPERATURE_GPU,
            )
            # Renamed from "throttle" to "clocks event" reasons in NVML 12.x; same bits.
            reasons_call = (
                "nvmlDeviceGetCurrentClocksEventReasons"
                if hasattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons")
                else "nvmlDeviceGetCurrentClocksThrottleReasons"
            )
            reasons = self._optional(reasons_call, uuid, handle)
            lock = self._locks.get(uuid)
        return DeviceReading(
            uuid=uuid,
            index=info.index,
            timestamp_s=time.time(),
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            energy_j=energy_mj / 1000.0 if energy_mj is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            sm_clock_mhz=int(sm_mhz) if sm_mhz is not None else None,
            memory_clock_mhz=int(mem_mhz) if mem_mhz is not None else None,
            utilization_ratio=util.gpu / 100.0 if util is not None else None,
            memory_utilization_ratio=util.memory / 100.0 if util is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            throttle_reasons=throttle_reason_names(int(reasons)) if reasons is not None else (),
            locked_sm_clock_min_mhz=lock[0] if lock else None,
            locked_sm_clock_max_mhz=lock[1] if lock else None,
        )

    def set_power_limit(self, uuid: str, power_limit_w: float) -> float:
        info = self.info(uuid)
        check_power_limit(info, power_limit_w)
        handle = self._handle(uuid)
        with self._lock:
            self._call(
                "nvmlDeviceSetPowerManagementLimit", uuid, handle, round(power_limit_w * 1000)
            )
            # Measured on an H100 (bench/results): the enforced limit read right after the set
            # still shows the old value, so wait (bounded) until it follows the new one.
            deadline = time.monotonic() + self.settle_timeout_s
            while True:
                requested_mw = self._call("nvmlDeviceGetPowerManagementLimit", uuid, handle)
                enforced_mw = self._call("nvmlDeviceGetEnforcedPowerLimit", uuid, handle)
                if enforced_mw == requested_mw or time.monotonic() >= deadline:
                    break
                time.sleep(self.settle_poll_s)
        if enforced_mw != requested_mw:
            log.warning(
                "GPU %s: enforced power limit %.1f W differs from the limit set, %.1f W, after "
                "%.1f s (another limit is lower, or the driver is slow)",
                uuid,
                enforced_mw / 1000.0,
                requested_mw / 1000.0,
                self.settle_timeout_s,
            )
        return float(enforced_mw) / 1000.0

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> ClockLock:
        nvml = self._nvml
        check_clock_lock(self.info(uuid), min_mhz, max_mhz)
        handle = self._handle(uuid)
        with self._lock:
            self._call(
                "nvmlDeviceSetGpuLockedClocks",
                uuid,
                handle,
                min_mhz,
                max_mhz,
            )
            self._locks[uuid] = (min_mhz, max_mhz)
            current = self._optional("nvmlDeviceGetClockInfo", uuid, handle, nvml.NVML_CLOCK_SM)
        return ClockLock(True, min_mhz, max_mhz, int(current) if current is not None else None)

    def reset_sm_clocks(self, uuid: str) -> ClockLock:
        nvml = self._nvml
        if not self.info(uuid).clocks_lockable:
            raise NotSupportedError(f"device {uuid} (nvml): clocks cannot be locked")
        handle = self._handle(uuid)
        with self._lock:
            self._call("nvmlDeviceResetGpuLockedClocks", uuid, handle)
            self._locks.pop(uuid, None)
            current = self._optional("nvmlDeviceGetClockInfo", uuid, handle, nvml.NVML_CLOCK_SM)
        return ClockLock(False, None, None, int(current) if current is not None else None)

    def close(self) -> None:
        with self._lock:
            self._call("nvmlShutdown", "the node")
