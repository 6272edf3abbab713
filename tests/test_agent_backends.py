"""Device backends of the node agent: simulated, NVML (error mapping), powercap, npu-smi."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nvml_fake import FakeNvml
from tessera.agents.backend import (
    THROTTLE_REASONS,
    DeviceNotFoundError,
    DeviceUnavailableError,
    NotSupportedError,
    OutOfRangeError,
    PermissionDeniedError,
)
from tessera.agents.npu_backend import NpuSmiBackend, NpuSmiParseError, parse_npu_smi_info
from tessera.agents.nvml_backend import NvmlBackend, map_nvml_error, throttle_reason_names
from tessera.agents.powercap_backend import PowercapBackend
from tessera.agents.sim_backend import SimBackend, SimCalibration


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def calibration_file() -> dict:
    text = (resources.files("tessera.agents") / "calibration" / "h100_power.json").read_text()
    return json.loads(text)


# -- simulated device --------------------------------------------------------------------------


def test_sim_is_deterministic() -> None:
    def run() -> list:
        clock = FakeClock()
        backend = SimBackend(device_count=2, node_name="n", clock=clock)
        readings = []
        for step, limit_w in enumerate([700, 450, 200, 600]):
            for device in backend.devices():
                backend.set_power_limit(device.uuid, limit_w)
                clock.now += 0.5 + step
                readings.append(backend.read(device.uuid))
        return readings

    assert run() == run()


def test_sim_reproduces_the_measured_points() -> None:
    """At the minimum limit and at the locked clock the simulated device runs exactly at the
    calibration's measured slowdown and power; uncapped it runs at the uncapped point."""
    data = calibration_file()
    backend = SimBackend(device_count=2, workloads=[("decode", 1.0), ("prefill", 1.0)])
    for device, workload in zip(backend.devices(), ["decode", "prefill"], strict=True):
        entry = data["workloads"][workload]
        point = backend.operating_point(device.uuid)
        assert point.slowdown == 1.0
        assert point.power_w == pytest.approx(entry["uncapped"]["power_w"])
        assert not point.power_capped

        measured = entry["power_limit_points"][0]
        backend.set_power_limit(device.uuid, measured["power_limit_w"])
        point = backend.operating_point(device.uuid)
        # Within 1.5%: where the GPU drew slightly less than its limit (198.5 W under 200 W), the
        # model draws the limit itself, at a clock 1% above the measured one.
        assert point.slowdown == pytest.approx(measured["slowdown"], rel=0.015)
        assert point.power_w == pytest.approx(max(measured["power_w"], measured["power_limit_w"]))
        assert point.power_capped

        backend.set_power_limit(device.uuid, data["device"]["power_limit_default_w"])
        locked = entry["sm_clock_points"][0]
        clocks = backend.lock_sm_clocks(device.uuid, locked["sm_clock_mhz"], locked["sm_clock_mhz"])
        assert clocks.locked and clocks.current_sm_clock_mhz == locked["sm_clock_mhz"]
        point = backend.operating_point(device.uuid)
        assert point.slowdown == pytest.approx(locked["slowdown"])
        assert point.power_w == pytest.approx(locked["power_w"])


def test_sim_compute_bound_time_goes_as_one_over_the_clock_between_the_measured_points() -> None:
    """The measured prefill slowdowns are the uncapped clock over the clock (1.36x at 990 MHz,
    3.76x at 352, from 1337 MHz: 1.35 and 3.80); between the points speed is interpolated
    linearly in the clock, so the model stays on that law (interpolating the slowdown itself
    gave 2.09x at 797 MHz, where the law says 1.68)."""
    backend = SimBackend(device_count=1, workloads=[("prefill", 1.0)])
    curve = backend.calibration.workloads["prefill"]
    top = curve.uncapped.sm_clock_mhz
    for point in curve.points:
        assert point.slowdown == pytest.approx(top / point.sm_clock_mhz, rel=0.02)
    for clock in (400.0, 600.0, 797.0, 1100.0, 1300.0):
        assert curve.at_clock(clock).slowdown == pytest.approx(top / clock, rel=0.03)


