"""The placement planner: a pure function from a ModelDeployment spec and the accelerator
classes on offer to a Plan.

It enumerates serving modes (colocated, with chunked prefill or whole prompts; disaggregated
prefill/decode with each pool on its own class and tensor-parallel degree; disaggregated with
attention offloaded to a memory pool), keeps the tensor-parallel degrees at which weights and a
longest request's KV cache fit, sizes each pool from the traffic and the roofline model, and
picks the cheapest candidate by the deployment's objective. Each candidate carries the
analytical reason it was sized so; the chosen one's reason becomes the plan's rationale. Each
pool of the plan records the engine scheduler it was scored with (chunk budget, batch cap), so
that the simulator and the operator run the plan as it was predicted.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from tessera.api.model_deployment import (
    ModelDeploymentSpec,
    Objective,
    Plan,
    PoolLoad,
    PoolPlan,
    PoolRole,
    ServingMode,
)
from tessera.policies.attainment import length_points, squared_cv
from tessera.policies.attention_offload import OffloadedDecodePerformance
from tessera.policies.capacity import ClassOffer
from tessera.policies.lengths import length_quantile, max_rate_for_latency, waiting_quantile_s
from tessera.policies.perfmodel import PREFILL_CHUNK_TOKENS, ReplicaPerformance
from tessera.policies.plan_attainment import Attainment, predict_attainment

TENSOR_PARALLEL_DEGREES = (1, 2, 4, 8)
ATTENTION_DEVICES = (1, 2, 4, 8)
"""Memory-pool devices per offloaded decode replica that the planner considers."""
TARGET_UTILIZATION = 0.8
"""Busy fraction a pool is sized for: headroom for bursts and queueing at the percentile."""
PREDICTED_CANDIDATES = 64
"""Most candidates whose attainment is predicted before the cheapest passing one is taken."""
GROWTH_REPLICAS = 4
"""Most replicas added to one candidate's pools to bring its predicted attainment up."""
SIMULATED_CANDIDATES = 3
"""Candidates (distinct layouts, cheapest first) an evaluator simulates."""


class PlanEvaluator(Protocol):
    """Measures a plan's SLO attainment, e.g. with a short simulation (tessera.sim.evaluate).

    Injected, so that the planner stays a pure function of its inputs and free of the
    simulator; an evaluator must be deterministic (seeded) for the same reason.
    """

    def __call__(self, spec: ModelDeploymentSpec, plan: Plan) -> float: ...


class InfeasiblePlanError(ValueError):
    """No allowed accelerator class can serve the deployment within its SLO and bounds."""


@dataclass(frozen=True)
class PoolSizing:
    """One pool option: a class, a TP degree and how much load one replica carries."""

    offer: ClassOffer
    performance: ReplicaPerformance | OffloadedDecodePerformance
    role: PoolRole
    requests_per_second_per_replica: float
    tokens_per_request: float
    predicted_latency_ms: float
    note: str

    attention_offer: ClassOffer | None = None
    """For an offloaded decode pool: the memory class its attention runs on."""
    prefill_scv: float = 0.0
    """Squared CV of this replica's prefill times over the prompt lengths (prefilling roles)."""
    prefill_chunk_tokens: int | None = None
    """Chunked-prefill token budget of the replica's engine; None: whole prompts."""

    @property
    def tensor_parallel(self) -> int:
        return self.performance.tensor_parallel

    @property
    def max_running_requests(self) -> int:
        """The engine's batch cap (max_num_seqs) the pool was sized with."""
        return self.performance.max_running_requests

    @property
    def scheduling(self) -> str:
        """How the replica's engine prefills, in words."""
        if self.prefill_chunk_tokens is None:
            return "whole prompts"
        return f"chunked prefill {self.prefill_chunk_tokens}"

    @property
    def attention_devices(self) -> int:
        if isinstance(self.performance, OffloadedDecodePerformance):
            return self.performance.attention_devices
        return 0

    def devices_per_replica(self) -> dict[str, int]:
        """Devices one replica takes, per class (an offloaded replica spans two classes)."""
        devices = {self.offer.name: self.tensor_parallel}
        if self.attention_offer is not None:
            name = self.attention_offer.name
            devices[name] = devices.get(name, 0) + self.attention_devices
        return devices

    def cost_per_replica_hour(self) -> float:
        cost = self.offer.spec.cost_per_hour * self.tensor_parallel
        if self.attention_offer is not None:
            cost += self.attention_offer.spec.cost_per_hour * self.attention_devices
        return cost

    def tdp_per_replica_w(self) -> float:
        power = self.offer.spec.tdp_w * self.tensor_parallel
        if self.attention_offer is not None:
            power += self.attention_offer.spec.tdp_w * self.attention_devices
        return power


