"""A serving instance (one replica): continuous batching at iteration level over a paged KV
cache, forming each iteration's batch with the engine's own policy
(`policies.batching.form_batch`, vLLM V1's rules), chunked prefill on or off.

- Each iteration runs the running requests' decode tokens and prompt chunks first, then admits
  waiting requests first-come-first-served while the token budget, `max_num_seqs` and free KV
  blocks allow. KV blocks grow with the tokens computed, chunk by chunk, as in the engine.
- Without chunked prefill a prompt is admitted only when it fits the iteration's remaining
  budget whole; it runs beside the decodes, which its length stalls.
- When a request's next tokens need a block and none is free, the newest running request is
  preempted by recomputation: its blocks are freed and it prefills again (prompt + the tokens it
  had generated) when memory allows; a decode-role instance sends it back to the prefill pool.
- Roles: colocated (prefill and decode), prefill (hands a request off after its first token;
  keeps its KV blocks until the transfer out completes), decode (receives requests with their
  KV, reserving blocks before the transfer starts); the hand-off between them is
  sim/handoff.py's. An attention-offloaded decode replica is a decode instance whose performance
  model is policies.attention_offload's.

Runs of identical decode iterations are one event (see stepcost.DecodeCurve); an arrival ends a
run at the end of the iteration in progress, as a real scheduler would admit it there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from tessera.api.model_deployment import PoolRole
from tessera.api.scheduler import SchedulerConfig
from tessera.policies.batching import blocks_for_tokens, form_batch
from tessera.policies.dispatch import InstanceLoads
from tessera.policies.perfmodel import PrefillChunk
from tessera.sim.shared_device import host_s_per_iteration
from tessera.sim.stepcost import DecodeCurve, StepCost

if TYPE_CHECKING:
    from tessera.sim.metrics import PowerTrack
    from tessera.sim.shared_device import DeviceShare
    from tessera.sim.simulation import Simulation


class KvOvercommitError(AssertionError):
    """An instance holds more KV-cache blocks than it has: a simulator bug, never a result."""


class Request:
    """One request's progress through the cluster."""

    __slots__ = (
        "arrival_s",
        "blocks",
        "deployment",
        "finish_s",
        "first_token_s",
        "generated",
        "home",
        "kv",
        "output",
        "preemptions",
        "prefilled",
        "prompt",
        "rid",
        "target",
        "transfer_s",
    )

    def __init__(self, rid: int, deployment: int, arrival_s: float, prompt: int, output: int):
        self.rid = rid
        self.deployment = deployment
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.target = prompt
        """Tokens to prefill: the prompt, or prompt + generated after a preemption."""
        self.prefilled = 0
        self.generated = 0
        self.kv = 0
        """Tokens whose K/V are in the cache of the instance holding the request."""
        self.blocks = 0
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.preemptions = 0
        self.transfer_s = 0.0
        self.home: Instance | None = None


_IDLE, _BATCH, _RUN = 0, 1, 2


