"""A stand-in for the pynvml module: one H100-like GPU in memory, for tests only.

Constants and the NVMLError classes are the real ones from pynvml, so the backend's error
mapping is exercised with the codes NVML really returns. `fail` makes a named call raise an
NVML error code; `privileged=False` makes every setter answer NO_PERMISSION, as NVML does for
a non-root agent.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml


class FakeNvml:
    def __init__(self, privileged: bool = True) -> None:
        self.privileged = privileged
        self.fail: dict[str, int] = {}
        self.limit_mw = 700_000
        self.enforced_mw = 700_000
        # The enforced limit follows a set only after this many reads (as on a real H100).
        self.enforce_lag_reads = 0
        self._lag_left = 0
        self.locked: tuple[int, int] | None = None
        self.energy_mj = 1_000_000
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML") or name.startswith("nvmlClocks"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])

    def _setter(self, name: str) -> None:
        self._enter(name)
        if not self.privileged:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._enter("nvmlDeviceGetHandleByIndex")
        return f"handle-{index}"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return "GPU-fake-0"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: str) -> list[int]:
        self._enter("nvmlDeviceGetPowerManagementLimitConstraints")
        return [200_000, 700_000]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: str) -> int:
        return 700_000

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(total=85_520_809_984, used=1_048_576, free=85_519_761_408)

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: str) -> list[int]:
        return [2619, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: str, memory_mhz: int) -> list[int]:
        return [1980, 1500, 990, 345] if memory_mhz == 2619 else [1000]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        return 76_123

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption")
        self.energy_mj += 76
        return self.energy_mj

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        return self.limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        if self._lag_left > 0:
            self._lag_left -= 1
        else:
            self.enforced_mw = self.limit_mw
        return self.enforced_mw

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        if clock == pynvml.NVML_CLOCK_SM:
            return self.locked[1] if self.locked else 345
        return 2619

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 31

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        self._enter("nvmlDeviceGetCurrentClocksEventReasons")
        return 0x1 | 0x4  # GPU idle (not a throttle) and software power cap

    def nvmlDeviceSetPowerManagementLimit(self, handle: str, limit_mw: int) -> None:
        self._setter("nvmlDeviceSetPowerManagementLimit")
        self.limit_mw = limit_mw
        self._lag_left = self.enforce_lag_reads

    def nvmlDeviceSetGpuLockedClocks(self, handle: str, low: int, high: int) -> None:
        self._setter("nvmlDeviceSetGpuLockedClocks")
        self.locked = (low, high)

    def nvmlDeviceResetGpuLockedClocks(self, handle: str) -> None:
        self._setter("nvmlDeviceResetGpuLockedClocks")
        self.locked = None
