"""Host time per live stream per decode step, by part (CPU only, seconds).

On the H200 a decode server at ~70 live streams spent ~100 us per stream per step off the GPU
(notes/B2-to-lead-diagnosis.md): the engine thread's per-sequence Python and the event loop's
per-token work, sharing one GIL. This bench isolates that work: a ServingLoop over an engine
whose forward is a stub (the decode graph's place: it returns prepared logits at once), driven
one step at a time from an asyncio loop whose streams consume their tokens the way
`sse_events` does (Generation.deltas + StreamChunkText.sse), so that only host work is timed.

Parts, each in us per live stream per decode step:
- schedule: Scheduler.schedule (the batching policy's views and its decision)
- prepare: Engine._execute's inputs (ids, positions, slots, block tables, lengths)
- graph_load: DecodeGraphRunner.load, those inputs into the graph's static buffers (CPU here)
- sample: sampling.sample (argmax + .tolist())
- apply: Engine._apply without sample (appending tokens, stop checks, RequestOutputs)
- step_other: the rest of Engine.step (stats)
- dispatch: ServingLoop.run_once without Engine.step (TokenEvents, sinks, stats snapshot)
- client: the event loop's side (hand-off flush, queues, deltas, detokenizing, SSE text)

    python bench/host_step_overhead.py --out DIR          # a table; DIR/host_step_overhead.json
    python bench/host_step_overhead.py --smoke --out DIR  # fewer steps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (makes `tessera` importable from a bare checkout)
import torch
from model_shapes import tiny_llama_config

CORPUS = (
    "The engine keeps a paged key value cache, batches requests continuously and chunks "
    "prompts. Prefill is compute bound and decode is memory bound; the cheapest hardware "
    "for one is rarely the cheapest for the other. Once upon a time a small robot learned "
    "to count tokens, one at a time, very quickly."
)
PARTS = ("schedule", "prepare", "graph_load", "sample", "apply", "step_other", "dispatch", "client")


def make_tokenizer(folder: Path) -> Any:
    """A BPE tokenizer trained here (nothing is downloaded), as the server wraps it."""
    from tessera.agents.serving.tokenizer import ServingTokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([CORPUS] * 8, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return ServingTokenizer.from_folder(folder)


class Timer:
    """Accumulated ns per part; `wrap` times a callable into a part."""

    def __init__(self) -> None:
        self.ns = dict.fromkeys((*PARTS, "step", "run_once", "forward"), 0)
        self.on = False

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            started = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns[part] += time.perf_counter_ns() - started

        return timed


class StubGraphs:
    """The decode graph runner's place: its real `load` (the step's inputs copied into its
    static buffers, here CPU ones), then one of a few prepared logits instead of a replay
    (greedy picks vary per row and step, so text and stop checks do real work)."""

    def __init__(self, batch: int, vocab: int, width: int, timer: Timer) -> None:
        generator = torch.Generator().manual_seed(0)
        self.max_batch = batch
        self.width = width
        self.input_ids = torch.zeros(batch, dtype=torch.long)
        self.positions = torch.zeros(batch, dtype=torch.long)
        self.slot_mapping = torch.zeros(batch, dtype=torch.long)
        self.block_tables = torch.zeros(batch, width, dtype=torch.int32)
        self.context_lens = torch.zeros(batch, dtype=torch.int32)
        self._logits = [torch.randn(batch, vocab, generator=generator) for _ in range(7)]
        self._step = 0
        self.timer = timer

    def bucket(self, batch: int) -> int:
        return self.max_batch

    def run(self, *inputs: Any) -> Any:
        from tessera.agents.engine.cuda_graphs import DecodeGraphRunner

        started = time.perf_counter_ns()
        DecodeGraphRunner.load(self, *inputs)  # type: ignore[arg-type]
        loaded = time.perf_counter_ns()
        self._step += 1
        logits = self._logits[self._step % len(self._logits)][: len(inputs[0])]
        self.timer.ns["graph_load"] += loaded - started
        self.timer.ns["forward"] += time.perf_counter_ns() - started
        return logits


async def measure(batch: int, steps: int, warm_steps: int) -> dict[str, Any]:
    from tessera.agents.engine import engine as engine_module
    from tessera.agents.engine.engine import Engine, EngineConfig
    from tessera.agents.engine.request import SamplingParams
    from tessera.agents.engine.scheduler import SchedulerConfig
    from tessera.agents.engine.serving_loop import ServingLoop
    from tessera.agents.engine.weights import random_llama_weights
    from tessera.agents.serving.generation import Generation
    from tessera.agents.serving.metrics import ServingMetrics
    from tessera.agents.serving.protocol import StreamChunkText

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(Path(folder))
    vocab = tokenizer.tokenizer.get_vocab_size()
    config = tiny_llama_config(vocab, 4096, eos_token_ids=(2,))
    weights = random_llama_weights(config, "cpu", torch.float32)
    total_steps = warm_steps + steps + 8
    engine = Engine(
        config,
        weights,
        EngineConfig(
            num_kv_blocks=batch * (total_steps // 16 + 4),
            scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192),
        ),
    )
    timer = Timer()
    width = config.max_position_embeddings // engine.kv_cache.block_size
    engine.graphs = StubGraphs(batch, vocab, width, timer)  # type: ignore[assignment]
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    engine._execute = timer.wrap("prepare", engine._execute)  # type: ignore[method-assign]
    engine._apply = timer.wrap("apply", engine._apply)  # type: ignore[method-assign]
    engine.step = timer.wrap("step", engine.step)  # type: ignore[method-assign]
    real_sample = engine_module.sample
    engine_module.sample = timer.wrap("sample", real_sample)  # type: ignore[assignment]
    metrics = ServingMetrics("bench", "bench", "colocated")
    loop = ServingLoop(engine, max_waiting=batch, on_iteration=metrics.observe_engine)
    loop.run_once = timer.wrap("run_once", loop.run_once)  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=total_steps, ignore_eos=True)
    prompt = tokenizer.encode(CORPUS)[:24]
    generations = [
        Generation(loop, tokenizer, metrics, prompt, params, [], None) for _ in range(batch)
    ]
    sent = [0]

    async def consume(generation: Generation) -> None:
        chunks = StreamChunkText(False, generation.request_id, 0, "bench")
        async for delta in generation.deltas():
            if delta.text or delta.finish_reason is not None:
                chunks.sse(delta.text, delta.finish_reason, None)
                sent[0] += 1

    tasks = [asyncio.create_task(consume(g)) for g in generations]
    await asyncio.sleep(0)
    try:
        for step in range(warm_steps + steps):
            measuring = step >= warm_steps
            timer.on = measuring
            loop.run_once()
            started = time.perf_counter_ns()
            # The event loop's turn: until every stream has taken what this step made.
            for _ in range(4):
                await asyncio.sleep(0)
            if measuring:
                timer.ns["client"] += time.perf_counter_ns() - started
            if step == warm_steps - 1:
                running = engine.scheduler.num_running
                if running != batch:
                    raise RuntimeError(f"{running} of {batch} streams decode after warm-up")
    finally:
        engine_module.sample = real_sample  # type: ignore[assignment]
        for task in tasks:
            task.cancel()
        loop.shutdown()
    ns = timer.ns
    ns["apply"] -= ns["sample"]
    ns["prepare"] -= ns["forward"]
    ns["step_other"] = ns["step"] - ns["schedule"] - ns["prepare"] - ns["forward"]
    ns["forward"] -= ns["graph_load"]
    ns["step_other"] -= ns["sample"] + ns["apply"]
    ns["dispatch"] = ns["run_once"] - ns["step"]
    per = {part: ns[part] / 1e3 / steps / batch for part in PARTS}
    return {
        "batch": batch,
        "steps": steps,
        "us_per_stream_per_step": per,
        "engine_thread_us": sum(per[p] for p in PARTS if p != "client"),
        "event_loop_us": per["client"],
        "total_us": sum(per.values()),
        "sse_chunks": sent[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="few steps (a CI check)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 1 <= args.batch <= 512:
        parser.error(f"--batch must be in 1..512, got {args.batch}")
    if not 1 <= args.steps <= 100_000:
        parser.error(f"--steps must be in 1..100000, got {args.steps}")
    if not 1 <= args.repeats <= 20:
        parser.error(f"--repeats must be in 1..20, got {args.repeats}")
    steps, repeats = (30, 1) if args.smoke else (args.steps, args.repeats)
    torch.set_num_threads(1)
    runs = [asyncio.run(measure(args.batch, steps, warm_steps=4)) for _ in range(repeats)]
    # Each part's minimum over the repeats: a shared host's noise only ever adds time.
    best = {p: min(run["us_per_stream_per_step"][p] for run in runs) for p in PARTS}
    engine_us = sum(best[p] for p in PARTS if p != "client")
    print(f"host us per live stream per decode step, batch {args.batch}, min of {repeats}")
    for part in PARTS:
        print(f"  {part:<11} {best[part]:8.2f}")
    print(f"  {'engine thr':<11} {engine_us:8.2f}")
    print(f"  {'event loop':<11} {best['client']:8.2f}")
    print(f"  {'total':<11} {engine_us + best['client']:8.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"batch": args.batch, "steps": steps, "repeats": repeats}
    summary |= {"us_per_stream_per_step": best, "engine_thread_us": engine_us}
    summary |= {"event_loop_us": best["client"], "total_us": engine_us + best["client"]}
    result = {"best": summary, "runs": runs}
    (args.out / "host_step_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