class Instance:
    """One replica of a pool, simulated iteration by iteration."""

    def __init__(
        self,
        sim: Simulation,
        name: str,
        role: PoolRole,
        cost: StepCost,
        scheduler: SchedulerConfig,
        loads: InstanceLoads,
        slot: int,
        power: PowerTrack,
        network_gbps: float,
        kv_capacity_tokens: int | None = None,
        share: DeviceShare | None = None,
    ) -> None:
        if role is PoolRole.ATTENTION:
            raise ValueError(
                "an attention pool is not an instance: it is the memory side of an offloaded "
                "decode pool, simulated inside that pool's instances"
            )
        self.sim = sim
        self.name = name
        self.role = role
        self.cost = cost
        self.scheduler = scheduler
        self.loads = loads
        self.slot = slot
        self.power = power
        self.network_gbps = network_gbps
        options = sim.config
        self.block_size = options.block_size_tokens
        self.fast_forward = options.fast_forward
        capacity = kv_capacity_tokens
        if capacity is None:
            capacity = options.kv_capacity_tokens
        if capacity is None:
            capacity = cost.perf.kv_capacity_tokens
        self.total_blocks = capacity // self.block_size
        self.used_blocks = 0
        self.growth_blocks = 0
        """Blocks a run of decode iterations in progress will add after its first iteration."""
        self.peak_used_blocks = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.incoming: deque[Request] = deque()
        self.pending_prefill_tokens = 0
        self.egress_free_s = 0.0
        self.ingress_free_s = 0.0
        # The iteration (or run of decode iterations) in progress.
        self.state = _IDLE
        self.version = 0
        self.started_s = 0.0
        self.batch_decoding: list[Request] = []
        self.batch_chunks: list[tuple[Request, int]] = []
        self.batch_preempted: list[Request] = []
        """Requests the iteration in progress preempted when it was formed."""
        self.run_curve: DecodeCurve | None = None
        self.run_start_total = 0
        self.run_steps = 0
        self.run_cut = False
        self.busy_compute_s = 0.0
        self.iterations = 0
        self.share = share
        """The device this instance time-shares with others (sim/shared_device.py); None: a
        device of its own, where a step's work is its wall time."""
        self.work_s = 0.0
        """Full-speed seconds of the step in flight (kept only on a shared device)."""
        self.work_done_s = 0.0
        """Of which done, as of the share's last update."""
        self.device_fraction = 1.0
        """Of which the device is held (the rest is host-side overhead: sim/shared_device.py)."""
        self.host_s = host_s_per_iteration(cost.perf) if share and share.overlap_host else 0.0
        """Host-side seconds of each iteration, when the share lets others use the device then."""
        self.boundary_hooks: list[Callable[[float], None]] = []
        """Called once, at the end of the iteration in progress (live migration detaches a
        request there: sim/migration.py)."""

    # ---- requests in ------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks neither held nor promised to the run of decode iterations in progress."""
        return self.total_blocks - self.used_blocks - self.growth_blocks

    def enqueue(self, request: Request, now: float) -> None:
        """A request to prefill (new, or recomputing after a preemption)."""
        request.home = self
        self.waiting.append(request)
        self.pending_prefill_tokens += request.target - request.prefilled
        self._publish()
        self._kick(now)

    def offer_transfer(self, request: Request, now: float) -> None:
        """A prefilled request whose KV should move here once blocks are free (decode role)."""
        self.incoming.append(request)
        if self.state == _RUN and not self.run_cut:
            # Blocks are promised to the run's decodes only up to the iteration in progress,
            # as they would be if every iteration were scheduled on its own.
            self._cut_run(now)
        self._pull(now)

    def receive(self, request: Request, now: float) -> None:
        """The KV of a request arrived (its blocks were reserved when the transfer started)."""
        request.home = self
        self.running.append(request)
        self._publish()
        self._kick(now)

    def release(self, request: Request, now: float) -> None:
        """Free a handed-off request's blocks once its KV has left (prefill role)."""
        self._set_blocks(request, 0)
        self._publish()
        self._kick(now)

    # ---- live migration (sim/migration.py) ---------------------------------------------
    def at_next_boundary(self, hook: Callable[[float], None], now: float) -> None:
        """Call `hook(t)` at the end of the iteration in progress (now if idle); a run of decode
        iterations is cut there, as a real engine checks for migrations between steps."""
        if self.state == _IDLE:
            hook(now)
            return
        self.boundary_hooks.append(hook)
        if self.state == _RUN and not self.run_cut:
            self._cut_run(now)

    def reserve_blocks(self, blocks: int) -> bool:
        """Hold `blocks` free blocks for a request migrating in; False if they are not free."""
        if blocks > self.free_blocks:
            return False
        self.used_blocks += blocks
        self._check_blocks()
        self._publish()
        return True

    def unreserve_blocks(self, blocks: int, now: float) -> None:
        """Give back blocks held for a migration that was aborted."""
        self.used_blocks -= blocks
        self._publish()
        self._kick(now)

    def detach(self, request: Request) -> None:
        """A running request leaves at an iteration boundary (its KV now lives elsewhere); the
        iteration that follows, which step_end starts, is formed without it."""
        self.running.remove(request)
        self._set_blocks(request, 0)
        self._publish()

    def take_unstarted(self) -> list[Request]:
        """Remove and return the requests that have not started here (nothing prefilled, or
        KV not yet transferred in): a draining instance hands them to others (sim/autoscale.py).
        """
        unstarted = [r for r in self.waiting if r.prefilled == 0]
        self.waiting = deque(r for r in self.waiting if r.prefilled > 0)
        self.pending_prefill_tokens -= sum(r.target for r in unstarted)
        unstarted.extend(self.incoming)
        self.incoming.clear()
        self._publish()
        return unstarted

    # ---- scheduling -------------------------------------------------------------------
    def _kick(self, now: float) -> None:
        if self.state == _IDLE:
            self._start(now)
        elif self.state == _RUN and not self.run_cut:
            self._cut_run(now)

    def _pull(self, now: float) -> None:
        """Start the transfers of incoming requests, in order, while their blocks are free
        (the iteration being formed has taken its decodes' blocks first)."""
        while self.incoming:
            request = self.incoming[0]
            need = blocks_for_tokens(request.kv, self.block_size)
            if need > self.free_blocks:
                break
            self.incoming.popleft()
            self.used_blocks += need
            self._check_blocks()
            self.sim.handoff.start_transfer(request, self, need, now)
        self._publish()

    def _set_blocks(self, request: Request, blocks: int) -> None:
        self.used_blocks += blocks - request.blocks
        request.blocks = blocks

    def _check_blocks(self) -> None:
        if self.used_blocks > self.total_blocks:
            raise KvOvercommitError(
                f"{self.name}: {self.used_blocks} KV blocks in use of {self.total_blocks}"
            )
        if self.used_blocks > self.peak_used_blocks:
            self.peak_used_blocks = self.used_blocks

    def _preempt(self, victim: Request, now: float) -> None:
        self.running.remove(victim)
        self._set_blocks(victim, 0)
        self.pending_prefill_tokens -= victim.target - victim.prefilled
        victim.kv = 0
        victim.prefilled = 0
        victim.target = victim.prompt + victim.generated
        victim.preemptions += 1
        self.sim.preemptions += 1
        if self.role is PoolRole.DECODE:
            self.sim.handoff.reprefill(victim, now)
        else:
            self.waiting.appendleft(victim)
            self.pending_prefill_tokens += victim.target

    def _start(self, now: float) -> None:
        """Form the next iteration's batch with the engine's policy and start it.

        This runs once per event for every running request, so it is written for speed: the
        views are plain tuples (`policies.batching.ViewTuple`), the waiting queue is read
        lazily (only as far as admission gets), and the decision is applied in one pass."""
        running, waiting = self.running, self.waiting
        decision = form_batch(
            self.scheduler,
            self.block_size,
            [
                (r.prefilled, r.target, r.blocks)
                if r.prefilled < r.target
                else (r.kv, r.kv + 1, r.blocks)
                for r in running
            ],
            ((0, r.target, 0) for r in waiting),
            self.free_blocks,
        )
        victims = [running[i] for i in decision.preempted]
        chunks: list[tuple[Request, int]] = []
        decoding: list[Request] = []
        used = self.used_blocks
        # The scheduled running requests are a prefix of `running` (zip stops at its end).
        for request, count, blocks in zip(
            running, decision.num_tokens, decision.new_blocks, strict=False
        ):
            if blocks:
                request.blocks += blocks
                used += blocks
            if request.prefilled < request.target:
                chunks.append((request, count))
            else:
                decoding.append(request)
        for count, blocks in zip(decision.admitted_tokens, decision.admitted_blocks, strict=True):
            request = waiting.popleft()
            running.append(request)
            request.blocks += blocks
            used += blocks
            chunks.append((request, count))
        self.used_blocks = used
        for victim in victims:  # a step that preempts admits nothing (form_batch)
            self._preempt(victim, now)
        self._check_blocks()
        self.batch_preempted = victims
        if self.incoming:
            self._pull(now)
        if chunks:
            self._start_batch(now, chunks, decoding)
        elif decoding:
            # A step that preempted admitted nothing; the next one may admit the preempted.
            self._start_run(now, decoding, single=bool(victims and waiting))
        else:
            self.state = _IDLE
        self._publish()

    def _start_batch(
        self, now: float, chunks: list[tuple[Request, int]], decoding: list[Request]
    ) -> None:
        prefill = [PrefillChunk(n, r.prefilled) for r, n in chunks]
        time_s, compute_bound = self.cost.iteration(prefill, [r.kv for r in decoding])
        self.state = _BATCH
        self.started_s = now
        self.batch_chunks = chunks
        self.batch_decoding = decoding
        self.busy_compute_s = time_s if compute_bound else 0.0
        self.version += 1
        # The step ends after `time_s` of full-speed work: then, on a device of its own; on a
        # shared one, when the share has given it that much (inline: this runs every step).
        if self.share is None:
            self.sim.push_event(now + time_s, self, self.version)
        else:
            self.share.start(self, now, time_s, self.host_s)

    def _start_run(self, now: float, decoding: list[Request], single: bool = False) -> None:
        """Decode iterations of one batch until a request finishes or the blocks run out
        (one iteration each unless fast-forwarding); the first iteration's blocks are held."""
        steps = 1
        growth: int | None = None
        if self.fast_forward and not single:
            steps = decoding[0].output - decoding[0].generated
            for r in decoding:  # min(), as a loop: this runs for every run of decodes
                if r.output - r.generated < steps:
                    steps = r.output - r.generated
            if steps > 1:
                free = self.free_blocks
                growth = self._new_blocks(decoding, steps)
                if growth > free:
                    low, high = 1, steps  # largest step count whose block growth fits
                    while low < high:
                        middle = (low + high + 1) // 2
                        if self._new_blocks(decoding, middle) <= free:
                            low = middle
                        else:
                            high = middle - 1
                    steps = low
                    growth = None
        if growth is None:
            growth = self._new_blocks(decoding, steps)
        self.state = _RUN
        self.started_s = now
        self.batch_decoding = decoding
        self.run_steps = steps
        self.growth_blocks = growth
        self.run_cut = steps == 1
        self.version += 1
        if self.fast_forward:
            curve = self.cost.decode_curve(len(decoding))
            total = 0
            for r in decoding:
                total += r.kv
            self.run_curve = curve
            self.run_start_total = total
            time_s, self.busy_compute_s = curve.run(total, steps)
        else:
            self.run_curve = None
            time_s, bound = self.cost.iteration((), [r.kv for r in decoding])
            self.busy_compute_s = time_s if bound else 0.0
        # The step ends after `time_s` of full-speed work: then, on a device of its own; on a
        # shared one, when the share has given it that much (inline: this runs every step).
        if self.share is None:
            self.sim.push_event(now + time_s, self, self.version)
        else:
            self.share.start(self, now, time_s, self.host_s * steps)

    def _new_blocks(self, decoding: list[Request], steps: int) -> int:
        """Blocks `steps` decode iterations add beyond those the requests hold."""
        size = self.block_size
        blocks = 0
        for r in decoding:  # blocks_for_tokens, inline: this runs for every run of decodes
            blocks += -(-(r.kv + steps) // size) - r.blocks
        return blocks

    def _cut_run(self, now: float) -> None:
        """End the run after the iteration in progress, so that new work joins the next one."""
        curve = self.run_curve
        self.run_cut = True
        if curve is None:
            return
        share = self.share
        # Work done so far: wall time on a device of its own, the share's count on a shared one.
        done_s = now - self.started_s if share is None else share.done_s(self, now)
        steps = curve.steps_until(self.run_start_total, self.run_steps, done_s)
        if steps >= self.run_steps:
            return
        self.run_steps = steps
        self.growth_blocks = self._new_blocks(self.batch_decoding, steps)
        time_s, self.busy_compute_s = curve.run(self.run_start_total, steps)
        if share is None:
            self.version += 1
            self.sim.push_event(max(now, self.started_s + time_s), self, self.version)
        else:
            share.resize(self, now, max(done_s, time_s), self.host_s * steps)

    # ---- iteration end ----------------------------------------------------------------
    def step_end(self, now: float, version: int) -> None:
        """The iteration (or run) in progress ended; apply it and start the next."""
        if version != self.version:
            return
        size = self.block_size
        finished = False
        self.growth_blocks = 0
        compute_s = self.busy_compute_s
        share = self.share
        if share is not None:
            # Stretched by sharing: the compute-bound share of the wall time is the work's.
            if self.work_s > 0:
                compute_s *= (now - self.started_s) / self.work_s
            share.finish(self, now)
        self.power.add_busy(self.started_s, now, compute_s)
        steps = self.run_steps if self.state == _RUN else 1
        self.iterations += steps
        if steps > 1:  # the first iteration's blocks were allocated when it started
            used = self.used_blocks
            for r in self.batch_decoding:
                r.kv += steps
                r.generated += steps
                blocks = -(-r.kv // size)  # blocks_for_tokens, inline
                used += blocks - r.blocks
                r.blocks = blocks
                if r.generated >= r.output:
                    finished = True
            self.used_blocks = used
        else:
            for r in self.batch_decoding:
                r.kv += 1
                r.generated += 1
                if r.generated >= r.output:
                    finished = True
        handoff: list[Request] = []
        for r, n in self.batch_chunks:
            r.prefilled += n
            r.kv = r.prefilled
            self.pending_prefill_tokens -= n
            if r.prefilled >= r.target:
                r.generated += 1
                if self.role is PoolRole.PREFILL and r.generated < r.output:
                    handoff.append(r)
                    continue
                if r.first_token_s < 0:
                    r.first_token_s = now
                if r.generated >= r.output:
                    finished = True
        if handoff:
            keep = set(map(id, handoff))
            self.running = [r for r in self.running if id(r) not in keep]
            for r in handoff:
                self.sim.handoff.prefilled(r, self, now)
        self._check_blocks()
        if finished:
            remaining: list[Request] = []
            for r in self.running:
                if r.generated >= r.output:
                    self._set_blocks(r, 0)
                    self.sim.finish(r, now)
                else:
                    remaining.append(r)
            self.running = remaining
        self.state = _IDLE
        self.batch_chunks = []
        self.batch_decoding = []
        if self.boundary_hooks:
            hooks, self.boundary_hooks = self.boundary_hooks, []
            for hook in hooks:
                hook(now)
        self._start(now)

    def _publish(self) -> None:
        loads, slot = self.loads, self.slot
        loads.waiting_requests[slot] = len(self.waiting) + len(self.incoming)
        loads.running_requests[slot] = len(self.running)
        loads.pending_prefill_tokens[slot] = self.pending_prefill_tokens
        loads.kv_used_tokens[slot] = self.used_blocks * self.block_size
