"""KV-cache transfer from a prefill instance to a decode instance over a network link.

Each instance has one network interface: it sends (egress) or receives (ingress) one transfer
at a time, in the order transfers were started, so a busy decode instance receiving many KV
caches queues them. A transfer's duration is the performance model's `kv_transfer_time_s` over
the link: the slower of the two ends' `networkBandwidthGbps`, unless the cluster sets one
bandwidth for all KV transfers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tessera.sim.instance import Instance


class TransferModel(Protocol):
    def kv_transfer_time_s(self, tokens: int, link_gbps: float | None = None) -> float: ...


@dataclass
class KvLinks:
    """Link bandwidths and per-interface queues for KV transfers."""

    link_gbps: float | None = None
    """One bandwidth for every transfer (GB/s); None: the slower end's network bandwidth."""
    transfers: int = 0
    busy_s: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        if self.link_gbps is not None:
            _check_bandwidth("the KV link bandwidth (kvLinkGbps)", self.link_gbps)

    def book(
        self, source: Instance, target: Instance, tokens: int, now: float, model: TransferModel
    ) -> tuple[float, float]:
        """(start, end) of moving `tokens` of KV from `source` to `target`, from `now`."""
        link = self.link_gbps or min(source.network_gbps, target.network_gbps)
        _check_bandwidth("the network bandwidth (networkBandwidthGbps)", link)
        duration = model.kv_transfer_time_s(tokens, link)
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
