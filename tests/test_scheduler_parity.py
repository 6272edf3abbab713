"""The simulator's instance and the engine's scheduler make the same batch decisions.

One request sequence (arrivals counted in steps, prompt and output lengths), one KV capacity and
one scheduler setting are fed to a simulated replica (stepping every iteration) and to the real
engine (tiny random Llama on the CPU). Step by step, both must run the same requests with the
same token counts, preempt the same requests, keep the same running order and hold the same
number of KV blocks — in chunked and whole-prompt modes. Both call `policies.batching`, so this
tests what each side feeds it and how each applies its decisions.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from engine_helpers import TINY
from sim_samples import cluster, deployment, plan, pool, workload
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.engine import Engine, EngineConfig
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.scheduler import SchedulerOutput
from tessera.agents.engine.weights import random_llama_weights
from tessera.api.model_deployment import PoolRole
from tessera.api.scheduler import SchedulerConfig
from tessera.sim.instance import Instance, Request
from tessera.sim.simulation import DeploymentSetup, SimConfig, Simulation

BLOCK_SIZE = 4
KV_BLOCKS = 40
"""160 tokens of KV: four requests of ~80 tokens do not fit at once, so requests are preempted."""
MAX_CONTEXT = KV_BLOCKS * BLOCK_SIZE

ARRIVALS: dict[int, list[tuple[int, int]]] = {
    0: [(50, 30)],
    1: [(37, 12), (64, 25)],
    3: [(21, 40)],
    6: [(70, 8), (33, 33), (45, 20)],
    12: [(29, 16)],
    20: [(55, 30), (18, 5)],
    400: [(40, 10), (12, 3)],  # after everything drained: they find the replica idle
}
"""Before which step (counting steps that ran something) each (prompt, output) arrives."""

MODES = {
    "chunked": SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24),
    "whole-prompt": SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=96, enable_chunked_prefill=False
    ),
}


@dataclass(frozen=True)
class Step:
    """One step's batch decision, as both sides can report it."""

    tokens: dict[str, int]
    """Request id -> tokens it computes in the step."""
    preempted: tuple[str, ...]
    running: tuple[str, ...]
    """Running requests after the decision, in their scheduling order."""
    used_blocks: int


Arrivals = dict[int, list[tuple[int, int]]]


def _requests(arrivals: Arrivals) -> Iterator[tuple[int, str, int, int]]:
    """(arrival step, id, prompt, output) in arrival order."""
    rid = 0
    for step in sorted(arrivals):
        for prompt, output in arrivals[step]:
            yield step, f"r{rid}", prompt, output
            rid += 1


Group = tuple[int, list[tuple[str, int, int]]]
"""Requests (id, prompt, output) arriving before the step of that index."""


def _groups(arrivals: Arrivals) -> list[Group]:
    groups: dict[int, list[tuple[str, int, int]]] = {}
    for step, rid, prompt, output in _requests(arrivals):
        groups.setdefault(step, []).append((rid, prompt, output))
    return sorted(groups.items())


def engine_steps(scheduler: SchedulerConfig, arrivals: Arrivals) -> list[Step]:
    config = LlamaConfig.from_dict(dict(TINY, max_position_embeddings=512))
    weights = random_llama_weights(config, "cpu", torch.float32, seed=0)
    engine = Engine(
        config,
        weights,
        EngineConfig(
            device="cpu",
            block_size=BLOCK_SIZE,
            num_kv_blocks=KV_BLOCKS + 1,  # block 0 is the engine's scratch block
            scheduler=scheduler,
            use_cuda_graphs=False,
        ),
    )
    steps: list[Step] = []
    schedule = engine.scheduler.schedule

    def recorded() -> SchedulerOutput:
        out = schedule()
        if not out.empty:
            tokens = {seq.request_id: 1 for seq in out.decodes}
            tokens.update({seq.request_id: count for seq, count in out.prefills})
            steps.append(
                Step(
                    tokens,
                    tuple(seq.request_id for seq in out.preempted),
                    tuple(seq.request_id for seq in engine.scheduler.running),
                    engine.kv_cache.allocator.num_used,
                )
            )
        return out

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    groups = _groups(arrivals)
    while groups or engine.has_unfinished():
        if groups and (groups[0][0] <= len(steps) or not engine.has_unfinished()):
            group = _arriving(groups, len(steps), idle=not engine.has_unfinished())
            for rid, prompt, output in group:
                params = SamplingParams(max_new_tokens=output, ignore_eos=True)
                engine.add_request([5] * prompt, params, request_id=rid)
        engine.step()
    return steps


