"""Live migration between two serving loops in this process, over a real TCP KV channel: the
request keeps decoding on the source during pre-copy, the tokens before and after the move are
exactly an unmigrated run's, and an abort at each stage leaves the request running on the
source and no block held on the target. (Two `tessera serve` processes and the router are in
test_migration.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from engine_helpers import TINY, random_prompts
from tessera.agents.engine import Engine, EngineConfig, LlamaConfig, SamplingParams
from tessera.agents.engine.kv_transport import TcpTransport
from tessera.agents.engine.migration import (
    PROTOCOL,
    MigrationConfig,
    MigrationReport,
    MigrationTarget,
    migrate_out,
)
from tessera.agents.engine.request import FinishReason
from tessera.agents.engine.serving_loop import ServingLoop, TokenEvent

PARAMS = SamplingParams(max_new_tokens=60, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=60, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)
CONFIG = MigrationConfig(answer_timeout_s=5.0, hold_s=0.5)


def tiny_engine(num_kv_blocks: int = 512) -> Engine:
    config = LlamaConfig.from_dict({**TINY, "max_position_embeddings": 1024})
    weights = random_llama_weights_cached(config)
    ec = EngineConfig(device="cpu", num_kv_blocks=num_kv_blocks, block_size=4)
    return Engine(config, weights, ec)


_WEIGHTS: dict[str, object] = {}


def random_llama_weights_cached(config: LlamaConfig) -> object:
    from tessera.agents.engine.weights import random_llama_weights

    if "w" not in _WEIGHTS:
        _WEIGHTS["w"] = random_llama_weights(config, "cpu", dtype=torch.float32, std=0.2, seed=4)
    return _WEIGHTS["w"]


class Collector:
    """A sink keeping each request's tokens; `done` is set when one finishes."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, FinishReason | None] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def __call__(self, event: TokenEvent) -> None:
        with self.lock:
            self.tokens.setdefault(event.request_id, []).extend(event.token_ids)
            if event.finished:
                self.finished[event.request_id] = event.finish_reason
                self.done.notify_all()

    def count(self, request_id: str) -> int:
        with self.lock:
            return len(self.tokens.get(request_id, []))

    def wait(self, request_id: str, deadline_s: float = 30.0) -> FinishReason | None:
        with self.done:
            assert self.done.wait_for(lambda: request_id in self.finished, deadline_s), request_id
            return self.finished[request_id]


@dataclass
class FakeAdoption:
    sink: Collector
    timeout_s: float | None = None
    ids: list[str] = field(default_factory=list)

    def adopted(self, request_id: str) -> None:
        self.ids.append(request_id)

    def discard(self) -> None:
        pass


@pytest.fixture
def loops() -> Iterator[tuple[ServingLoop, ServingLoop]]:
    source, target = ServingLoop(tiny_engine()), ServingLoop(tiny_engine())
    source.start()
    target.start()
    yield source, target
    source.stop()
    target.stop()


