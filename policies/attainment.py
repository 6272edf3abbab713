"""Predicted SLO attainment of a plan: the fraction of requests whose TTFT and TPOT both meet
the SLO, from the performance model and simple queueing, without simulating.

Sizing at the SLO percentile says whether the percentile request meets its target; attainment
is what the SLO's `attainmentTarget` is stated in, and what the simulator measures. The model:

- TTFT = queueing delay + the request's own first-token time. A pool's prefill work is an
  M/G/c-like queue (least-loaded dispatch over c replicas; `WaitingTail`); the first-token
  time depends on the prompt, so the attained fraction is averaged over the prompt lengths.
- TPOT in a decode pool: the step time at the batch that the load keeps running (Little's law:
  concurrency = rate x output tokens x step time), against the KV capacity.
- TPOT on a colocated replica: decode steps stretched by the prefills interleaved with them
  (the chunks riding on decode steps, or whole prompts in iterations of their own). A request
  sees the prefills that arrive while it decodes, a Poisson count, so short outputs see a
  noisier TPOT than long ones; averaged over the output-length distribution. Where the time
  each prefill adds varies (whole prompts of heavy-tailed lengths), the sum is compound
  Poisson, approximated by a scaled Poisson count with the same mean and variance.

Attainment is P(TTFT met) x P(TPOT met), treating the two as independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tessera.api.model_deployment import LengthDistribution
from tessera.policies.lengths import WaitingTail, length_quantile

QUANTILE_POINTS = 48
"""Points of a length distribution the averages run over (midpoint quantiles)."""
SATURATED_BATCH_STEPS = 64
"""Fixed-point iterations for the running batch; it converges in a handful."""


def length_points(distribution: LengthDistribution, points: int = QUANTILE_POINTS) -> list[int]:
    """Equally likely lengths standing for the distribution (its midpoint quantiles)."""
    return [int(length_quantile(distribution, (i + 0.5) / points)) for i in range(points)]


def squared_cv(values: Sequence[float]) -> float:
    """Squared coefficient of variation (variance / mean^2) of equally likely values."""
    mean = sum(values) / len(values)
    if mean <= 0:
        return 0.0
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / mean**2


def tandem_waiting_cdf(first: WaitingTail, second: WaitingTail, wait_s: float) -> float:
    """P(W1 + W2 <= wait_s) for independent waits in two queues in tandem.

    Each wait is 0 with probability 1 - p_i, else exponential with rate theta_i; the sum of two
    exponentials is hypoexponential.
    """
    if wait_s < 0:
        return 0.0
    if not (first.stable and second.stable):
        return 0.0
    if first.arrival_rate <= 0 or first.mean_service_s <= 0:
        return second.cdf(wait_s)
    if second.arrival_rate <= 0 or second.mean_service_s <= 0:
        return first.cdf(wait_s)
    p1, p2 = first.wait_probability, second.wait_probability
    a, b = first.decay_per_s, second.decay_per_s
    exp1 = 1.0 - math.exp(-a * wait_s)
    exp2 = 1.0 - math.exp(-b * wait_s)
    if abs(a - b) < 1e-9 * max(a, b):
        both = 1.0 - math.exp(-a * wait_s) * (1.0 + a * wait_s)
    else:
        both = 1.0 - (b * math.exp(-a * wait_s) - a * math.exp(-b * wait_s)) / (b - a)
    return (1 - p1) * (1 - p2) + p1 * (1 - p2) * exp1 + (1 - p1) * p2 * exp2 + p1 * p2 * both


def ttft_attainment(
    prompts: Sequence[int],
    first_token_s: Callable[[int], float],
    arrival_rate: float,
    budget_s: float,
    servers: int = 1,
) -> float:
    """Fraction of requests whose TTFT fits `budget_s` on `servers` replicas fed `arrival_rate`.

    `first_token_s(prompt)` is the request's own time to first token once served (its
    prefill, plus whatever follows before the token: a KV transfer, interleaved decode steps).
    """
    times = [first_token_s(p) for p in prompts]
    mean_service_s = sum(times) / len(times)
    tail = WaitingTail(arrival_rate, mean_service_s, servers, squared_cv(times))
    return sum(tail.cdf(budget_s - t) for t in times) / len(times)


def running_batch(
    arrival_rate: float,
    mean_output: float,
    token_time_s: Callable[[int], float],
    max_batch: int,
) -> tuple[int, bool]:
    """The decode batch a load keeps running (Little's law), and whether it overflows.

    concurrency = arrival rate x output tokens x time per token, where the time per token
    grows with the batch; iterated to its fixed point. Overflow means more requests would be
    running than the KV cache (or batch limit) holds: the replica is saturated.
    """
    if arrival_rate <= 0:
        return 0, False
    batch = 1
    for _ in range(SATURATED_BATCH_STEPS):
        wanted = max(1, math.ceil(arrival_rate * mean_output * token_time_s(batch)))
        if wanted > max_batch:
            return max_batch, True
        if wanted == batch:
            break
        batch = wanted
    return batch, False


def poisson_cdf(mean: float, k: float) -> float:
    """P(N <= k) for N ~ Poisson(mean)."""
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    if mean > 400:  # normal approximation with continuity correction
        z = (math.floor(k) + 0.5 - mean) / math.sqrt(mean)
        return 0.5 * math.erfc(-z / math.sqrt(2))
    term = math.exp(-mean)
    total = term
    for n in range(1, math.floor(k) + 1):
        term *= mean / n
        total += term
        if term < 1e-12 and n > mean:
            break
    return min(1.0, total)


@dataclass(frozen=True)
class InterleavedDecode:
    """Decode on a replica that also prefills: a step plus the prefills arriving meanwhile."""

    step_s: float
    """A decode-only step at the running batch."""
    prefill_arrival_rate: float
    """Prompts per second this replica prefills."""
    prefill_s: float
    """Mean time a prompt's prefill adds to the running decodes' tokens (its chunks' cost
    beyond the steps they ride on, or a whole prompt's full prefill time)."""
    prefill_scv: float = 0.0
    """Squared CV of that added time over the prompt lengths."""

    @property
    def busy_prefilling(self) -> float:
        return self.prefill_arrival_rate * self.prefill_s

    @property
    def idle(self) -> float:
        """Fraction of time not prefilling (floored: past saturation the model says little)."""
        return max(0.05, 1.0 - self.busy_prefilling)

    @property
    def mean_tpot_s(self) -> float:
        return self.step_s / self.idle

    def tpot_attainment(self, outputs: Sequence[int], budget_s: float) -> float:
        """Fraction of requests whose mean time per output token fits `budget_s`.

        The prefill time S that a request's decode work w = tokens x step sees is a busy
        period: prefills arriving during w and during earlier prefills (M/G/1, prefill times X
        at rate lambda, load rho): E[S] = w rho / (1 - rho), Var[S] = w lambda E[X^2] /
        (1 - rho)^3. It is taken as c x Poisson(E[S] / c), c = Var[S] / E[S], which has that
        mean and variance (with one prefill time and rho -> 0, the Poisson count of prefills).
        """
        if self.step_s > budget_s:
            return 0.0
        idle = self.idle
        size_s = max(self.prefill_s * (1.0 + self.prefill_scv) / idle**2, 1e-9)
        mean_per_work = self.busy_prefilling / idle
        met = 0.0
        for output in outputs:
            tokens = max(1, output - 1)
            work_s = tokens * self.step_s
            allowed = (budget_s - self.step_s) * tokens / size_s
            met += poisson_cdf(work_s * mean_per_work / size_s, allowed)
        return met / len(outputs)
