"""Request dispatch: which instance of a pool gets the next request.

A pure decision over a snapshot of instance loads, shared by the simulator and (later) the
operator's router, so that what the simulator measures is what the router would do. The
snapshot holds only what a router can observe on a live engine (queue lengths, prompt tokens not
yet prefilled, KV-cache occupancy) and never a request's output length, which no real router
knows in advance. It is a struct of numpy arrays, one entry per instance, so that a choice among
thousands of instances is a vectorised argmin rather than a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from tessera.policies.migration import load_fraction


class DispatchPolicy(StrEnum):
    """How a request's instance is chosen."""

    LEAST_TOKENS = "least-tokens"
    """Fewest tokens queued and held (prompt tokens not prefilled + KV tokens), per unit speed."""
    LEAST_REQUESTS = "least-requests"
    """Fewest requests in flight (waiting + running), per unit speed: join-the-shortest-queue."""
    LEAST_KV = "least-kv"
    """Lowest KV-cache occupancy fraction; ties broken by fewest tokens."""
    ROUND_ROBIN = "round-robin"
    """Instances in turn, by the request's sequence number; ignores load."""
    POWER_OF_TWO = "power-of-two"
    """Two instances drawn at random (seeded), the one with fewer tokens wins."""
    LEAST_VIRTUAL_USAGE = "least-virtual-usage"
    """Lowest Llumnix load: (KV tokens held + prompt tokens queued) over KV capacity, the
    virtual usage of `policies.migration` as a router sees it; ties by fewest tokens."""


class NoEligibleInstanceError(ValueError):
    """No instance of the pool can take the request (e.g. its prompt exceeds every KV cache)."""


@dataclass(frozen=True)
class InstanceLoads:
    """Observable load of every instance of one pool, one array entry per instance.

    Arrays are read, never written, by the policy; the caller may keep and update them between
    calls (the simulator does) since each choice reads them afresh.
    """

    waiting_requests: NDArray[np.int64]
    running_requests: NDArray[np.int64]
    pending_prefill_tokens: NDArray[np.float64]
    """Prompt tokens received and not yet prefilled (including recomputation after preemption)."""
    kv_used_tokens: NDArray[np.float64]
    kv_capacity_tokens: NDArray[np.float64]
    speed: NDArray[np.float64]
    """Relative service rate (e.g. tokens/s from the performance model); weights the load."""
    draining: NDArray[np.bool_] | None = None
    """Instances being drained (scale-down) or not yet started: never chosen, by any policy."""

    @classmethod
    def empty(
        cls, kv_capacity_tokens: NDArray[np.float64], speed: NDArray[np.float64]
    ) -> InstanceLoads:
        """A snapshot of idle instances with the given capacities and speeds."""
        count = len(kv_capacity_tokens)
        if len(speed) != count:
            raise ValueError(f"speed has {len(speed)} entries, kv_capacity_tokens has {count}")
        return cls(
            waiting_requests=np.zeros(count, dtype=np.int64),
            running_requests=np.zeros(count, dtype=np.int64),
            pending_prefill_tokens=np.zeros(count, dtype=np.float64),
            kv_used_tokens=np.zeros(count, dtype=np.float64),
            kv_capacity_tokens=np.asarray(kv_capacity_tokens, dtype=np.float64),
            speed=np.asarray(speed, dtype=np.float64),
            draining=np.zeros(count, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.kv_capacity_tokens)


@dataclass(frozen=True)
class DispatchRequest:
    """What the router knows of a request when it arrives."""

    prompt_tokens: int
    sequence: int
    """Arrival order within the pool's stream, for round robin."""


def choose_instance(
    policy: DispatchPolicy,
    request: DispatchRequest,
    loads: InstanceLoads,
    rng: np.random.Generator | None = None,
) -> int:
    """Index of the instance that should serve `request`.

    Instances whose whole KV cache is smaller than the prompt are never chosen. Ties go to the
    lowest index, so the choice is deterministic for a given snapshot (and seeded `rng` for
    power-of-two).
    """
    if len(loads) == 0:
        raise NoEligibleInstanceError("the pool has no instances")
    eligible = loads.kv_capacity_tokens >= request.prompt_tokens
    if loads.draining is not None:
        eligible &= ~loads.draining
        if not eligible.any() and loads.draining.all():
            raise NoEligibleInstanceError("every instance of the pool is draining")
    if not eligible.any():
        raise NoEligibleInstanceError(
            f"a {request.prompt_tokens}-token prompt exceeds the KV cache of every instance "
            f"(largest holds {int(loads.kv_capacity_tokens.max())} tokens)"
        )
    tokens = (loads.pending_prefill_tokens + loads.kv_used_tokens) / loads.speed
    if policy is DispatchPolicy.ROUND_ROBIN:
        candidates = np.flatnonzero(eligible)
        return int(candidates[request.sequence % len(candidates)])
    if policy is DispatchPolicy.POWER_OF_TWO:
        if rng is None:
            raise ValueError("power-of-two dispatch needs a seeded numpy Generator (rng)")
        candidates = np.flatnonzero(eligible)
        if len(candidates) == 1:
            return int(candidates[0])
        first, second = rng.choice(candidates, size=2, replace=False)
        return int(first if tokens[first] <= tokens[second] else second)
    if policy is DispatchPolicy.LEAST_TOKENS:
        score = tokens
    elif policy is DispatchPolicy.LEAST_REQUESTS:
        score = (loads.waiting_requests + loads.running_requests) / loads.speed
    elif policy is DispatchPolicy.LEAST_KV:
        fraction = np.where(eligible, loads.kv_used_tokens / loads.kv_capacity_tokens, np.inf)
        # np.lexsort sorts by its last key first: occupancy, then tokens, then index.
        return int(np.lexsort((tokens, fraction))[0])
    elif policy is DispatchPolicy.LEAST_VIRTUAL_USAGE:
        virtual = loads.kv_used_tokens + loads.pending_prefill_tokens
        usage = np.where(eligible, load_fraction(virtual, loads.kv_capacity_tokens, False), np.inf)
        return int(np.lexsort((tokens, usage))[0])
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(f"unknown dispatch policy {policy!r}")
    return int(np.argmin(np.where(eligible, score, np.inf)))