@dataclass
class Candidate:
    """A whole plan under evaluation."""

    mode: ServingMode
    pools: list[tuple[PoolSizing, int]]
    ttft_ms: float
    tpot_ms: float
    notes: list[str] = field(default_factory=list)
    predicted: Attainment | None = None
    """Predicted fractions of requests meeting the SLO at the declared rate (once scored)."""
    simulated_attainment: float | None = None
    """Attainment a short simulation of the plan measured (once an evaluator scored it)."""

    growth: int = 0
    """Replicas added beyond the analytical sizing to meet the predicted attainment."""

    @property
    def attainment(self) -> float | None:
        return None if self.predicted is None else self.predicted.both

    @property
    def layout(self) -> tuple[object, ...]:
        """What distinguishes candidates apart from replica counts: mode, classes, TP, batch,
        prefill scheduling (all in the notes)."""
        return (self.mode, tuple(self.notes))

    @property
    def mode_label(self) -> str:
        """The serving mode, with how a colocated replica prefills (chunked or whole prompts)."""
        if self.mode is ServingMode.COLOCATED:
            return f"{self.mode.value}, {self.pools[0][0].scheduling}"
        return self.mode.value

    @property
    def cost_per_hour(self) -> float:
        return sum(s.cost_per_replica_hour() * replicas for s, replicas in self.pools)

    @property
    def power_w(self) -> float:
        return sum(s.tdp_per_replica_w() * replicas for s, replicas in self.pools)

    @property
    def accelerators(self) -> int:
        return sum(sum(s.devices_per_replica().values()) * n for s, n in self.pools)

    def score(self, objective: Objective) -> tuple[float, float]:
        primary = {
            Objective.COST: self.cost_per_hour,
            Objective.POWER: self.power_w,
            Objective.ACCELERATORS: float(self.accelerators),
        }[objective]
        return primary, self.cost_per_hour


def plan_deployment(
    spec: ModelDeploymentSpec,
    offers: Sequence[ClassOffer],
    evaluator: PlanEvaluator | None = None,
    *,
    chunked_prefill: bool | None = None,
) -> Plan:
    """The cheapest plan (by the spec's objective) that meets the SLO, or InfeasiblePlanError.

    Candidates are sized analytically, then scored cheapest first by predicted attainment
    (growing a pool when the prediction falls short of the target); with an evaluator the
    cheapest few survivors are simulated and the cheapest that meets the target wins.
    `chunked_prefill` keeps only colocated candidates that chunk (True) or prefill whole
    prompts (False); None keeps both.
    """
    candidates = enumerate_candidates(spec, offers, chunked_prefill=chunked_prefill)
    if not candidates:
        raise InfeasiblePlanError(explain_infeasible(spec, offers))
    return to_plan(choose_candidate(spec, candidates, evaluator), spec)


def choose_candidate(
    spec: ModelDeploymentSpec,
    candidates: Sequence[Candidate],
    evaluator: PlanEvaluator | None = None,
) -> Candidate:
    """The cheapest candidate meeting the attainment target: predicted, then simulated."""
    shortlist = shortlist_candidates(spec, candidates, SIMULATED_CANDIDATES if evaluator else 1)
    if evaluator is None:
        return shortlist[0]
    for candidate in shortlist:
        candidate.simulated_attainment = evaluator(spec, to_plan(candidate, spec))
    target = spec.slo.attainment_target
    for candidate in shortlist:
        if (candidate.simulated_attainment or 0.0) >= target:
            return candidate
    return max(shortlist, key=lambda c: c.simulated_attainment or 0.0)


