"""KV-cache transfer from a prefill instance to a decode instance over a network link.

Each instance has one network interface: it sends (egress) or receives (ingress) one transfer
at a time, in the order transfers were started, so a busy decode instance receiving many KV
caches queues them. A transfer's duration is the performance model's `kv_transfer_time_s` over
the link: the slower of the two ends' `networkBandwidthGbps`, unless the cluster sets one
bandwidth for all KV transfers, or a *measured transport*: a fixed latency plus the bytes over
a bandwidth, both fitted to what `bench/kv_transfer_bench.py` measured between two engine
processes (`MeasuredTransport.from_bench`), so a transfer costs what the real transport costs
(framing, checksums, copies to and from the host), not the link's datasheet rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tessera.sim.instance import Instance


class TransferModel(Protocol):
    def kv_transfer_time_s(self, tokens: int, link_gbps: float | None = None) -> float: ...


@dataclass(frozen=True)
class MeasuredTransport:
    """A KV transport as measured: time = latency_s + bytes / (bandwidth_gbps * 1e9)."""

    name: str
    latency_s: float
    bandwidth_gbps: float
    """GB/s (1e9 bytes per second), as the rest of the performance model."""
    samples: int
    source: str = ""

    def __post_init__(self) -> None:
        _check_bandwidth(f"the measured {self.name} transport's bandwidth", self.bandwidth_gbps)
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"the measured {self.name} transport's latency must be >= 0 s")

    def time_s(self, tokens: int, model: TransferModel) -> float:
        """The transfer time of `tokens` of KV: the model's bytes over the measured bandwidth,
        plus the fixed latency."""
        return self.latency_s + model.kv_transfer_time_s(tokens, self.bandwidth_gbps)

    @classmethod
    def fit(
        cls, name: str, points: Iterable[tuple[float, float]], source: str = ""
    ) -> MeasuredTransport:
        """Least squares of seconds on bytes over (bytes, seconds) points. A negative intercept
        (noise at small sizes) is clamped to zero and the slope refitted through the origin."""
        data = [(float(b), float(t)) for b, t in points]
        sizes = {b for b, _ in data}
        if len(sizes) < 2:
            raise ValueError(f"fitting the {name} transport needs at least two sizes, got {sizes}")
        n = len(data)
        mean_b = sum(b for b, _ in data) / n
        mean_t = sum(t for _, t in data) / n
        spread = sum((b - mean_b) ** 2 for b, _ in data)
        slope = sum((b - mean_b) * (t - mean_t) for b, t in data) / spread
        latency = mean_t - slope * mean_b
        if latency < 0:
            latency = 0.0
            slope = sum(b * t for b, t in data) / sum(b * b for b, _ in data)
        if slope <= 0:
            raise ValueError(f"the {name} measurements do not grow with size: no bandwidth fits")
        return cls(name, latency, 1.0 / slope / 1e9, n, source)

    @classmethod
    def fit_rows(
        cls, rows: Iterable[Mapping[str, Any]], source: str = ""
    ) -> dict[str, MeasuredTransport]:
        """One fit per transport from the bench's transfer rows (`transport`, `bytes`, and
        `seconds`, every repeat)."""
        points: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            for seconds in row["seconds"]:
                points.setdefault(str(row["transport"]), []).append((row["bytes"], seconds))
        return {name: cls.fit(name, data, source) for name, data in points.items()}

    @classmethod
    def from_bench(cls, path: Path | str, transport: str = "tcp") -> MeasuredTransport:
        """The fit of one transport in a `bench/kv_transfer_bench.py` JSON file."""
        record = json.loads(Path(path).read_text())
        fits = cls.fit_rows(record.get("transfer") or [], source=f"{path} ({record.get('device')})")
        if transport not in fits:
            raise ValueError(
                f"{path}: no {transport} measurements (has: {', '.join(sorted(fits)) or 'none'})"
            )
        return fits[transport]


@dataclass
class KvLinks:
    """Link bandwidths and per-interface queues for KV transfers."""

    link_gbps: float | None = None
    """One bandwidth for every transfer (GB/s); None: the slower end's network bandwidth."""
    transfers: int = 0
    busy_s: float = 0.0
    tokens: int = 0
    measured: MeasuredTransport | None = None
    """When set, every transfer costs what this transport measured (it wins over link_gbps)."""

    def __post_init__(self) -> None:
        if self.link_gbps is not None:
            _check_bandwidth("the KV link bandwidth (kvLinkGbps)", self.link_gbps)

    def duration_s(
        self, source: Instance, target: Instance, tokens: int, model: TransferModel
    ) -> float:
        """How long moving `tokens` of KV from `source` to `target` takes, queueing aside."""
        if self.measured is not None:
            return self.measured.time_s(tokens, model)
        link = self.link_gbps or min(source.network_gbps, target.network_gbps)
        _check_bandwidth("the network bandwidth (networkBandwidthGbps)", link)
        return model.kv_transfer_time_s(tokens, link)

    def book(
        self, source: Instance, target: Instance, tokens: int, now: float, model: TransferModel
    ) -> tuple[float, float]:
        """(start, end) of moving `tokens` of KV from `source` to `target`, from `now`."""
        duration = self.duration_s(source, target, tokens, model)
        start = max(now, source.egress_free_s, target.ingress_free_s)
        end = start + duration
        source.egress_free_s = end
        target.ingress_free_s = end
        self.transfers += 1
        self.busy_s += duration
        self.tokens += tokens
        return start, end


def _check_bandwidth(what: str, gbps: float) -> None:
    """A negative or zero bandwidth would make transfers instant or take negative time (and
    lower TTFT); NaN would stall every transfer."""
    if not (math.isfinite(gbps) and gbps > 0):
        raise ValueError(f"{what} must be a finite number > 0 GB/s, got {gbps}")
