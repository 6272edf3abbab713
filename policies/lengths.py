"""Quantiles of token-length distributions and of queueing delays, for SLO percentiles.

SLOs are stated at a percentile (p90 TTFT), so sizing by means is optimistic: the planner sizes
TTFT with the percentile prompt and the percentile queueing delay.
"""

from __future__ import annotations

import math
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


def waiting_quantile_s(
    arrival_rate: float, service_s: float, quantile: float, service_scv: float = 0.0
) -> float:
    """Approximate `quantile` of the waiting time in a single-server queue (M/G/1).

    Uses the exponential tail P(W > t) = rho * exp(-2 (mu - lambda) t / (1 + cs^2)): M/M/1's
    tail with its spread scaled by the service time's variability (cs^2 is the squared
    coefficient of variation; 0 is deterministic service, which halves M/M/1's spread).
    """
    if arrival_rate <= 0 or service_s <= 0:
        return 0.0
    rho = arrival_rate * service_s
    if rho >= 1:
        return math.inf
    if rho <= 1 - quantile:
        return 0.0
    spread = (1.0 + service_scv) / 2
    return spread * math.log(rho / (1 - quantile)) / (1 / service_s - arrival_rate)


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
