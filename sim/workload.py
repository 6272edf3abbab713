"""Workloads: request arrivals with prompt and output lengths, from a trace or a generator.

Traces are the Azure LLM inference traces (CSV: TIMESTAMP, ContextTokens, GeneratedTokens).
Synthetic workloads draw arrivals (Poisson, or gamma for burstier traffic) and lengths from a
deployment's TrafficSpec with a seeded numpy Generator, so a run is reproducible from its seed.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from tessera.api.model_deployment import LengthDistribution, TrafficSpec

BUNDLED_TRACES: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv_10min.csv",
    "azure-code": "azure_llm_2023_code_10min.csv",
}
"""Trace windows shipped as package data (sim/data), by the name `--trace` accepts."""

RateMode = Literal["compress", "superpose"]

MAX_TOKENS = 2**31 - 1
"""Most tokens one prompt or output may have in a trace (far above any model's context)."""


class TraceFormatError(ValueError):
    """A trace file lacks the expected columns or holds values that are not numbers."""


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival; times in seconds from the start of the window."""

    arrival_s: NDArray[np.float64]
    prompt_tokens: NDArray[np.int64]
    output_tokens: NDArray[np.int64]
    duration_s: float
    """Length of the window the arrivals were drawn from (the rate is len / duration)."""
    name: str = "workload"

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have equal lengths")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrival_s must be sorted")
        if not math.isfinite(self.duration_s) or (n and not np.isfinite(self.arrival_s).all()):
            raise ValueError("arrival_s and duration_s must be finite")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("every request needs at least 1 prompt and 1 output token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def rate_per_s(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def window(self, start_s: float, end_s: float | None = None) -> Workload:
        """The requests arriving in [start_s, end_s), re-based to start at 0."""
        end = self.duration_s if end_s is None else min(end_s, self.duration_s)
        if start_s >= self.duration_s:
            raise ValueError(
                f"window starts at {start_s:g} s, after {self.name} ends ({self.duration_s:.1f} s)"
            )
        if start_s < 0 or end <= start_s:
            raise ValueError(f"window [{start_s}, {end_s}) is empty or negative")
        keep = (self.arrival_s >= start_s) & (self.arrival_s < end)
        return Workload(
            self.arrival_s[keep] - start_s,
            self.prompt_tokens[keep],
            self.output_tokens[keep],
            end - start_s,
            f"{self.name}[{start_s:g}s:{end:g}s]",
        )

    def scaled(
        self, scale: float, mode: RateMode = "compress", rng: np.random.Generator | None = None
    ) -> Workload:
        """The same traffic at `scale` times the rate.

        `compress` divides every timestamp by the scale (the same requests, sooner: bursts keep
        their shape, the run gets shorter). `superpose` keeps the window and overlays
        floor(scale) copies, each shifted circularly by a random offset, plus a thinned copy for
        the fraction: the way many independent users add up, for loading large clusters.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"rate scale must be finite and > 0, got {scale}")
        if mode == "compress":
            return Workload(
                self.arrival_s / scale,
                self.prompt_tokens,
                self.output_tokens,
                self.duration_s / scale,
                f"{self.name}x{scale:g}",
            )
        if rng is None:
            raise ValueError("superpose rate scaling needs a seeded numpy Generator (rng)")
        times: list[NDArray[np.float64]] = []
        prompts: list[NDArray[np.int64]] = []
        outputs: list[NDArray[np.int64]] = []
        for copy in range(math.ceil(scale)):
            keep = np.ones(len(self), dtype=bool)
            if copy + 1 > scale:
                keep = rng.random(len(self)) < scale - copy
            offset = 0.0 if copy == 0 else float(rng.uniform(0.0, self.duration_s))
            times.append(np.mod(self.arrival_s[keep] + offset, self.duration_s))
            prompts.append(self.prompt_tokens[keep])
            outputs.append(self.output_tokens[keep])
        arrival = np.concatenate(times)
        order = np.argsort(arrival, kind="stable")
        return Workload(
            arrival[order],
            np.concatenate(prompts)[order],
            np.concatenate(outputs)[order],
            self.duration_s,
            f"{self.name}x{scale:g}",
        )

    def split(self, weights: Sequence[float], rng: np.random.Generator) -> list[Workload]:
        """Each request assigned to one of len(weights) streams with probability ~ weight."""
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"split weights must be >= 0 with a positive sum, got {weights}")
        if len(weights) == 1:
            return [self]
        owner = rng.choice(len(weights), size=len(self), p=np.asarray(weights) / total)
        return [
            Workload(
                self.arrival_s[owner == i],
                self.prompt_tokens[owner == i],
                self.output_tokens[owner == i],
                self.duration_s,
                f"{self.name}/{i}",
            )
            for i in range(len(weights))
        ]


TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_trace(path: Path | str, name: str | None = None) -> Workload:
    """A trace in the Azure LLM inference format; arrivals re-based to the first request.

    Every row must hold a timestamp and token counts of at least 1: a request with no prompt
    or no output has no latency to measure and would count as meeting its SLO. The Azure
    traces hold none (the bundled windows and the hour-long files were checked), so such a row
    means a malformed file and is an error naming its line and column, not a row dropped.
    """
    path = Path(path)
    stamps: list[str] = []
    lines: list[int] = []
    counts: list[tuple[int, int]] = []
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header[:3]) != TRACE_COLUMNS:
                raise TraceFormatError(
                    f"{path}: expected columns {','.join(TRACE_COLUMNS)}, got {header}"
                )
            for row in reader:
                if row:
                    stamps.append(_trace_cell(path, reader.line_num, row, 0))
                    lines.append(reader.line_num)
                    counts.append(
                        (
                            _token_count(path, reader.line_num, row, 1),
                            _token_count(path, reader.line_num, row, 2),
                        )
                    )
    except (UnicodeDecodeError, csv.Error) as error:
        raise TraceFormatError(f"{path}: not a CSV text file: {error}") from error
    if not stamps:
        raise TraceFormatError(f"{path}: no requests")
    try:
        times = np.array(stamps, dtype="datetime64[ns]")
    except ValueError:
        times = np.array(
            [_timestamp(path, line, text) for line, text in zip(lines, stamps, strict=True)]
        )
    bad = np.flatnonzero(np.isnat(times))
    if len(bad):
        raise TraceFormatError(
            f"{path}: line {lines[bad[0]]}, column TIMESTAMP: expected a time, got "
            f"{stamps[bad[0]]!r}"
        )
    seconds = (times - times.min()).astype(np.int64) / 1e9
    if not seconds.max() > 0:
        raise TraceFormatError(
            f"{path}: every request arrives at the same time, so the trace spans no time and "
            "has no rate; a trace needs at least two distinct timestamps"
        )
    order = np.argsort(seconds, kind="stable")
    arrival = seconds[order]
    tokens = np.array(counts, dtype=np.int64)
    # The window ends one mean gap after the last arrival, so that rate = count / duration.
    duration = float(arrival[-1]) * len(arrival) / max(1, len(arrival) - 1)
    return Workload(arrival, tokens[order, 0], tokens[order, 1], duration, name or path.stem)


def _trace_cell(path: Path, line: int, row: list[str], column: int) -> str:
    if column >= len(row):
        raise TraceFormatError(f"{path}: line {line}: no {TRACE_COLUMNS[column]} column")
    return row[column].strip()


def _timestamp(path: Path, line: int, text: str) -> np.datetime64:
    try:
        return np.datetime64(text, "ns")
    except ValueError:
        raise TraceFormatError(
            f"{path}: line {line}, column TIMESTAMP: expected a time, got {text!r}"
        ) from None


def _token_count(path: Path, line: int, row: list[str], column: int) -> int:
    """A token count of at least 1 (and one int64 holds), else an error naming line and column."""
    text = _trace_cell(path, line, row, column)
    where = f"{path}: line {line}, column {TRACE_COLUMNS[column]}"
    try:
        count = int(text)
    except ValueError:
        raise TraceFormatError(
            f"{where}: expected a whole number of tokens, got {text!r}"
        ) from None
    if not 1 <= count <= MAX_TOKENS:
        raise TraceFormatError(f"{where}: token count must be in [1, {MAX_TOKENS}], got {count}")
    return count