@settings(max_examples=60, deadline=None)
@given(
    workload=st.sampled_from(["prefill", "decode"]),
    low_w=st.floats(200, 700),
    high_w=st.floats(200, 700),
)
def test_sim_a_tighter_limit_never_speeds_up_or_draws_more(
    workload: str, low_w: float, high_w: float
) -> None:
    low_w, high_w = min(low_w, high_w), max(low_w, high_w)
    backend = SimBackend(device_count=1, workloads=[(workload, 1.0)])
    uuid = backend.devices()[0].uuid
    backend.set_power_limit(uuid, high_w)
    loose = backend.operating_point(uuid)
    backend.set_power_limit(uuid, low_w)
    tight = backend.operating_point(uuid)
    assert tight.slowdown >= loose.slowdown - 1e-9
    assert tight.power_w <= loose.power_w + 1e-9
    # The limit is honoured down to the floor the real GPU showed at its minimum limit.
    floor_w = calibration_file()["workloads"][workload]["power_limit_points"][0]["power_w"]
    assert tight.power_w <= max(low_w, floor_w) + 1e-9


def test_sim_energy_is_the_integral_of_power() -> None:
    clock = FakeClock()
    backend = SimBackend(device_count=1, clock=clock, workloads=[("prefill", 1.0)])
    uuid = backend.devices()[0].uuid
    start = backend.read(uuid)
    clock.now += 2.0
    uncapped = backend.read(uuid)
    backend.set_power_limit(uuid, 300)
    clock.now += 3.0
    capped = backend.read(uuid)
    backend.set_workload(uuid, "idle")
    clock.now += 4.0
    idle = backend.read(uuid)
    assert start.energy_j == 0.0
    assert uncapped.energy_j == pytest.approx(2.0 * uncapped.power_w)
    assert capped.energy_j - uncapped.energy_j == pytest.approx(3.0 * capped.power_w)
    assert idle.energy_j - capped.energy_j == pytest.approx(4.0 * idle.power_w)
    assert idle.power_w == pytest.approx(calibration_file()["device"]["idle_power_w"])
    assert capped.throttle_reasons == ("sw_power_cap",) and idle.throttle_reasons == ()


@pytest.mark.parametrize("limit_w", [199.0, 700.5, -1.0, math.nan, math.inf])
def test_sim_refuses_power_limits_out_of_range_and_changes_nothing(limit_w: float) -> None:
    backend = SimBackend(device_count=1)
    uuid = backend.devices()[0].uuid
    before = backend.read(uuid).power_limit_w
    with pytest.raises(OutOfRangeError, match="outside the allowed range"):
        backend.set_power_limit(uuid, limit_w)
    assert backend.read(uuid).power_limit_w == before


@pytest.mark.parametrize(("low", "high"), [(100, 990), (990, 2500), (1500, 990)])
def test_sim_refuses_clock_locks_out_of_range(low: int, high: int) -> None:
    backend = SimBackend(device_count=1)
    with pytest.raises(OutOfRangeError):
        backend.lock_sm_clocks(backend.devices()[0].uuid, low, high)


def test_unknown_device_is_named() -> None:
    backend = SimBackend(device_count=1, node_name="n1")
    with pytest.raises(DeviceNotFoundError, match="SIM-n1-0"):
        backend.read("GPU-nope")


def test_sim_calibration_rejects_non_monotonic_curves(tmp_path: Path) -> None:
    data = calibration_file()
    data["workloads"]["decode"]["sm_clock_points"][0]["power_w"] = 900.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="decode"):
        SimCalibration.load(path)


# -- NVML ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_type", "hint"),
    [
        (pynvml.NVML_ERROR_NO_PERMISSION, PermissionDeniedError, "root"),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupportedError, "does not offer"),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, OutOfRangeError, "refused the value"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, DeviceUnavailableError, "fell off the bus"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, DeviceUnavailableError, "driver is not loaded"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, DeviceUnavailableError, "container runtime"),
        (pynvml.NVML_ERROR_NOT_FOUND, DeviceNotFoundError, "rediscover"),
        (pynvml.NVML_ERROR_TIMEOUT, DeviceUnavailableError, "try again"),
    ],
)
def test_nvml_errors_map_to_typed_errors_with_a_hint(
    code: int, error_type: type, hint: str
) -> None:
    error = map_nvml_error(
        pynvml, pynvml.NVMLError(code), "nvmlDeviceSetPowerManagementLimit", "GPU-x"
    )
    assert type(error) is error_type
    assert "nvmlDeviceSetPowerManagementLimit" in str(error) and "GPU-x" in str(error)
    assert hint in str(error)


def test_nvml_backend_reads_and_converts_units() -> None:
    fake = FakeNvml()
    backend = NvmlBackend(nvml=fake)
    info = backend.devices()[0]
    assert (info.power_limit_min_w, info.power_limit_max_w) == (200.0, 700.0)
    assert (info.sm_clock_min_mhz, info.sm_clock_max_mhz) == (345, 1980)
    reading = backend.read(info.uuid)
    assert reading.power_w == pytest.approx(fake.nvmlDeviceGetPowerUsage("h") / 1000)
    assert reading.power_limit_w == 700.0
    assert reading.utilization_ratio == pytest.approx(0.37)
    assert reading.throttle_reasons == ("sw_power_cap",)  # GPU idle is not a throttle