def expected_tokens(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [c.output_token_ids for c in tiny_engine().generate(prompts, params)]


def wait_for(condition: object, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.005)  # polling the loop's progress, with the deadline above
    raise AssertionError("condition not met before the deadline")


async def migrate(
    source: ServingLoop,
    target: ServingLoop,
    request_id: str,
    adoption: FakeAdoption,
    fault: str | None = None,
) -> tuple[MigrationReport, MigrationTarget]:
    async def adopter(begin: object, package: object) -> FakeAdoption:
        return adoption

    service = MigrationTarget(target, adopter, timeout_s=5.0)
    transport = TcpTransport(timeout_s=5.0)
    listener = await transport.listen("127.0.0.1", 0, service.handle)
    channel = await transport.connect(listener.address, 2.0)
    try:
        report = await migrate_out(source, request_id, channel, "target", {}, CONFIG, fault)
    finally:
        await channel.close()
    # The target's handler ends (and frees what it held) once the channel is gone.
    for _ in range(400):
        if not service.held_by_channel:
            break
        await asyncio.sleep(0.01)  # polling the handler's end, with the bound above
    await listener.close()
    return report, service


def kv_used(loop: ServingLoop) -> int:
    return loop.call(lambda engine: engine.kv_cache.allocator.num_used).result(5)


@pytest.mark.parametrize("params", [PARAMS, SEEDED], ids=["greedy", "seeded"])
def test_a_migrated_request_gives_exactly_the_unmigrated_tokens(
    loops: tuple[ServingLoop, ServingLoop], params: SamplingParams
) -> None:
    source, target = loops
    prompts = random_prompts([37, 22, 9], 128, seed=12)
    want = expected_tokens(prompts, params)
    on_source, on_target = Collector(), Collector()
    ids = [
        source.submit(p, params, on_source, request_id=f"r{i}").result(5)
        for i, p in enumerate(prompts)
    ]
    wait_for(lambda: on_source.count(ids[0]) >= 12)
    adoption = FakeAdoption(on_target)
    report, service = asyncio.run(migrate(source, target, ids[0], adoption))
    assert report.committed, report
    assert adoption.ids == [ids[0]] and service.committed == 1
    # Pre-copy did the bulk; the stop-and-copy moved a block or two while the request waited.
    assert report.precopy_stages >= 1 and report.precopy_blocks >= 10
    assert report.final_blocks <= 4
    assert report.num_output_tokens >= 12
    # The stall's stages, both sides' (the bench's breakdown), account for all of it.
    stages = report.stall_stages_ms
    own = ("pause", "handback", "send", "answer")
    assert set(stages) == {*own, "target_receive", "target_adopt", "target_import"}, stages
    assert sum(stages[k] for k in own) == pytest.approx(report.stall_s * 1e3, abs=0.05)
    assert all(ms >= 0 for ms in stages.values()), stages
    assert on_target.wait(ids[0]) is FinishReason.LENGTH
    for request_id in ids[1:]:
        on_source.wait(request_id)
    moved = on_source.tokens[ids[0]] + on_target.tokens[ids[0]]
    assert len(on_source.tokens[ids[0]]) == report.num_output_tokens
    assert moved == want[0]
    assert [on_source.tokens[r] for r in ids[1:]] == want[1:]
    assert ids[0] not in on_source.finished  # ended by the hand-off, not as a finished request
    wait_for(lambda: kv_used(source) == 0 and kv_used(target) == 0)


@pytest.mark.parametrize(
    ("fault", "stage"),
    [
        ("corrupt-precopy", "precopy"),
        ("corrupt-final", "commit"),
        ("drop-commit-answer", "commit"),
    ],
)
def test_an_aborted_migration_leaves_the_request_on_the_source(
    loops: tuple[ServingLoop, ServingLoop], fault: str, stage: str
) -> None:
    source, target = loops
    prompt = random_prompts([41], 128, seed=13)[0]
    want = expected_tokens([prompt], PARAMS)[0]
    on_source, on_target = Collector(), Collector()
    request_id = source.submit(prompt, PARAMS, on_source, request_id="r").result(5)
    wait_for(lambda: on_source.count(request_id) >= 6)
    adoption = FakeAdoption(on_target)
    report, service = asyncio.run(migrate(source, target, request_id, adoption, fault))
    assert not report.committed and report.stage == stage, report
    assert on_source.wait(request_id) is FinishReason.LENGTH
    assert on_source.tokens[request_id] == want
    if fault == "drop-commit-answer":
        # The target took it and the source never heard: the serving layer aborts the copy
        # nobody attaches to; here the test does.
        assert adoption.ids == [request_id]
        target.abort(request_id)
    else:
        assert adoption.ids == [] and service.committed == 0
    wait_for(lambda: kv_used(source) == 0 and kv_used(target) == 0)


def test_a_target_without_room_refuses_and_holds_nothing() -> None:
    source, target = ServingLoop(tiny_engine()), ServingLoop(tiny_engine(num_kv_blocks=12))
    source.start()
    target.start()
    try:
        prompt = random_prompts([70], 128, seed=14)[0]
        want = expected_tokens([prompt], PARAMS)[0]
        on_source = Collector()
        request_id = source.submit(prompt, PARAMS, on_source).result(5)
        wait_for(lambda: on_source.count(request_id) >= 5)
        report, _ = asyncio.run(migrate(source, target, request_id, FakeAdoption(Collector())))
        assert not report.committed and report.stage == "precopy"
        assert "KV blocks" in report.reason
        assert on_source.wait(request_id) is FinishReason.LENGTH
        assert on_source.tokens[request_id] == want
        wait_for(lambda: kv_used(source) == 0 and kv_used(target) == 0)
    finally:
        source.stop()
        target.stop()


def test_a_request_that_is_not_decoding_is_not_migrated(
    loops: tuple[ServingLoop, ServingLoop],
) -> None:
    source, target = loops
    report, _ = asyncio.run(migrate(source, target, "nobody", FakeAdoption(Collector())))
    assert not report.committed and report.stage == "begin"
    assert "not decoding" in report.reason


def test_a_begin_whose_prompt_is_not_in_the_vocabulary_is_refused(
    loops: tuple[ServingLoop, ServingLoop],
) -> None:
    """The commit imports without scanning the prompt (its ids were checked at begin, off the
    stall's path): a bad id must still be refused, at begin, before any block is taken."""
    _, target = loops
    geometry = target.call(lambda engine: engine.kv_geometry).result(5)
    vocab = target.engine.config.vocab_size

    async def begin() -> dict[str, object]:
        async def adopter(begin: object, package: object) -> FakeAdoption:
            raise AssertionError("a refused begin is never adopted")

        service = MigrationTarget(target, adopter, timeout_s=5.0)
        transport = TcpTransport(timeout_s=5.0)
        listener = await transport.listen("127.0.0.1", 0, service.handle)
        channel = await transport.connect(listener.address, 2.0)
        try:
            await channel.send_message(
                {
                    "type": "begin",
                    "protocol": PROTOCOL,
                    "request_id": "bad",
                    "geometry": dataclasses.asdict(geometry),
                    "prompt_token_ids": [1, 2, vocab, 3],
                    "serving": {},
                }
            )
            return await channel.receive_message()
        finally:
            await channel.close()
            await listener.close()

    answer = asyncio.run(begin())
    assert "outside the vocabulary" in str(answer.get("error")), answer
    assert kv_used(target) == 0