def shortlist_candidates(
    spec: ModelDeploymentSpec, candidates: Sequence[Candidate], count: int
) -> list[Candidate]:
    """The `count` cheapest distinct layouts whose predicted attainment meets the target.

    Best-first over cost: a candidate predicted short of the target is re-queued with one more
    replica in its weaker pool (at its new cost), up to GROWTH_REPLICAS. When no candidate
    passes within PREDICTED_CANDIDATES, the best predicted one is returned alone.
    """
    target = spec.slo.attainment_target
    queue = [(c.score(spec.objective), index, c) for index, c in enumerate(candidates)]
    heapq.heapify(queue)
    counter = len(queue)
    shortlist: list[Candidate] = []
    seen: set[tuple[object, ...]] = set()
    examined: list[Candidate] = []
    while queue and len(shortlist) < count and len(examined) < PREDICTED_CANDIDATES:
        _, _, candidate = heapq.heappop(queue)
        if candidate.layout in seen:
            continue
        if candidate.predicted is None:
            candidate.predicted = predict_attainment(candidate, spec)
            examined.append(candidate)
        if candidate.predicted.both >= target:
            shortlist.append(candidate)
            seen.add(candidate.layout)
            continue
        grown = _grow(candidate, spec)
        if grown is not None:
            heapq.heappush(queue, (grown.score(spec.objective), counter, grown))
            counter += 1
    if not shortlist:
        return [max(examined, key=lambda c: c.attainment or 0.0)]
    return shortlist


def _grow(candidate: Candidate, spec: ModelDeploymentSpec) -> Candidate | None:
    """The candidate with one more replica in the pool that limits its predicted attainment."""
    assert candidate.predicted is not None
    if candidate.growth >= GROWTH_REPLICAS:
        return None
    replicas = [n for _, n in candidate.pools]
    weaker = 0 if candidate.predicted.ttft <= candidate.predicted.tpot else len(replicas) - 1
    if candidate.mode is not ServingMode.COLOCATED and candidate.predicted.both == 0.0:
        weaker = len(replicas) - 1  # a saturated decode pool stalls prefill too
    replicas[weaker] += 1
    pools = [(sizing, sizing.role) for sizing, _ in candidate.pools]
    grown = _bounded(pools, spec, candidate.mode, replicas)
    if not grown:
        return None
    return replace(grown[0], growth=candidate.growth + 1)


def ranked_candidates(
    spec: ModelDeploymentSpec, offers: Sequence[ClassOffer], top: int = 5
) -> list[Candidate]:
    """The best `top` candidates by the spec's objective, one per distinct layout, each with
    its predicted attainment (grown to the target where the prediction asked for it)."""
    return shortlist_candidates(spec, enumerate_candidates(spec, offers), top)


def allowed_offers(spec: ModelDeploymentSpec, offers: Sequence[ClassOffer]) -> list[ClassOffer]:
    allowed = set(spec.hardware.accelerator_classes)
    return [o for o in offers if not allowed or o.name in allowed]


def enumerate_candidates(
    spec: ModelDeploymentSpec,
    offers: Sequence[ClassOffer],
    *,
    chunked_prefill: bool | None = None,
) -> list[Candidate]:
    """Every feasible candidate plan, unsorted (colocated ones with chunked prefill and with
    whole prompts, or only those `chunked_prefill` asks for)."""
    usable = allowed_offers(spec, offers)
    colocated = [
        s
        for s in _sizings(spec, usable, PoolRole.COLOCATED)
        if chunked_prefill is None or chunked_prefill is (s.prefill_chunk_tokens is not None)
    ]
    prefill = [s for s in _sizings(spec, usable, PoolRole.PREFILL)]
    decode = [s for s in _sizings(spec, usable, PoolRole.DECODE)]
    mode = spec.serving_mode
    candidates: list[Candidate] = []
    if mode in (ServingMode.AUTO, ServingMode.COLOCATED):
        for sizing in colocated:
            candidates.extend(_bounded([(sizing, PoolRole.COLOCATED)], spec, ServingMode.COLOCATED))
    if mode in (ServingMode.AUTO, ServingMode.DISAGGREGATED):
        for p in prefill:
            for d in decode:
                pools = [(p, PoolRole.PREFILL), (d, PoolRole.DECODE)]
                candidates.extend(_bounded(pools, spec, ServingMode.DISAGGREGATED))
    if mode in (ServingMode.AUTO, ServingMode.ATTENTION_OFFLOAD):
        offloaded = list(_offloaded_sizings(spec, usable))
        for p in prefill:
            for d in offloaded:
                pools = [(p, PoolRole.PREFILL), (d, PoolRole.DECODE)]
                candidates.extend(_bounded(pools, spec, ServingMode.ATTENTION_OFFLOAD))
    return candidates


