"""Huawei Ascend NPUs, read from the vendor tool's `npu-smi info` table.

Ascend nodes have no Python binding as stable as NVML, but every node with the driver has
`npu-smi`; its `info` table gives, per chip, power, temperature, AI Core utilisation and memory
(HBM on 910-class chips). The parser follows the table's cells, not fixed columns, since column
widths differ between npu-smi versions (23.0 to 26.0 were checked against captured output in
tests/test_agent_backends.py). A cell npu-smi prints as "-" or "NA" (the second chip of an
Atlas A3 NPU reports no power of its own) is reported as not measured.

Read-only: power capping through npu-smi is not wired to Control; requests answer
FAILED_PRECONDITION.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tessera.agents.backend import (
    BackendError,
    DeviceBackend,
    DeviceInfo,
    DeviceKind,
    DeviceReading,
    DeviceUnavailableError,
)

MIB = 2**20
_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_FIRST_ROW = re.compile(r"^(\d+)\s+(\S*[A-Za-z]\S*)$")  # "0     910B3": NPU id and name
_SECOND_ROW = re.compile(r"^(\d+)(?:\s+(\d+))?$")  # "0" or "0     1": chip (and device/phy id)


class NpuSmiParseError(BackendError):
    """The npu-smi output has a shape this parser does not know; nothing is guessed."""


@dataclass(frozen=True)
class NpuChip:
    """One chip's row pair of `npu-smi info`; None where npu-smi printed "-" or "NA"."""

    npu_id: int
    chip_id: int
    name: str
    health: str
    bus_id: str | None
    power_w: float | None
    temperature_c: float | None
    aicore_ratio: float | None
    memory_used_mib: int | None
    memory_total_mib: int | None
    hbm_used_mib: int | None
    hbm_total_mib: int | None

    @property
    def uuid(self) -> str:
        return f"ascend-{self.npu_id}-{self.chip_id}"


def _number(token: str) -> float | None:
    return None if token in {"-", "NA", "N/A", ""} else float(token)


def parse_npu_smi_info(text: str) -> list[NpuChip]:
    """The chips in an `npu-smi info` table, in table order.

    Each chip is two table rows: (NPU id + name | health | power, temp, hugepages) then
    (chip [+ device/phy id] | bus id | AI Core %, memory used/total [, HBM used/total]).
    Parsing stops at the process table that follows.
    """
    chips: list[NpuChip] = []
    pending: tuple[int, str, str, float | None, float | None] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if any("Process id" in cell for cell in cells):
            break
        if len(cells) < 3:
            continue
        first = _FIRST_ROW.match(cells[0])
        if first and pending is None and cells[1] and not cells[1].startswith("Bus"):
            tokens = cells[2].split()
            if len(tokens) < 2:
                raise NpuSmiParseError(f"npu-smi row without power and temperature: {line!r}")
            pending = (
                int(first.group(1)),
                first.group(2),
                cells[1],
                _number(tokens[0]),
                _number(tokens[1]),
            )
            continue
        second = _SECOND_ROW.match(cells[0])
        if pending is not None and second:
            npu_id, name, health, power_w, temperature_c = pending
            pending = None
            tokens = cells[2].split()
            pairs = [(int(a), int(b)) for a, b in _PAIR.findall(cells[2])]
            if not tokens or not pairs:
                raise NpuSmiParseError(f"npu-smi row without AI Core and memory: {line!r}")
            aicore = _number(tokens[0])
            hbm = pairs[1] if len(pairs) > 1 else (None, None)
            chips.append(
                NpuChip(
                    npu_id=npu_id,
                    chip_id=int(second.group(1)),
                    name=name,
                    health=health,
                    bus_id=None if cells[1] in {"NA", "-", ""} else cells[1],
                    power_w=power_w,
                    temperature_c=temperature_c,
                    aicore_ratio=aicore / 100.0 if aicore is not None else None,
                    memory_used_mib=pairs[0][0],
                    memory_total_mib=pairs[0][1],
                    hbm_used_mib=hbm[0],
                    hbm_total_mib=hbm[1],
                )
            )
    if pending is not None:
        raise NpuSmiParseError(f"npu-smi table ends inside the rows of NPU {pending[0]}")
    return chips


def _device_memory_mib(chip: NpuChip) -> tuple[int | None, int | None]:
    """HBM where the chip has it (910-class), else the DDR pool npu-smi calls Memory-Usage."""
    if chip.hbm_total_mib:
        return chip.hbm_used_mib, chip.hbm_total_mib
    if chip.memory_total_mib:
        return chip.memory_used_mib, chip.memory_total_mib
    return None, None


def run_npu_smi() -> str:
    """`npu-smi info`'s output; DeviceUnavailableError if the tool is missing or fails."""
    tool = shutil.which("npu-smi")
    if tool is None:
        raise DeviceUnavailableError(
            "npu-smi not found on PATH: mount the Ascend driver's npu-smi into the agent"
        )
    try:
        done = subprocess.run(
            [tool, "info"], capture_output=True, text=True, timeout=10, check=True
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise DeviceUnavailableError(f"npu-smi info failed: {error}") from error
    return done.stdout


class NpuSmiBackend(DeviceBackend):
    """Every chip `npu-smi info` lists. One run of the tool serves all chips of a sampling
    round: its output is reused for `max_age_s`."""

    name = "npu-smi"

    def __init__(
        self,
        run: Callable[[], str] = run_npu_smi,
        clock: Callable[[], float] = time.time,
        max_age_s: float = 0.5,
    ) -> None:
        self._run, self._clock, self._max_age_s = run, clock, max_age_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, NpuChip]] | None = None
        chips = self._chips()
        if not chips:
            raise DeviceUnavailableError("npu-smi info lists no NPU")
        self._infos = tuple(
            DeviceInfo(
                uuid=chip.uuid,
                index=index,
                kind=DeviceKind.NPU,
                vendor="huawei",
                model=f"Ascend {chip.name}",
                backend=self.name,
                memory_total_bytes=(
                    total * MIB if (total := _device_memory_mib(chip)[1]) is not None else None
                ),
            )
            for index, chip in enumerate(chips.values())
        )

    def _chips(self) -> dict[str, NpuChip]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] > self._max_age_s:
                self._cached = (now, {c.uuid: c for c in parse_npu_smi_info(self._run())})
            return self._cached[1]

    def devices(self) -> Sequence[DeviceInfo]:
        return self._infos

    def read(self, uuid: str) -> DeviceReading:
        info = self.info(uuid)
        chip = self._chips().get(uuid)
        if chip is None:
            raise DeviceUnavailableError(f"npu-smi info no longer lists {uuid}")
        used, total = _device_memory_mib(chip)
        return DeviceReading(
            uuid=uuid,
            index=info.index,
            timestamp_s=self._clock(),
            power_w=chip.power_w,
            utilization_ratio=chip.aicore_ratio,
            memory_used_bytes=used * MIB if used is not None else None,
            memory_total_bytes=total * MIB if total is not None else None,
            temperature_c=chip.temperature_c,
        )