def bundled_trace_path(name: str) -> Path:
    """Path of a trace window shipped with tessera.sim."""
    if name not in BUNDLED_TRACES:
        raise KeyError(f"no bundled trace {name!r}; bundled: {', '.join(sorted(BUNDLED_TRACES))}")
    return Path(str(resources.files("tessera.sim").joinpath("data", BUNDLED_TRACES[name])))


def resolve_trace(name_or_path: str) -> Workload:
    """A bundled trace by name, else a CSV file by path."""
    if name_or_path in BUNDLED_TRACES:
        return load_trace(bundled_trace_path(name_or_path), name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {name_or_path!r} is neither a file nor a bundled trace "
            f"({', '.join(sorted(BUNDLED_TRACES))})"
        )
    return load_trace(path)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*$")


def parse_duration_s(text: str) -> float:
    """'90', '90s', '10m' or '1h' as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 90, 90s, 10m or 1h, got {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    seconds = value * {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too long to be a number of seconds")
    return seconds


def parse_window(text: str) -> tuple[float, float]:
    """'END' (from 0) or 'START:END' as seconds, each part a duration ('5m:15m')."""
    start_text, _, end_text = text.rpartition(":")
    start = parse_duration_s(start_text) if start_text else 0.0
    end = parse_duration_s(end_text)
    if end <= start:
        raise ValueError(f"window {text!r} ends before it starts")
    return start, end


def sample_lengths(
    distribution: LengthDistribution, count: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Token lengths drawn from a LengthDistribution, at least 1, clipped to its max."""
    mean, stddev = distribution.mean, distribution.stddev
    if distribution.distribution == "fixed" or stddev == 0:
        values = np.full(count, mean)
    elif distribution.distribution == "normal":
        values = rng.normal(mean, stddev, count)
    elif distribution.distribution == "lognormal":
        sigma2 = math.log1p((stddev / mean) ** 2)
        values = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), count)
    else:
        values = rng.exponential(mean, count)
    upper = distribution.max if distribution.max is not None else np.inf
    return np.clip(np.rint(values), 1, upper).astype(np.int64)


MIN_CV = 0.01
"""Least burstiness CV of gamma arrivals: nearly even gaps (shape 10^4); CV 0 has no gamma."""
MAX_CV = 100.0
"""Most burstiness CV: production traces sit near 1-4; beyond 100 the gaps are mostly zero."""


def synthetic_workload(
    traffic: TrafficSpec,
    duration_s: float,
    rng: np.random.Generator,
    arrival: Literal["poisson", "gamma"] = "poisson",
    burstiness_cv: float = 1.0,
    rate_per_s: float | None = None,
) -> Workload:
    """Arrivals at the traffic's rate (or `rate_per_s`) for `duration_s`, lengths from it.

    Gamma inter-arrival times with coefficient of variation `burstiness_cv` (1 is Poisson,
    larger is burstier, as production traces are).
    """
    rate = rate_per_s if rate_per_s is not None else traffic.request_rate_per_second
    if not all(math.isfinite(v) and v > 0 for v in (rate, duration_s)):
        raise ValueError(f"rate ({rate}) and duration ({duration_s}) must be finite and > 0")
    if not MIN_CV <= burstiness_cv <= MAX_CV:
        raise ValueError(f"burstiness CV must be in [{MIN_CV}, {MAX_CV}], got {burstiness_cv}")
    expected = rate * duration_s
    draws = int(expected + 6 * math.sqrt(expected) * max(1.0, burstiness_cv) + 16)
    shape = 1.0 / burstiness_cv**2

    def gaps() -> NDArray[np.float64]:
        if arrival == "poisson":
            return rng.exponential(1.0 / rate, draws)
        return rng.gamma(shape, 1.0 / (rate * shape), draws)

    times = np.cumsum(gaps())
    while times[-1] < duration_s:  # rare: extend until the window is covered
        times = np.concatenate([times, times[-1] + np.cumsum(gaps())])
    times = times[times < duration_s]
    prompt, output = traffic.resolved_lengths()
    return Workload(
        times,
        sample_lengths(prompt, len(times), rng),
        sample_lengths(output, len(times), rng),
        duration_s,
        f"synthetic-{arrival}",
    )
