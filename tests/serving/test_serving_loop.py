"""The engine's real-time serving loop on its own thread: tokens, queue bound, aborts, deadlines."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest
import torch
from engine_helpers import TINY, random_prompts
from tessera.agents.engine import Engine, EngineConfig, LlamaConfig, SamplingParams
from tessera.agents.engine.request import FinishReason
from tessera.agents.engine.serving_loop import QueueFullError, ServingLoop, TokenEvent
from tessera.agents.engine.weights import random_llama_weights


def tiny_engine(num_kv_blocks: int = 64) -> Engine:
    config = LlamaConfig.from_dict({**TINY, "max_position_embeddings": 1024})
    weights = random_llama_weights(config, "cpu", dtype=torch.float32, std=0.2)
    return Engine(config, weights, EngineConfig(device="cpu", num_kv_blocks=num_kv_blocks))


class Collector:
    """A sink that keeps each request's events, and a queue of finished request ids."""

    def __init__(self) -> None:
        self.events: dict[str, list[TokenEvent]] = {}
        self.done: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()

    def __call__(self, event: TokenEvent) -> None:
        with self.lock:
            self.events.setdefault(event.request_id, []).append(event)
        if event.finished:
            self.done.put(event.request_id)

    def tokens(self, request_id: str) -> list[int]:
        return [t for e in self.events.get(request_id, []) for t in e.token_ids]

    def last(self, request_id: str) -> TokenEvent:
        return self.events[request_id][-1]


@pytest.fixture
def loop() -> Iterator[ServingLoop]:
    serving = ServingLoop(tiny_engine(), max_waiting=4)
    serving.start()
    yield serving
    serving.stop()


def test_tokens_from_many_threads_equal_a_batch_run(loop: ServingLoop) -> None:
    prompts = random_prompts([5, 17, 9, 30], TINY["vocab_size"])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [c.output_token_ids for c in tiny_engine().generate(prompts, params)]
    sink = Collector()
    ids: list[str] = []
    threads = [
        threading.Thread(
            target=lambda p=prompt: ids.append(loop.submit(p, params, sink).result(timeout=10))
        )
        for prompt in prompts
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    finished = {sink.done.get(timeout=20) for _ in prompts}
    assert finished == set(ids)
    assert not any(i in loop.engine.requests for i in ids)  # finished requests left
    got = sorted(sink.tokens(i) for i in ids)
    assert got == sorted(expected)
    assert all(sink.last(i).finish_reason is FinishReason.LENGTH for i in ids)


def test_a_full_queue_refuses_at_once_without_losing_the_queued() -> None:
    serving = ServingLoop(tiny_engine(), max_waiting=3)  # not started: nothing drains
    sink = Collector()
    params = SamplingParams(max_new_tokens=2)
    futures = [serving.submit([3, 4, 5], params, sink) for _ in range(3)]
    with pytest.raises(QueueFullError, match="3 requests"):
        serving.submit([3, 4, 5], params, sink)
    serving.start()
    try:
        assert {f.result(timeout=10) for f in futures} == {f.result() for f in futures}
        for _ in futures:
            sink.done.get(timeout=10)
        assert serving.submit([3, 4, 5], params, sink).result(timeout=10)
    finally:
        serving.stop()


def test_abort_frees_the_kv_and_ends_the_stream(loop: ServingLoop) -> None:
    sink = Collector()
    first_token = threading.Event()

    def watch(event: TokenEvent) -> None:
        sink(event)
        if event.token_ids:
            first_token.set()

    params = SamplingParams(max_new_tokens=900, ignore_eos=True)
    request_id = loop.submit(list(range(3, 40)), params, watch).result(timeout=10)
    assert first_token.wait(timeout=10)
    loop.abort(request_id)
    assert sink.done.get(timeout=10) == request_id
    assert sink.last(request_id).finish_reason is FinishReason.ABORTED
    assert len(sink.tokens(request_id)) < 900
    assert loop.engine.kv_cache.allocator.num_used == 0
    assert request_id not in loop.engine.requests


def test_a_request_past_its_deadline_is_ended_and_its_kv_freed(loop: ServingLoop) -> None:
    sink = Collector()
    params = SamplingParams(max_new_tokens=900, ignore_eos=True)
    request_id = loop.submit([3, 4, 5], params, sink, timeout_s=0.05).result(timeout=10)
    assert sink.done.get(timeout=10) == request_id
    last = sink.last(request_id)
    assert last.timed_out and last.finish_reason is FinishReason.ABORTED
    assert loop.engine.kv_cache.allocator.num_used == 0


def test_the_engines_refusal_reaches_the_submitter(loop: ServingLoop) -> None:
    too_long = [5] * 1024
    with pytest.raises(ValueError, match="max_model_len"):
        loop.submit(too_long, SamplingParams(), Collector()).result(timeout=10)
    with pytest.raises(ValueError, match="vocabulary"):
        loop.submit([10**6], SamplingParams(), Collector()).result(timeout=10)


def test_an_import_waits_for_free_blocks_and_continues_the_request() -> None:
    source = tiny_engine()
    prompt = random_prompts([21], TINY["vocab_size"], seed=5)[0]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = tiny_engine().generate([prompt], params)[0].output_token_ids
    request_id = source.add_request(prompt, params, request_id="moved")
    source.step()  # prefill and first token
    package = source.export_kv(request_id)

    target = tiny_engine(num_kv_blocks=8)
    serving = ServingLoop(target, max_waiting=8)  # driven here, step by step
    sink = Collector()
    capacity_tokens = target.kv_cache.allocator.capacity * target.kv_cache.block_size
    filler = serving.submit([7] * (capacity_tokens - 8), SamplingParams(max_new_tokens=4), sink)
    serving.run_once()
    assert filler.done()
    admitted = serving.submit_import(package, sink)
    serving.run_once()
    assert not admitted.done(), "the import took blocks the running request needs"
    serving.abort(filler.result())
    serving.run_once()
    assert admitted.result() == "moved"
    while serving.has_work():
        serving.run_once()
    assert package.output_token_ids + sink.tokens("moved") == expected
    assert sink.last("moved").finish_reason is FinishReason.LENGTH
    assert target.kv_cache.allocator.num_used == 0


def test_a_failing_iteration_fails_its_requests_and_the_loop_serves_on() -> None:
    failures = iter([RuntimeError("metrics exporter broke")])

    def report(snapshot: object) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    serving = ServingLoop(tiny_engine(), on_iteration=report)
    sink = Collector()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = serving.submit([3, 4, 5], params, sink)
    serving.start()
    try:
        assert sink.done.get(timeout=10) == first.result(timeout=10)
        failed = sink.last(first.result())
        assert failed.finish_reason is FinishReason.ERROR and "metrics exporter" in str(
            failed.error
        )
        assert serving.alive
        second = serving.submit([3, 4, 5], params, sink).result(timeout=10)
        assert sink.done.get(timeout=10) == second
        assert len(sink.tokens(second)) == 6
        assert serving.engine.kv_cache.allocator.num_used == 0
    finally:
        serving.stop()
    assert not serving.alive