def test_nvml_field_not_supported_is_not_measured_but_other_errors_raise() -> None:
    fake = FakeNvml()
    backend = NvmlBackend(nvml=fake)
    uuid = backend.devices()[0].uuid
    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    assert backend.read(uuid).energy_j is None
    fake.fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(DeviceUnavailableError, match="nvmlDeviceGetPowerUsage"):
        backend.read(uuid)


def test_nvml_set_power_limit_waits_for_the_enforced_limit() -> None:
    """On the H100 the enforced limit read right after a set still showed the old value
    (bench/results); the backend must return the limit actually in force."""
    fake = FakeNvml()
    fake.enforce_lag_reads = 3
    backend = NvmlBackend(nvml=fake, settle_poll_s=0.001)
    uuid = backend.devices()[0].uuid
    assert backend.set_power_limit(uuid, 312.5) == 312.5
    assert fake.limit_mw == 312_500


def test_nvml_out_of_range_never_reaches_the_driver() -> None:
    fake = FakeNvml()
    backend = NvmlBackend(nvml=fake)
    with pytest.raises(OutOfRangeError):
        backend.set_power_limit(backend.devices()[0].uuid, 150)
    assert "nvmlDeviceSetPowerManagementLimit" not in fake.calls


def test_nvml_without_privilege_is_permission_denied() -> None:
    backend = NvmlBackend(nvml=FakeNvml(privileged=False))
    uuid = backend.devices()[0].uuid
    with pytest.raises(PermissionDeniedError, match="CAP_SYS_ADMIN"):
        backend.set_power_limit(uuid, 400)
    with pytest.raises(PermissionDeniedError):
        backend.lock_sm_clocks(uuid, 990, 990)


def test_nvml_clock_lock_is_reported_in_readings() -> None:
    backend = NvmlBackend(nvml=FakeNvml())
    uuid = backend.devices()[0].uuid
    assert backend.lock_sm_clocks(uuid, 990, 990).locked
    reading = backend.read(uuid)
    assert (reading.locked_sm_clock_min_mhz, reading.locked_sm_clock_max_mhz) == (990, 990)
    assert not backend.reset_sm_clocks(uuid).locked
    assert backend.read(uuid).locked_sm_clock_max_mhz is None


def test_throttle_bits_name_every_reason_once() -> None:
    assert throttle_reason_names(0xFFFF) == THROTTLE_REASONS
    assert throttle_reason_names(0x1) == ()


def test_nvml_missing_library_is_unavailable_with_a_hint() -> None:
    fake = FakeNvml()
    fake.fail["nvmlInit"] = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    with pytest.raises(DeviceUnavailableError, match="libnvidia-ml"):
        NvmlBackend(nvml=fake)


# -- powercap ----------------------------------------------------------------------------------


def _zone(root: Path, name: str, label: str, energy_uj: int, **files: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    for file, value in files.items():
        (zone / file).write_text(f"{value}\n")
    return zone


def test_powercap_power_from_energy_deltas_with_wraparound(tmp_path: Path) -> None:
    """A sysfs tree laid out as the kernel's (Documentation/power/powercap/powercap.rst)."""
    package = _zone(
        tmp_path,
        "intel-rapl:0",
        "package-0",
        energy_uj=262_143_000_000,
        max_energy_range_uj=262_143_328_850,
        constraint_0_power_limit_uw=165_000_000,
        constraint_0_max_power_uw=250_000_000,
    )
    _zone(tmp_path, "intel-rapl:0:0", "core", energy_uj=5)  # a sub-zone: not a device
    clock = FakeClock()
    backend = PowercapBackend(root=tmp_path, clock=clock)
    [info] = backend.devices()
    assert (info.uuid, info.model, info.vendor) == ("cpu-intel-rapl:0", "package-0", "intel")
    assert info.power_limit_max_w == 250.0 and not info.power_limit_settable

    first = backend.read(info.uuid)
    assert first.power_w is None and first.energy_j == 0.0 and first.power_limit_w == 165.0
    # 2 s later the counter has wrapped: 328_850 uJ to the top, then 99_671_150 uJ from zero.
    (package / "energy_uj").write_text("99671150\n")
    clock.now += 2.0
    second = backend.read(info.uuid)
    assert second.energy_j == pytest.approx(100.0)
    assert second.power_w == pytest.approx(50.0)
    with pytest.raises(NotSupportedError):
        backend.set_power_limit(info.uuid, 100)


def test_powercap_absent_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="RAPL"):
        PowercapBackend(root=tmp_path / "missing")
    with pytest.raises(DeviceUnavailableError, match="no RAPL package"):
        PowercapBackend(root=tmp_path)