def _offloaded_sizings(
    spec: ModelDeploymentSpec, offers: Sequence[ClassOffer]
) -> Iterable[PoolSizing]:
    """Decode replicas on a compute class with attention on a memory class (Lamina)."""
    arch = spec.model.architecture
    for compute in offers:
        if compute.spec.kind == "CPU":
            continue
        for tp in TENSOR_PARALLEL_DEGREES:
            if tp > compute.spec.accelerators_per_node:
                break
            if compute.free_accelerators is not None and tp > compute.free_accelerators:
                break
            if ReplicaPerformance(arch, compute.spec, tp).kv_capacity_tokens <= 0:
                continue
            for memory in offers:
                for devices in ATTENTION_DEVICES:
                    if memory.free_accelerators is not None and devices > memory.free_accelerators:
                        break
                    if devices > memory.spec.accelerators_per_node:
                        break  # one replica's attention devices share a node (a host: one)
                    performance = OffloadedDecodePerformance(
                        arch, compute.spec, tp, memory.spec, devices
                    )
                    if not performance.fits():
                        continue
                    sizing = _size_replica(spec, compute, performance, PoolRole.DECODE)
                    if sizing is not None:
                        yield PoolSizing(
                            sizing.offer,
                            sizing.performance,
                            sizing.role,
                            sizing.requests_per_second_per_replica,
                            sizing.tokens_per_request,
                            sizing.predicted_latency_ms,
                            f"{sizing.note}, attention on {devices}x {memory.name}",
                            attention_offer=memory,
                        )


def _sizings(
    spec: ModelDeploymentSpec, offers: Iterable[ClassOffer], role: PoolRole
) -> Iterable[PoolSizing]:
    for offer in offers:
        for tp in TENSOR_PARALLEL_DEGREES:
            if tp > offer.spec.accelerators_per_node:
                break
            if offer.free_accelerators is not None and tp > offer.free_accelerators:
                break
            performance = ReplicaPerformance(spec.model.architecture, offer.spec, tp)
            if not performance.fits():
                continue
            sizing = _size_replica(spec, offer, performance, role)
            if sizing is None:
                continue
            yield sizing
            if role is PoolRole.COLOCATED:
                yield _with_whole_prompts(sizing)


def _with_whole_prompts(chunked: PoolSizing) -> PoolSizing:
    """The same colocated replica prefilling whole prompts (vLLM without chunked prefill): its
    own candidate, predicted separately (a whole prefill stalls every running decode).

    The analytical sizing is the same (it already stretches decode steps by the full prefill
    time of the mean prompt); the predicted attainment and growth tell the two apart.
    """
    whole = replace(chunked, prefill_chunk_tokens=None)
    prefix = f"{chunked.scheduling}, "
    return replace(whole, note=f"{whole.scheduling}, {chunked.note.removeprefix(prefix)}")