def _arriving(groups: list[Group], step: int, idle: bool) -> list[tuple[str, int, int]]:
    """The group arriving now. At an idle replica the first request starts a step at once,
    as it would in real time, and the rest of its group arrive during that step."""
    _, group = groups.pop(0)
    if idle and len(group) > 1:
        groups.insert(0, (step + 1, group[1:]))
        return group[:1]
    return group


def sim_steps(scheduler: SchedulerConfig, arrivals: Arrivals) -> list[Step]:
    requests = list(_requests(arrivals))
    load = workload(
        [float(i) for i in range(len(requests))],
        [prompt for _, _, prompt, _ in requests],
        [output for _, _, _, output in requests],
    )
    setup = DeploymentSetup(
        "parity",
        deployment(max_context_tokens=MAX_CONTEXT).spec,
        plan(pool(PoolRole.COLOCATED, "h100", 1)),
        {PoolRole.COLOCATED: scheduler},
    )
    options = SimConfig(
        fast_forward=False, block_size_tokens=BLOCK_SIZE, kv_capacity_tokens=MAX_CONTEXT
    )
    simulation = Simulation(cluster({"h100": 1}), [setup], [load], options)
    (instance,) = (i for d in simulation.deployments for p in d.pools for i in p.instances)
    steps: list[Step] = []

    def record() -> None:
        if instance.state == 0:  # idle: nothing was started
            return
        tokens = {f"r{r.rid}": 1 for r in instance.batch_decoding}
        tokens.update({f"r{r.rid}": n for r, n in instance.batch_chunks})
        steps.append(
            Step(
                tokens,
                tuple(f"r{r.rid}" for r in instance.batch_preempted),
                tuple(f"r{r.rid}" for r in instance.running),
                instance.used_blocks,
            )
        )

    def arrive(instance: Instance, group: list[tuple[str, int, int]], now: float) -> None:
        for rid, prompt, output in group:
            index = int(rid[1:])
            instance.enqueue(Request(index, 0, now, prompt, output), now)

    groups = _groups(arrivals)
    now = 0.0
    while groups or simulation.heap:
        if not simulation.heap:  # idle: the next arrival starts a step at once
            arrive(instance, _arriving(groups, len(steps), idle=True), now)
            record()
            continue
        at_s, _, target, version = heapq.heappop(simulation.heap)
        if groups and groups[0][0] <= len(steps):  # they arrive during the step
            arrive(instance, _arriving(groups, len(steps), idle=False), (now + at_s) / 2)
        now = at_s
        target.step_end(at_s, version)
        record()
    assert (simulation.finish_count == 1).all()
    return steps


def _assert_same_steps(scheduler: SchedulerConfig, arrivals: Arrivals) -> list[Step]:
    engine, simulated = engine_steps(scheduler, arrivals), sim_steps(scheduler, arrivals)
    for index, (ours, theirs) in enumerate(zip(engine, simulated, strict=False)):
        assert ours == theirs, f"step {index} differs"
    assert len(engine) == len(simulated)
    return engine


@pytest.mark.parametrize("mode", sorted(MODES))
def test_simulator_and_engine_form_the_same_batches(mode: str) -> None:
    scheduler = MODES[mode]
    engine = _assert_same_steps(scheduler, ARRIVALS)
    # The sequence exercises every rule: preemption, the batch cap, chunks or whole prompts.
    assert any(step.preempted for step in engine)
    assert max(len(step.running) for step in engine) == scheduler.max_num_seqs
    assert max(sum(step.tokens.values()) for step in engine) <= scheduler.max_num_batched_tokens
    prompts = {rid: prompt for _, rid, prompt, _ in _requests(ARRIVALS)}
    partial = any(1 < count < prompts[rid] for step in engine for rid, count in step.tokens.items())
    assert partial is scheduler.enable_chunked_prefill


@pytest.mark.parametrize("seed", range(3))
def test_random_sequences_give_the_same_batches(seed: int) -> None:
    """Lengths from one token up, batch caps from one, budgets from a few tokens."""
    rng = random.Random(seed)
    chunked = seed % 2 == 0
    scheduler = SchedulerConfig(
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(8, 64) if chunked else rng.randint(80, 200),
        enable_chunked_prefill=chunked,
    )
    arrivals: Arrivals = {}
    step = 0
    for _ in range(5):
        group = rng.randint(1, 3)
        arrivals[step] = [(rng.randint(1, 80), rng.randint(1, 30)) for _ in range(group)]
        step += rng.randint(1, 30)
    _assert_same_steps(scheduler, arrivals)