# -- npu-smi -----------------------------------------------------------------------------------

# Captured `npu-smi info` output, verbatim from public bug reports (trimmed where noted).
# 8x Ascend 910B3, npu-smi 23.0.7: github.com/vllm-project/vllm-ascend/issues/198 (NPUs 0-1 and
# the start of the process table kept).
NPU_SMI_910B3 = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.7                   Version: 23.0.7                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 102.8       55                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3338 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 97.6        54                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3337 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
"""

# Atlas A3 (two chips per NPU, the second reports no power), npu-smi 26.0.rc2:
# github.com/vllm-project/vllm-ascend/issues/12980 (NPU 0 kept).
NPU_SMI_A3 = """\
+------------------------------------------------------------------------------------------------------------------+
| npu-smi 26.0.rc2                            Version: 26.0.rc2                                                    |
+---------------------------+---------------+----------------------------------------------------------------------+
| NPU   Name                | Health        | Power(W)             Temp(C)                 Hugepages-Usage(page)   |
| Chip  Phy-ID              | Bus-Id        | AICore(%)            Memory-Usage(MB)        HBM-Usage(MB)           |
+===========================+===============+======================================================================+
| 0     Ascend910           | OK            | 162.6                34                      0    / 0                |
| 0     0                   | 0000:9D:00.0  | 0                    0    / 0                3419 / 65536            |
+------------------------------------------------------------------------------------------------------------------+
| 0     Ascend910           | OK            | -                    34                      0    / 0                |
| 1     1                   | 0000:9F:00.0  | 0                    0    / 0                2874 / 65536            |
+===========================+===============+======================================================================+
"""  # noqa: E501

# Ascend 310B4 (DDR, no HBM column), npu-smi 23.0.rc3: a public GitHub README (Orange Pi AIpro).
NPU_SMI_310B4 = """\
+----------------------------------------------------------------------------------------+
| npu-smi 23.0.rc3                                 Version: 23.0.rc3                     |
+--------------------+------------+------------------------------------------------------+
| NPU     Name       | Health     | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device     | Bus-Id     | AICore(%)    Memory-Usage(MB)                        |
+====================+============+======================================================+
| 0       310B4      | OK         | 7.7          54                15    / 15            |
| 0       0          | NA         | 0            2166 / 3513                             |
+====================+============+======================================================+
"""


def test_npu_smi_910b3() -> None:
    chips = parse_npu_smi_info(NPU_SMI_910B3)
    assert [(c.npu_id, c.chip_id, c.name) for c in chips] == [(0, 0, "910B3"), (1, 0, "910B3")]
    first = chips[0]
    assert (first.power_w, first.temperature_c, first.aicore_ratio) == (102.8, 55.0, 0.0)
    assert (first.hbm_used_mib, first.hbm_total_mib, first.bus_id) == (3338, 65536, "0000:C1:00.0")


def test_npu_smi_a3_second_chip_has_no_power() -> None:
    chips = parse_npu_smi_info(NPU_SMI_A3)
    assert [(c.npu_id, c.chip_id) for c in chips] == [(0, 0), (0, 1)]
    assert chips[0].power_w == 162.6 and chips[1].power_w is None
    assert chips[1].hbm_used_mib == 2874


def test_npu_backend_reads_hbm_or_ddr_and_reports_no_invented_fields() -> None:
    backend = NpuSmiBackend(run=lambda: NPU_SMI_A3)
    readings = [backend.read(d.uuid) for d in backend.devices()]
    assert [r.power_w for r in readings] == [162.6, None]
    assert readings[0].memory_used_bytes == 3419 * 2**20
    assert readings[0].energy_j is None and readings[0].sm_clock_mhz is None
    ddr = NpuSmiBackend(run=lambda: NPU_SMI_310B4)
    [info] = ddr.devices()
    assert info.model == "Ascend 310B4" and info.memory_total_bytes == 3513 * 2**20
    with pytest.raises(NotSupportedError):
        ddr.set_power_limit(info.uuid, 5)


def test_npu_smi_output_cut_short_is_an_error_not_a_guess() -> None:
    cut = "\n".join(NPU_SMI_910B3.splitlines()[:7])
    with pytest.raises(NpuSmiParseError, match="NPU 0"):
        parse_npu_smi_info(cut)


def test_npu_smi_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceUnavailableError, match="npu-smi not found"):
        NpuSmiBackend()