def _size_replica(
    spec: ModelDeploymentSpec,
    offer: ClassOffer,
    perf: ReplicaPerformance | OffloadedDecodePerformance,
    role: PoolRole,
) -> PoolSizing | None:
    """How many requests/s one replica carries in a role within the SLO, or None if it can't.

    TTFT is sized at the SLO percentile: the percentile prompt's prefill plus the percentile
    queueing delay; TPOT with the mean context (decode steps average over the batch).
    """
    prompt, output = spec.traffic.resolved_lengths()
    quantile = spec.slo.percentile / 100
    ttft_s = spec.slo.ttft_ms / 1000
    tpot_s = spec.slo.tpot_ms / 1000
    mean_context = prompt.mean + output.mean / 2
    if role is PoolRole.DECODE:
        return _size_decode(spec, offer, perf, role, tpot_s, mean_context, output.mean)
    # Only replicas that prefill (colocated, prefill) have a prefill time; offloaded ones don't.
    assert isinstance(perf, ReplicaPerformance)
    prefill_s = perf.prefill_time_s(int(prompt.mean))
    tail_prefill_s = perf.prefill_time_s(int(length_quantile(prompt, quantile)))
    if tail_prefill_s > ttft_s:
        return None
    scv = prefill_scv(perf, spec)
    if role is PoolRole.PREFILL:
        # The KV cache then crosses the network to a decode replica before the first token.
        tail_prompt = int(length_quantile(prompt, quantile))
        transfer_s = perf.kv_transfer_time_s(tail_prompt)
        extra_s = tail_prefill_s - prefill_s + transfer_s
        rate = max_rate_for_latency(prefill_s, extra_s, ttft_s, quantile, TARGET_UTILIZATION, scv)
        if rate <= 0:
            return None
        waiting_s = waiting_quantile_s(rate, prefill_s, quantile, scv)
        ttft_ms = (tail_prefill_s + transfer_s + waiting_s) * 1e3
        note = f"prefill {prefill_s * 1e3:.0f} ms/request at {rate * prefill_s:.0%} load"
        return PoolSizing(offer, perf, role, rate, prompt.mean, ttft_ms, note, prefill_scv=scv)
    # Colocated: continuous batching with prefills interleaved. Decode steps are stretched by
    # 1 / (1 - rate * prefill_s); a new prompt waits for queued prefills and the running step.
    decode = _size_decode(spec, offer, perf, role, tpot_s * 0.7, mean_context, output.mean)
    if decode is None:
        return None
    step_s = decode.predicted_latency_ms / 1e3
    rate_for_tpot = (1.0 - step_s / tpot_s) / prefill_s
    busy_per_request = 1.0 / decode.requests_per_second_per_replica * TARGET_UTILIZATION
    rate_for_load = TARGET_UTILIZATION / (busy_per_request + prefill_s)
    rate_for_ttft = max_rate_for_latency(
        prefill_s, tail_prefill_s - prefill_s + step_s, ttft_s, quantile, TARGET_UTILIZATION, scv
    )
    rate = min(rate_for_tpot, rate_for_load, rate_for_ttft)
    if rate <= 0:
        return None
    scheduling = f"chunked prefill {PREFILL_CHUNK_TOKENS}"
    note = f"{scheduling}, {decode.note}, prefill {prefill_s * 1e3:.0f} ms"
    latency_ms = decode.predicted_latency_ms
    return PoolSizing(
        offer,
        perf,
        role,
        rate,
        output.mean,
        latency_ms,
        note,
        prefill_scv=scv,
        prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
    )


def prefill_scv(perf: ReplicaPerformance, spec: ModelDeploymentSpec, points: int = 16) -> float:
    """Variability (squared CV) of prefill times over the prompt-length distribution: heavy
    tailed prompts make prefill queues wait longer than fixed-length ones at the same load."""
    prompt, _ = spec.traffic.resolved_lengths()
    return squared_cv([perf.prefill_time_s(n) for n in length_points(prompt, points)])


def _size_decode(
    spec: ModelDeploymentSpec,
    offer: ClassOffer,
    perf: ReplicaPerformance | OffloadedDecodePerformance,
    role: PoolRole,
    tpot_budget_s: float,
    mean_context: float,
    mean_output: float,
) -> PoolSizing | None:
    """Continuous-batching decode: the largest batch whose step fits the TPOT budget."""
    batch = perf.max_decode_batch_for_tpot(tpot_budget_s, mean_context)
    if batch == 0:
        return None
    step_s = perf.decode_step_time_s(batch, mean_context)
    rate = TARGET_UTILIZATION * batch / (mean_output * step_s)
    note = f"batch {batch} at {step_s * 1e3:.1f} ms/step"
    return PoolSizing(offer, perf, role, rate, mean_output, step_s * 1e3, note)


