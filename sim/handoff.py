"""A disaggregated request's life from its prefill instance to its decode instance, in one place.

1. Prefilled: a prefill instance computed the prompt and sampled the first token
   (`Instance.step_end`). The request is dispatched to a decode instance of its deployment
   (`policies.dispatch`, by its KV tokens) and offered there (`Instance.offer_transfer`); its KV
   blocks stay held on the prefill side.
2. Transfer: once the decode instance has the blocks free, it reserves them, in the order the
   requests were offered (`Instance._pull`), and the KV moves over the link between the two
   (`sim.transfer.KvLinks.book`: one transfer at a time per network interface, each timed by the
   measured transport or the link's bandwidth). The request's `transfer_s` counts the wait for
   the link and the transfer.
3. Received: at the transfer's end the prefill instance frees the blocks (`Instance.release`),
   the first token counts as delivered (TTFT includes the transfer, as a client of a
   disaggregated server sees it), and the decode instance runs the request
   (`Instance.receive`).

A decode instance that preempts a request sends it back to the prefill pool (`reprefill`): it is
recomputed there (prompt and the tokens it had generated) and goes through 1-3 again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessera.policies.perfmodel import ReplicaPerformance

if TYPE_CHECKING:
    from tessera.sim.instance import Instance, Request
    from tessera.sim.simulation import Simulation


class KvHandoff:
    """Moves prefilled requests to decode instances for one simulation (its `handoff`)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def prefilled(self, request: Request, source: Instance, now: float) -> None:
        """Step 1: `source` produced the request's first token; offer it to a decode instance."""
        sim = self.sim
        deployment = sim.deployments[request.deployment]
        assert deployment.decode is not None
        target = sim._dispatch(deployment.decode, deployment.setup, request.kv)
        request.home = source
        target.offer_transfer(request, now)

    def start_transfer(self, request: Request, target: Instance, blocks: int, now: float) -> None:
        """Step 2: `target` reserved `blocks` for the request's KV; move it there."""
        source = request.home
        assert source is not None
        perf = source.cost.perf
        assert isinstance(perf, ReplicaPerformance)
        sim = self.sim
        _, end = sim.links.book(source, target, request.kv, now, perf)
        sim.transfer_s[request.rid] += end - now
        sim.push_event(end, _TransferDone(request, source, target, blocks), 0)

    def reprefill(self, request: Request, now: float) -> None:
        """A decode instance preempted the request: recompute its KV on the prefill pool."""
        sim = self.sim
        deployment = sim.deployments[request.deployment]
        instance = sim._dispatch(deployment.entry, deployment.setup, request.target)
        instance.enqueue(request, now)


class _TransferDone:
    """Step 3, an event: the KV of a request arrived at its decode instance."""

    __slots__ = ("blocks", "request", "source", "target")

    def __init__(self, request: Request, source: Instance, target: Instance, blocks: int) -> None:
        self.request = request
        self.source = source
        self.target = target
        self.blocks = blocks

    def step_end(self, now: float, version: int) -> None:
        request = self.request
        self.source.release(request, now)
        request.blocks = self.blocks
        if request.first_token_s < 0:
            request.first_token_s = now
        self.target.receive(request, now)
