"""A serving instance (one replica): continuous batching at iteration level over a paged KV
cache, the way vLLM's scheduler works, with Sarathi-style chunked prefill as an option.

- Requests are admitted first-come-first-served when the blocks for their whole prompt are free
  (vLLM allocates a prompt's blocks at admission) and the batch has room (`max_num_seqs`).
- Without chunked prefill an iteration is either prefills (whole prompts, up to the token
  budget) or one decode token for every running request, prefills first (vLLM v0 default).
- With chunked prefill every iteration decodes every running request and fills the rest of the
  token budget with prompt chunks (Sarathi-Serve; vLLM's chunked-prefill scheduler).
- A decode step that needs a block when none is free preempts the most recently admitted
  request by recomputation: its blocks are freed and it prefills again (prompt + the tokens it
  had generated) when memory allows; a decode-role instance sends it back to the prefill pool.
- Roles: colocated (prefill and decode), prefill (hands a request off after its first token;
  keeps its KV blocks until the transfer out completes), decode (receives requests with their
  KV, reserving blocks before the transfer starts). An attention-offloaded decode replica is a
  decode instance whose performance model is policies.attention_offload's.

Runs of identical decode iterations are one event (see stepcost.DecodeCurve); an arrival ends a
run at the end of the iteration in progress, as a real scheduler would admit it there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessera.api.model_deployment import PoolRole
from tessera.policies.dispatch import InstanceLoads
from tessera.policies.perfmodel import PrefillChunk
from tessera.sim.stepcost import DecodeCurve, StepCost

if TYPE_CHECKING:
    from tessera.sim.engine import Simulation
    from tessera.sim.metrics import PowerTrack


class KvOvercommitError(AssertionError):
    """An instance holds more KV-cache blocks than it has: a simulator bug, never a result."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine scheduler settings of an instance (vLLM's names where they exist)."""

    chunked_prefill: bool = False
    token_budget: int = 8192
    """max_num_batched_tokens: tokens per iteration (prompt chunks + decodes)."""
    max_num_seqs: int | None = None
    """Requests running at once; None: the performance model's `max_running_requests`."""
    block_size_tokens: int = 16
    kv_capacity_tokens: int | None = None
    """Override of the performance model's KV capacity (tests use it to force preemption)."""
    fast_forward: bool = True
    """Sum runs of decode iterations in closed form; False steps every iteration (slow, exact)."""


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
        config: SchedulerConfig,
        loads: InstanceLoads,
        slot: int,
        power: PowerTrack,
        network_gbps: float,
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
        self.config = config
        self.loads = loads
        self.slot = slot
        self.power = power
        self.network_gbps = network_gbps
        self.block_size = config.block_size_tokens
        self.max_num_seqs = config.max_num_seqs or cost.perf.max_running_requests
        capacity = config.kv_capacity_tokens
        if capacity is None:
            capacity = cost.perf.kv_capacity_tokens
        self.total_blocks = capacity // self.block_size
        self.used_blocks = 0
        self.growth_blocks = 0
        """Blocks the iteration (or run) in progress will add as its decodes grow."""
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
        self.run_curve: DecodeCurve | None = None
        self.run_start_total = 0
        self.run_steps = 0
        self.run_cut = False
        self.busy_compute_s = 0.0
        self.iterations = 0

    # ---- requests in ------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks neither held nor promised to the decode tokens of the iteration in progress."""
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
        self.used_blocks -= request.blocks
        request.blocks = 0
        self._publish()
        self._kick(now)

    # ---- scheduling -------------------------------------------------------------------
    def _kick(self, now: float) -> None:
        if self.state == _IDLE:
            self._start(now)
        elif self.state == _RUN and not self.run_cut:
            self._cut_run(now)

    def _pull(self, now: float, reserved_blocks: int = 0) -> None:
        """Start the transfers of incoming requests, in order, while their blocks are free
        beyond `reserved_blocks` (the next decode step's growth: running requests first)."""
        size = self.block_size
        while self.incoming:
            request = self.incoming[0]
            need = -(-request.kv // size)
            if need > self.free_blocks - reserved_blocks:
                break
            self.incoming.popleft()
            self.used_blocks += need
            self._check_blocks()
            self.sim.start_transfer(request, self, need, now)
        self._publish()

    def _admit(self, request: Request, reserved_blocks: int = 0) -> bool:
        """Admit the head of the waiting queue if its prompt's blocks are free beyond those
        `reserved_blocks` this iteration's decodes will take."""
        need = -(-request.target // self.block_size)
        if need > self.free_blocks - reserved_blocks:
            return False
        self.waiting.popleft()
        request.blocks = need
        self.used_blocks += need
        self._check_blocks()
        self.running.append(request)
        return True

    def _check_blocks(self) -> None:
        if self.used_blocks > self.total_blocks:
            raise KvOvercommitError(
                f"{self.name}: {self.used_blocks} KV blocks in use of {self.total_blocks}"
            )
        if self.used_blocks > self.peak_used_blocks:
            self.peak_used_blocks = self.used_blocks

    def _preempt(self, now: float) -> Request:
        victim = self.running.pop()
        self.used_blocks -= victim.blocks
        victim.blocks = 0
        victim.kv = 0
        victim.prefilled = 0
        victim.target = victim.prompt + victim.generated
        victim.preemptions += 1
        self.sim.preemptions += 1
        if self.role is PoolRole.DECODE:
            self.sim.reprefill(victim, now)
        else:
            self.waiting.appendleft(victim)
            self.pending_prefill_tokens += victim.target
        return victim

    def _decoding_with_blocks(self, now: float) -> tuple[list[Request], int]:
        """Running requests past prefill, after preempting until one more token fits each;
        and the blocks that token will take."""
        size = self.block_size
        decoding = [r for r in self.running if r.prefilled >= r.target]
        need = sum(1 for r in decoding if r.kv % size == 0)
        while need > self.free_blocks:
            victim = self.running[-1]
            if decoding and decoding[-1] is victim:
                decoding.pop()
                if victim.kv % size == 0:
                    need -= 1
            # A victim still prefilling frees blocks without changing `need`.
            self._preempt(now)
        return decoding, need

    def _start(self, now: float) -> None:
        config = self.config
        chunks: list[tuple[Request, int]] = []
        decoding: list[Request] = []
        if self.role is PoolRole.DECODE:
            decoding, reserved = self._decoding_with_blocks(now)
            if self.incoming:
                self._pull(now, reserved)
        elif config.chunked_prefill:
            decoding, reserved = self._decoding_with_blocks(now)
            budget = config.token_budget - len(decoding)
            for request in self.running:
                if budget <= 0:
                    break
                if request.prefilled < request.target:
                    n = min(request.target - request.prefilled, budget)
                    chunks.append((request, n))
                    budget -= n
            while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                if not self._admit(request, reserved):
                    break
                n = min(request.target, budget)
                chunks.append((request, n))
                budget -= n
        else:
            tokens = 0
            while self.waiting and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                if chunks and tokens + request.target > config.token_budget:
                    break
                if not self._admit(request):
                    break
                chunks.append((request, request.target))
                tokens += request.target
            if not chunks:
                decoding, _ = self._decoding_with_blocks(now)
        if chunks:
            self._start_batch(now, chunks, decoding)
        elif decoding:
            self._start_run(now, decoding)
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
        size = self.block_size
        self.growth_blocks = sum(1 for r in decoding if r.kv % size == 0)
        self.busy_compute_s = time_s if compute_bound else 0.0
        self.version += 1
        self.sim.schedule(now + time_s, self, self.version)

    def _start_run(self, now: float, decoding: list[Request]) -> None:
        steps = min(r.output - r.generated for r in decoding)
        free = self.free_blocks
        if not self.config.fast_forward:
            steps = 1
        elif steps > 1 and self._new_blocks(decoding, steps) > free:
            low, high = 1, steps  # largest step count whose block growth fits
            while low < high:
                middle = (low + high + 1) // 2
                if self._new_blocks(decoding, middle) <= free:
                    low = middle
                else:
                    high = middle - 1
            steps = low
        self.state = _RUN
        self.started_s = now
        self.batch_decoding = decoding
        self.run_steps = steps
        self.growth_blocks = self._new_blocks(decoding, steps)
        self.run_cut = steps == 1
        self.version += 1
        if self.config.fast_forward:
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
        self.sim.schedule(now + time_s, self, self.version)

    def _new_blocks(self, decoding: list[Request], steps: int) -> int:
        size = self.block_size
        return sum(-(-(r.kv + steps) // size) - r.blocks for r in decoding)

    def _cut_run(self, now: float) -> None:
        """End the run after the iteration in progress, so that new work joins the next one."""
        curve = self.run_curve
        self.run_cut = True
        if curve is None:
            return
        steps = curve.steps_until(self.run_start_total, self.run_steps, now - self.started_s)
        if steps >= self.run_steps:
            return
        self.run_steps = steps
        self.growth_blocks = self._new_blocks(self.batch_decoding, steps)
        time_s, self.busy_compute_s = curve.run(self.run_start_total, steps)
        self.version += 1
        self.sim.schedule(max(now, self.started_s + time_s), self, self.version)

    # ---- iteration end ----------------------------------------------------------------
    def step_end(self, now: float, version: int) -> None:
        """The iteration (or run) in progress ended; apply it and start the next."""
        if version != self.version:
            return
        size = self.block_size
        finished = False
        self.growth_blocks = 0
        self.power.add_busy(self.started_s, now, self.busy_compute_s)
        if self.state == _RUN:
            steps = self.run_steps
            self.iterations += steps
            for r in self.batch_decoding:
                r.kv += steps
                r.generated += steps
                blocks = -(-r.kv // size)
                self.used_blocks += blocks - r.blocks
                r.blocks = blocks
                if r.generated >= r.output:
                    finished = True
        else:
            self.iterations += 1
            for r in self.batch_decoding:
                r.kv += 1
                r.generated += 1
                blocks = -(-r.kv // size)
                self.used_blocks += blocks - r.blocks
                r.blocks = blocks
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
                    self.sim.prefilled(r, self, now)
        self._check_blocks()
        if finished:
            remaining: list[Request] = []
            for r in self.running:
                if r.generated >= r.output:
                    self.used_blocks -= r.blocks
                    r.blocks = 0
                    self.sim.finish(r, now)
                else:
                    remaining.append(r)
            self.running = remaining
        self.state = _IDLE
        self.batch_chunks = []
        self.batch_decoding = []
        self._start(now)

    def _publish(self) -> None:
        loads, slot = self.loads, self.slot
        loads.waiting_requests[slot] = len(self.waiting) + len(self.incoming)
        loads.running_requests[slot] = len(self.running)
        loads.pending_prefill_tokens[slot] = self.pending_prefill_tokens
        loads.kv_used_tokens[slot] = self.used_blocks * self.block_size