def _bounded(
    pools: list[tuple[PoolSizing, PoolRole]],
    spec: ModelDeploymentSpec,
    mode: ServingMode,
    replica_counts: Sequence[int] | None = None,
) -> list[Candidate]:
    """The candidate with replica counts sized to the traffic (or given), within bounds and
    capacity; empty when they do not allow it."""
    rate = spec.traffic.request_rate_per_second
    sized: list[tuple[PoolSizing, int]] = []
    used: dict[str, int] = {}
    for index, (sizing, role) in enumerate(pools):
        bounds = spec.pools.bounds(role)
        if replica_counts is not None:
            needed = replica_counts[index]
        else:
            needed = math.ceil(rate / sizing.requests_per_second_per_replica - 1e-9)
        replicas = max(needed, bounds.min_replicas, 1)
        if replicas > bounds.max_replicas:
            return []
        for name, devices in sizing.devices_per_replica().items():
            used[name] = used.get(name, 0) + replicas * devices
        sized.append((sizing, replicas))
    offers_by_name = {
        offer.name: offer
        for sizing, _ in sized
        for offer in (sizing.offer, sizing.attention_offer)
        if offer is not None
    }
    for name, count in used.items():
        free = offers_by_name[name].free_accelerators
        if free is not None and count > free:
            return []
    candidate = _candidate(sized, spec, mode)
    limit = spec.hardware.max_accelerators
    if limit is not None and candidate.accelerators > limit:
        return []
    return [candidate]


def _candidate(
    sized: list[tuple[PoolSizing, int]], spec: ModelDeploymentSpec, mode: ServingMode
) -> Candidate:
    if mode is ServingMode.COLOCATED:
        ((sizing, replicas),) = sized
        prompt, _ = spec.traffic.resolved_lengths()
        assert isinstance(sizing.performance, ReplicaPerformance)
        quantile = spec.slo.percentile / 100
        prefill_s = sizing.performance.prefill_time_s(int(prompt.mean))
        tail_prefill_s = sizing.performance.prefill_time_s(int(length_quantile(prompt, quantile)))
        rate = spec.traffic.request_rate_per_second / replicas
        step_s = sizing.predicted_latency_ms / 1e3
        waiting_s = waiting_quantile_s(rate, prefill_s, quantile, sizing.prefill_scv)
        ttft_ms = (tail_prefill_s + step_s + waiting_s) * 1e3
        # Prefills interleaved with decoding stretch each token by the time spent prefilling.
        tpot_ms = sizing.predicted_latency_ms / max(0.05, 1.0 - rate * prefill_s)
    else:
        (prefill, prefill_replicas), (decode, _) = sized[0], sized[1]
        prompt, _ = spec.traffic.resolved_lengths()
        assert isinstance(prefill.performance, ReplicaPerformance)
        quantile = spec.slo.percentile / 100
        prefill_s = prefill.performance.prefill_time_s(int(prompt.mean))
        tail_prompt = int(length_quantile(prompt, quantile))
        tail_prefill_s = prefill.performance.prefill_time_s(tail_prompt)
        rate = spec.traffic.request_rate_per_second / prefill_replicas
        transfer_s = prefill.performance.kv_transfer_time_s(tail_prompt)
        waiting_s = waiting_quantile_s(rate, prefill_s, quantile, prefill.prefill_scv)
        ttft_ms = (tail_prefill_s + waiting_s + transfer_s) * 1e3
        tpot_ms = decode.predicted_latency_ms
    notes = [f"{s.role.value} on {s.offer.name} TP{s.tensor_parallel}: {s.note}" for s, _ in sized]
    return Candidate(mode, sized, ttft_ms, tpot_ms, notes)


