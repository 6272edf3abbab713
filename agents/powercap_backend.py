"""CPU package power through the Linux powercap sysfs (RAPL: /sys/class/powercap/intel-rapl:N).

For CPU-only serving nodes and for the host share of a node's power budget. The kernel exposes
a cumulative energy counter per package (`energy_uj`, wrapping at `max_energy_range_uj`); power
is the energy difference between two reads divided by the time between them, so the first
reading of a package has no power. The counter is unwrapped into a monotonic energy in joules.

Read-only: Tessera does not cap CPU power. Since Linux 5.10 `energy_uj` is readable by root
only (CVE-2020-8694); without it reads fail with PermissionDeniedError.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tessera.agents.backend import (
    DeviceBackend,
    DeviceInfo,
    DeviceKind,
    DeviceReading,
    DeviceUnavailableError,
    PermissionDeniedError,
)

POWERCAP_ROOT = Path("/sys/class/powercap")
# Package zones only (intel-rapl:0), not their sub-zones (intel-rapl:0:0 core, dram, ...).
_PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:(\d+)$")


@dataclass
class _Counter:
    raw_uj: int
    at_s: float
    energy_j: float = 0.0
    power_w: float | None = None


class PowercapBackend(DeviceBackend):
    """Every RAPL package zone under `root`."""

    name = "powercap"

    def __init__(self, root: Path = POWERCAP_ROOT, clock: Callable[[], float] = time.time) -> None:
        self._root = root
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._zones: dict[str, Path] = {}
        if not root.is_dir():
            raise DeviceUnavailableError(f"no powercap sysfs at {root}: kernel without RAPL")
        infos = []
        zones = sorted(
            (int(m.group(2)), m.group(1), path)
            for path in root.iterdir()
            if (m := _PACKAGE_ZONE.match(path.name))
        )
        for index, (_, vendor, path) in enumerate(zones):
            uuid = f"cpu-{path.name}"
            self._zones[uuid] = path
            max_power = self._optional_int(path / "constraint_0_max_power_uw")
            infos.append(
                DeviceInfo(
                    uuid=uuid,
                    index=index,
                    kind=DeviceKind.CPU,
                    vendor=vendor,
                    model=self._text(path / "name"),
                    backend=self.name,
                    power_limit_max_w=max_power / 1e6 if max_power else None,
                )
            )
        if not infos:
            raise DeviceUnavailableError(f"no RAPL package zones under {root}")
        self._infos = tuple(infos)

    @staticmethod
    def _text(path: Path) -> str:
        try:
            return path.read_text().strip()
        except PermissionError as error:
            raise PermissionDeniedError(
                f"cannot read {path}: RAPL energy is root-only since Linux 5.10; run the agent "
                "as root or grant it read access"
            ) from error
        except OSError as error:
            raise DeviceUnavailableError(f"cannot read {path}: {error}") from error

    def _optional_int(self, path: Path) -> int | None:
        return int(self._text(path)) if path.exists() else None

    def devices(self) -> Sequence[DeviceInfo]:
        return self._infos

    def read(self, uuid: str) -> DeviceReading:
        info = self.info(uuid)
        path = self._zones[uuid]
        raw_uj = int(self._text(path / "energy_uj"))
        now = self._clock()
        limit = self._optional_int(path / "constraint_0_power_limit_uw")
        with self._lock:
            counter = self._counters.get(uuid)
            if counter is None:
                counter = self._counters[uuid] = _Counter(raw_uj=raw_uj, at_s=now)
            elif now > counter.at_s:
                delta_uj = raw_uj - counter.raw_uj
                if delta_uj < 0:  # the counter wrapped past max_energy_range_uj
                    delta_uj += self._optional_int(path / "max_energy_range_uj") or 0
                if delta_uj >= 0:
                    counter.energy_j += delta_uj / 1e6
                    counter.power_w = delta_uj / 1e6 / (now - counter.at_s)
                else:  # no range to unwrap with: start a new interval rather than guess
                    counter.power_w = None
                counter.raw_uj, counter.at_s = raw_uj, now
            return DeviceReading(
                uuid=uuid,
                index=info.index,
                timestamp_s=now,
                power_w=counter.power_w,
                energy_j=counter.energy_j,
                power_limit_w=limit / 1e6 if limit else None,
            )
