"""Quantiles of token-length distributions and of queueing delays, for SLO percentiles.

SLOs are stated at a percentile (p90 TTFT), so sizing by means is optimistic: the planner sizes
TTFT with the percentile prompt and the percentile queueing delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from tessera.api.model_deployment import LengthDistribution


def length_quantile(distribution: LengthDistribution, quantile: float) -> float:
    """The `quantile` (0..1) of a length distribution, clipped to its max."""
    mean, stddev = distribution.mean, distribution.stddev
    if distribution.distribution == "fixed" or stddev == 0:
        value = mean
    elif distribution.distribution == "normal":
        value = mean + NormalDist().inv_cdf(quantile) * stddev
    elif distribution.distribution == "lognormal":
        sigma2 = math.log1p((stddev / mean) ** 2)
        mu = math.log(mean) - sigma2 / 2
        value = math.exp(mu + NormalDist().inv_cdf(quantile) * math.sqrt(sigma2))
    else:  # exponential
        value = -mean * math.log1p(-quantile)
    if distribution.max is not None:
        value = min(value, float(distribution.max))
    return max(1.0, value)


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang C), offered load = lambda/mu."""
    if offered_load <= 0:
        return 0.0
    if offered_load >= servers:
        return 1.0
    blocking = 1.0
    for k in range(1, servers + 1):  # Erlang B by its stable recurrence
        blocking = offered_load * blocking / (k + offered_load * blocking)
    rho = offered_load / servers
    return blocking / (1.0 - rho * (1.0 - blocking))


@dataclass(frozen=True)
class WaitingTail:
    """Queueing delay of a pool of `servers` replicas fed by least-loaded dispatch, taken as
    one M/G/c queue (Allen-Cunneen): P(W > t) = ErlangC * exp(-theta t) with
    theta = 2 (c mu - lambda) / (1 + cs^2), cs^2 the squared coefficient of variation of the
    service time (0 for fixed-length prompts, large for heavy-tailed chat prompts). Sizing
    (`waiting_quantile_s`, one server) and prediction (`attainment.py`) both use it.
    """

    arrival_rate: float
    mean_service_s: float
    servers: int = 1
    service_scv: float = 0.0

    @property
    def utilization(self) -> float:
        """Busy fraction of each server (rho)."""
        return self.arrival_rate * self.mean_service_s / self.servers

    @property
    def stable(self) -> bool:
        return self.utilization < 1

    @property
    def wait_probability(self) -> float:
        return erlang_c(self.servers, self.arrival_rate * self.mean_service_s)

    @property
    def decay_per_s(self) -> float:
        spread = 1.0 + self.service_scv
        return 2.0 * (self.servers / self.mean_service_s - self.arrival_rate) / spread

    def cdf(self, wait_s: float) -> float:
        if wait_s < 0:
            return 0.0
        if self.arrival_rate <= 0 or self.mean_service_s <= 0:
            return 1.0
        if not self.stable:
            return 0.0
        return 1.0 - self.wait_probability * math.exp(-self.decay_per_s * wait_s)

    def quantile(self, quantile: float) -> float:
        """The waiting time not exceeded with probability `quantile` (inf when unstable)."""
        if self.arrival_rate <= 0 or self.mean_service_s <= 0:
            return 0.0
        if not self.stable:
            return math.inf
        waiting = self.wait_probability
        if waiting <= 1 - quantile:
            return 0.0
        return math.log(waiting / (1 - quantile)) / self.decay_per_s


def waiting_quantile_s(
    arrival_rate: float, service_s: float, quantile: float, service_scv: float = 0.0
) -> float:
    """Approximate `quantile` of the waiting time at one replica (an M/G/1 queue, WaitingTail):
    the tail P(W > t) = rho * exp(-2 (mu - lambda) t / (1 + cs^2))."""
    return WaitingTail(arrival_rate, service_s, 1, service_scv).quantile(quantile)


def max_rate_for_latency(
    service_s: float,
    extra_s: float,
    budget_s: float,
    quantile: float,
    upper_rho: float,
    service_scv: float = 0.0,
) -> float:
    """Highest arrival rate whose service + extra + waiting quantile fits in `budget_s`."""
    if service_s + extra_s > budget_s:
        return 0.0
    low, high = 0.0, upper_rho / service_s
    for _ in range(40):
        middle = (low + high) / 2
        if (
            service_s + extra_s + waiting_quantile_s(middle, service_s, quantile, service_scv)
            <= budget_s
        ):
            low = middle
        else:
            high = middle
    return low
