"""NVML backend on a real GPU: live telemetry, the power limit set to its minimum and back, and
the power a decode-like and a prefill-like kernel draw under each limit.

What it shows, for the agent (tessera.agents.nvml_backend) and the simulated device's
calibration (agents/calibration/h100_power.json):
- the backend reads live telemetry (power, energy, limit, clocks, utilisation, memory,
  temperature, throttle reasons);
- `set_power_limit` to the minimum and back to the default, each read back twice (the value the
  call returns, which is NVML's enforced limit, and a fresh telemetry reading);
- per kernel and limit: time per call, achieved TFLOP/s or GB/s, and power. Average power comes
  from the energy counter over the whole measured loop (exact), and NVML's power samples every
  50 ms are given beside it (they lag; see ../shared/data/README.md);
- optionally the same with the SM clock locked (`--lock-sm-clock-mhz`, 0 to skip).

The default limit and clocks are restored at the end, also on error or SIGTERM.

Run on a GPU machine as root:  python bench/nvml_power_bench.py --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def import_backend() -> Any:
    """Import tessera.agents.nvml_backend, also where Tessera is not installed (a GPU box).

    Without an install, the source folders are mapped into `tessera.*` by a temporary tree of
    links built from pyproject.toml's package-dir (the repository root itself must never be on
    sys.path: its `operator/` folder would shadow the standard library).
    """
    try:
        from tessera.agents import nvml_backend
    except ImportError:
        config = tomllib.loads((ROOT / "pyproject.toml").read_text())
        package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
        tree = Path(tempfile.mkdtemp(prefix="tessera-links-"))
        package_root = tree / "tessera"
        package_root.mkdir()
        for source in (ROOT / package_dir["tessera"]).glob("*.py"):
            (package_root / source.name).symlink_to(source)
        for package, folder in package_dir.items():
            parts = package.split(".")[1:]
            if len(parts) == 1:
                (package_root / parts[0]).symlink_to(ROOT / folder)
        sys.path.insert(0, str(tree))
        from tessera.agents import nvml_backend
    return nvml_backend


class Sampler:
    """Reads the device through the backend every `period_s` while a kernel loop runs."""

    def __init__(self, backend: Any, uuid: str, period_s: float) -> None:
        self.backend, self.uuid, self.period_s = backend, uuid, period_s
        self.readings: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.readings.append(self.backend.read(self.uuid))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    backend: Any,
    uuid: str,
    fn: Callable[[], Any],
    seconds: float,
    warmup_s: float,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Run `fn` for `warmup_s` unmeasured, then for `seconds`; time, energy and power samples."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        sync()
    iterations = 0
    with Sampler(backend, uuid, 0.05) as sampler:
        start_reading = backend.read(uuid)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                fn()
            sync()
            iterations += 10
        elapsed_s = time.perf_counter() - start
        end_reading = backend.read(uuid)
    samples = sampler.readings[len(sampler.readings) // 10 :]
    powers = [r.power_w for r in samples if r.power_w is not None]
    clocks = [r.sm_clock_mhz for r in samples if r.sm_clock_mhz is not None]
    temps = [r.temperature_c for r in samples if r.temperature_c is not None]
    reasons = sorted({reason for r in samples for reason in r.throttle_reasons})
    result: dict[str, Any] = {
        "iterations": iterations,
        "seconds": elapsed_s,
        "ms_per_call": elapsed_s / iterations * 1e3,
        "nvml_power_samples": len(powers),
        "nvml_power_mean_w": statistics.fmean(powers) if powers else None,
        "nvml_power_max_w": max(powers) if powers else None,
        "sm_clock_mean_mhz": statistics.fmean(clocks) if clocks else None,
        "temperature_max_c": max(temps) if temps else None,
        "throttle_reasons": reasons,
    }
    if start_reading.energy_j is not None and end_reading.energy_j is not None:
        # Readings bracket the loop within a few ms; energy/time is the loop's mean power.
        span_s = end_reading.timestamp_s - start_reading.timestamp_s
        result["energy_j"] = end_reading.energy_j - start_reading.energy_j
        result["energy_power_mean_w"] = result["energy_j"] / span_s
        result["energy_per_call_j"] = result["energy_j"] / iterations
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-index", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--lock-sm-clock-mhz", type=int, default=990, help="0 to skip")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/nvml_power_bench.json")
    args = parser.parse_args()

    import torch

    nvml_backend = import_backend()
    backend = nvml_backend.NvmlBackend()
    info = backend.devices()[args.device_index]
    uuid = info.uuid
    out: dict[str, Any] = {"device": {k: getattr(info, k) for k in info.__dataclass_fields__}}
    out["device"]["kind"] = str(info.kind)
    out["torch"] = torch.__version__
    out["seconds_per_run"] = args.seconds

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(f"signal {signum}: restoring the default power limit and clocks")

    signal.signal(signal.SIGTERM, on_sigterm)
    log: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    idle = backend.read(uuid)
    out["idle_reading"] = {k: getattr(idle, k) for k in idle.__dataclass_fields__}
    say(f"device {info.index}: {info.model} {uuid}")
    say(
        f"  power limit range [{info.power_limit_min_w}, {info.power_limit_max_w}] W, default "
        f"{info.power_limit_default_w} W; SM clocks [{info.sm_clock_min_mhz}, "
        f"{info.sm_clock_max_mhz}] MHz; memory {info.memory_total_bytes} B"
    )
    say(
        f"  live: power {idle.power_w} W, energy {idle.energy_j} J, limit {idle.power_limit_w} W, "
        f"SM {idle.sm_clock_mhz} MHz, mem {idle.memory_clock_mhz} MHz, util "
        f"{idle.utilization_ratio}, mem used {idle.memory_used_bytes} B, temp "
        f"{idle.temperature_c} C, throttle {list(idle.throttle_reasons)}"
    )

    device = torch.device("cuda", args.device_index)
    a = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device=device, dtype=torch.bfloat16)
    w_big = torch.randn(16 * 4096, 4096, device=device, dtype=torch.bfloat16)
    x = torch.randn(4096, 8, device=device, dtype=torch.bfloat16)
    kernels: dict[str, tuple[Callable[[], Any], str, float]] = {
        "prefill_gemm": (lambda: torch.matmul(a, w), "TFLOPs", 2 * 8192 * 4096 * 14336 / 1e12),
        "decode_gemv": (lambda: torch.matmul(w_big, x), "GBps", w_big.numel() * 2 / 1e9),
    }
    out["kernels"] = {
        "prefill_gemm": "bf16 matmul 8192x4096 @ 4096x14336 (compute bound)",
        "decode_gemv": "bf16 matmul 65536x4096 @ 4096x8 (weight-read bound, 512 MiB)",
    }
    sync = torch.cuda.synchronize
    default_w = info.power_limit_default_w
    conditions: list[tuple[str, Callable[[], dict[str, Any]]]] = []

    def at_limit(limit_w: float) -> Callable[[], dict[str, Any]]:
        def apply() -> dict[str, Any]:
            started = time.perf_counter()
            in_force_w = backend.set_power_limit(uuid, limit_w)
            set_s = time.perf_counter() - started
            read_back_w = backend.read(uuid).power_limit_w
            say(
                f"set_power_limit({limit_w:g} W) -> in force {in_force_w:g} W; "
                f"read back {read_back_w:g} W ({set_s:.3f} s to take effect)"
            )
            return {
                "requested_w": limit_w,
                "in_force_w": in_force_w,
                "read_back_w": read_back_w,
                "set_seconds": set_s,
            }

        return apply

    conditions.append(("default_limit", at_limit(default_w)))
    conditions.append(("min_limit", at_limit(info.power_limit_min_w)))
    if args.lock_sm_clock_mhz:

        def locked() -> dict[str, Any]:
            restored = at_limit(default_w)()
            lock = backend.lock_sm_clocks(uuid, args.lock_sm_clock_mhz, args.lock_sm_clock_mhz)
            say(f"lock_sm_clocks({args.lock_sm_clock_mhz} MHz) -> {lock}")
            return {**restored, "sm_clock_lock_mhz": [lock.min_mhz, lock.max_mhz]}

        conditions.append((f"sm_clock_locked_{args.lock_sm_clock_mhz}mhz", locked))

    results: dict[str, Any] = {}
    try:
        for condition, apply in conditions:
            results[condition] = {"control": apply(), "kernels": {}}
            for name, (fn, unit, work) in kernels.items():
                r = measure(backend, uuid, fn, args.seconds, args.warmup_seconds, sync)
                r[unit] = work / (r["ms_per_call"] / 1e3)
                results[condition]["kernels"][name] = r
                say(
                    f"  {condition:>24} {name:>13}: {r['ms_per_call']:.4f} ms, "
                    f"{unit} {r[unit]:.0f}, "
                    f"energy-mean {r.get('energy_power_mean_w', float('nan')):.0f} W, NVML mean "
                    f"{r['nvml_power_mean_w']:.0f} W max {r['nvml_power_max_w']:.0f} W, SM "
                    f"{r['sm_clock_mean_mhz']:.0f} MHz, throttle {r['throttle_reasons']}"
                )
    finally:
        restore: dict[str, Any] = {}
        try:
            restore["clocks"] = str(backend.reset_sm_clocks(uuid))
        except Exception as error:  # report, then still restore the power limit
            restore["clocks_error"] = repr(error)
            print(f"reset_sm_clocks failed: {error!r}", file=sys.stderr)
        restore["power_limit_in_force_w"] = backend.reset_power_limit(uuid)
        restore["power_limit_read_back_w"] = backend.read(uuid).power_limit_w
        say(
            f"restored: power limit in force {restore['power_limit_in_force_w']:g} W (read back "
            f"{restore['power_limit_read_back_w']:g} W), clocks {restore.get('clocks')}"
        )
        out["restore"] = restore
        out["results"] = results
        backend.close()

    base = results["default_limit"]["kernels"]
    table = [
        "",
        f"{'condition':>28} {'kernel':>13} {'ms/call':>9} {'slowdown':>8} {'rate':>12} "
        f"{'P(energy) W':>11} {'P(NVML) W':>9} {'J/call':>8} {'SM MHz':>6}",
    ]
    for condition, entry in results.items():
        for name, r in entry["kernels"].items():
            unit = kernels[name][1]
            slowdown = r["ms_per_call"] / base[name]["ms_per_call"]
            r["slowdown_vs_default"] = slowdown
            table.append(
                f"{condition:>28} {name:>13} {r['ms_per_call']:9.4f} {slowdown:8.2f} "
                f"{r[unit]:8.0f} {unit:<4}{r.get('energy_power_mean_w', float('nan')):11.0f} "
                f"{r['nvml_power_mean_w']:9.0f} {r.get('energy_per_call_j', float('nan')):8.3f} "
                f"{r['sm_clock_mean_mhz']:6.0f}"
            )
    for line in table:
        say(line)
    out["log"] = log
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
