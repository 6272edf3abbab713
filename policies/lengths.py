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


def waiting_quantile_s(arrival_rate: float, service_s: float, quantile: float) -> float:
    """Approximate `quantile` of the waiting time in a single-server queue (M/D/1-like).

    Uses the exponential tail P(W > t) = rho * exp(-(mu - lambda) t) of M/M/1 with half its
    spread, since deterministic service halves the waiting-time variance.
    """
    if arrival_rate <= 0 or service_s <= 0:
        return 0.0
    rho = arrival_rate * service_s
    if rho >= 1:
        return math.inf
    if rho <= 1 - quantile:
        return 0.0
    return 0.5 * math.log(rho / (1 - quantile)) / (1 / service_s - arrival_rate)


def max_rate_for_latency(
    service_s: float, extra_s: float, budget_s: float, quantile: float, upper_rho: float
) -> float:
    """Highest arrival rate whose service + extra + waiting quantile fits in `budget_s`."""
    if service_s + extra_s > budget_s:
        return 0.0
    low, high = 0.0, upper_rho / service_s
    for _ in range(40):
        middle = (low + high) / 2
        if service_s + extra_s + waiting_quantile_s(middle, service_s, quantile) <= budget_s:
            low = middle
        else:
            high = middle
    return low