def to_plan(candidate: Candidate, spec: ModelDeploymentSpec) -> Plan:
    """The Plan (API status form) of a candidate, with its rationale."""
    rate = spec.traffic.request_rate_per_second
    pools: list[PoolPlan] = []
    for sizing, replicas in candidate.pools:
        per_replica = rate / replicas
        pools.append(
            PoolPlan(
                name=f"{sizing.role.value}-{sizing.offer.name}",
                role=sizing.role,
                accelerator_class=sizing.offer.name,
                tensor_parallel=sizing.tensor_parallel,
                replicas=replicas,
                predicted_load=PoolLoad(
                    request_rate_per_second=round(rate, 3),
                    tokens_per_second=round(rate * sizing.tokens_per_request, 1),
                    utilization=round(
                        TARGET_UTILIZATION * per_replica / sizing.requests_per_second_per_replica, 3
                    ),
                ),
                prefill_chunk_tokens=sizing.prefill_chunk_tokens,
                max_running_requests=sizing.max_running_requests,
            )
        )
        if sizing.attention_offer is not None:
            pools.append(
                PoolPlan(
                    name=f"attention-{sizing.attention_offer.name}",
                    role=PoolRole.ATTENTION,
                    accelerator_class=sizing.attention_offer.name,
                    tensor_parallel=sizing.attention_devices,
                    replicas=replicas,
                    predicted_load=None,
                    attention_for=pools[-1].name,
                )
            )
    rationale = (
        f"{candidate.mode.value}, cheapest by {spec.objective.value} "
        f"at {rate:g} req/s: " + "; ".join(candidate.notes)
    )
    if candidate.growth:
        rationale += f"; +{candidate.growth} replica(s) to reach the attainment target"
    target = spec.slo.attainment_target
    if candidate.attainment is not None and candidate.attainment < target:
        rationale += f"; predicted attainment {candidate.attainment:.1%} is below the target"
    if candidate.simulated_attainment is not None:
        rationale += f"; simulated attainment {candidate.simulated_attainment:.1%}"
    return Plan(
        mode=candidate.mode,
        pools=pools,
        cost_per_hour=round(candidate.cost_per_hour, 4),
        power_w=round(candidate.power_w, 1),
        predicted_ttft_ms=round(candidate.ttft_ms, 2),
        predicted_tpot_ms=round(candidate.tpot_ms, 3),
        predicted_attainment=_fraction(candidate.attainment),
        simulated_attainment=_fraction(candidate.simulated_attainment),
        rationale=rationale,
    )


def _fraction(value: float | None) -> float | None:
    return None if value is None else round(min(1.0, max(0.0, value)), 4)


def explain_infeasible(spec: ModelDeploymentSpec, offers: Sequence[ClassOffer]) -> str:
    """Why no plan exists: the first constraint that rules each allowed class out."""
    usable = allowed_offers(spec, offers)
    if not usable:
        names = ", ".join(spec.hardware.accelerator_classes) or "any"
        have = ", ".join(o.name for o in offers) or "none"
        return (
            f"no AcceleratorClass matches spec.hardware.acceleratorClasses ({names}); have: {have}"
        )
    arch = spec.model.architecture
    reasons: list[str] = []
    for offer in usable:
        largest_tp = min(offer.spec.accelerators_per_node, max(TENSOR_PARALLEL_DEGREES))
        if offer.free_accelerators is not None:
            largest_tp = min(largest_tp, offer.free_accelerators)
        if largest_tp < 1:
            reasons.append(f"{offer.name}: no free accelerators")
            continue
        perf = ReplicaPerformance(arch, offer.spec, largest_tp)
        if not perf.fits():
            need_gib = (
                arch.weight_bytes + arch.max_context_tokens * arch.kv_bytes_per_token
            ) / 2**30
            reasons.append(
                f"{offer.name}: model needs {need_gib:.0f} GiB (weights + one "
                f"{arch.max_context_tokens}-token KV cache) but TP{largest_tp} gives "
                f"{offer.spec.memory_gib * largest_tp:.0f} GiB"
            )
            continue
        prompt, _ = spec.traffic.resolved_lengths()
        prefill_ms = perf.prefill_time_s(int(prompt.mean)) * 1e3
        if prefill_ms > spec.slo.ttft_ms:
            reasons.append(
                f"{offer.name}: prefill of a {prompt.mean:.0f}-token prompt takes "
                f"{prefill_ms:.0f} ms at TP{largest_tp}, over slo.ttftMs {spec.slo.ttft_ms:g}"
            )
            continue
        _, output = spec.traffic.resolved_lengths()
        context = prompt.mean + output.mean / 2
        if perf.max_decode_batch_for_tpot(spec.slo.tpot_ms / 1000, context) == 0:
            step_ms = perf.decode_step_time_s(1, context) * 1e3
            reasons.append(
                f"{offer.name}: one decode step takes {step_ms:.1f} ms at TP{largest_tp}, "
                f"over slo.tpotMs {spec.slo.tpot_ms:g}"
            )
            continue
        reasons.append(
            f"{offer.name}: SLO is reachable but replica bounds, hardware.maxAccelerators or free "
            f"capacity do not allow {spec.traffic.request_rate_per_second:g} req/s"
        )
    return "no feasible plan: " + "; ".join(reasons)
