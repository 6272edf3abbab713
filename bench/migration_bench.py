"""Live KV migration on one GPU: the stall a request sees at 1k-32k tokens of context.

Two engines in this process share one set of Llama-3-8B-shaped random bf16 weights (the model
identity a KV package is checked against is the same), each with its own KV cache and serving
loop thread; a migration runs the real protocol (agents/engine/migration.py) over a loopback
TCP KV channel. For each context length a request is prefilled on the source, decodes, and is
migrated while it decodes; per migration:

- stall_ms: from the pause on the source to the target's commit answer (stop-and-copy of the
  last blocks and the request's state, the target's import, the answer): the time it does not
  decode. Goal: under 30 ms, growing less than 20% from 1k to 32k.
- token_gap_ms: the client's view: from its last token on the source to its first on the
  target (one decode step more than the stall), and tpot_ms, its median gap before the move;
- stall_stages_ms: where the stall went (`MigrationReport.stall_stages_ms`: the source's
  pause, the send, the answer, and the target's receive, adopt and import within it);
- precopy_s, precopy_mib, stages: the pre-copy, which runs while the request decodes.

    python bench/migration_bench.py --out $OUT/migration          # H200, about 2 minutes
    python bench/migration_bench.py --smoke --out /tmp/migration  # CPU, tiny model, seconds

Prints a table and writes migration_bench.json in --out after every context length.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from model_shapes import tiny_llama_config
from tessera.agents.engine import Engine, EngineConfig, LlamaConfig, SamplingParams
from tessera.agents.engine.kv_transport import TcpTransport
from tessera.agents.engine.migration import MigrationConfig, MigrationTarget, migrate_out
from tessera.agents.engine.scheduler import SchedulerConfig
from tessera.agents.engine.serving_loop import ServingLoop, TokenEvent
from tessera.agents.engine.weights import random_llama_weights

MiB = 2**20
BLOCK_SIZE = 16


@dataclass
class Timeline:
    """Token arrival times of one request, on either engine (a sink)."""

    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        with self.lock:
            self.times.extend(now for _ in event.token_ids)
        if event.finished:
            self.finished.set()

    def count(self) -> int:
        with self.lock:
            return len(self.times)


@dataclass
class BenchAdoption:
    sink: Timeline
    timeout_s: float | None = None

    def adopted(self, request_id: str) -> None:
        pass

    def discard(self) -> None:
        pass


def log(message: str) -> None:
    print(message, flush=True)


def wait_until(condition: Any, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached in {deadline_s} s")
        time.sleep(0.001)


def kv_used(loop: ServingLoop) -> int:
    return int(loop.call(lambda engine: engine.kv_cache.allocator.num_used).result(30))


async def one_migration(
    source: ServingLoop,
    target: ServingLoop,
    context: int,
    vocab: int,
    config: MigrationConfig,
    decode_tokens_before: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (context,), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    on_source, on_target = Timeline(), Timeline()
    request_id = f"ctx{context}-{seed}"
    source.submit(prompt, params, on_source, request_id=request_id).result(60)
    await asyncio.to_thread(
        wait_until, lambda: on_source.count() >= decode_tokens_before, 300, "decoding"
    )

    async def adopter(begin: Any, package: Any) -> BenchAdoption:
        return BenchAdoption(on_target)

    service = MigrationTarget(target, adopter, timeout_s=120)
    transport = TcpTransport(timeout_s=120)
    listener = await transport.listen("127.0.0.1", 0, service.handle)
    channel = await transport.connect(listener.address, 5)
    try:
        report = await migrate_out(source, request_id, channel, "target", {}, config)
    finally:
        await channel.close()
        await listener.close()
    if not report.committed:
        raise RuntimeError(f"migration at {context} tokens aborted: {report.reason}")
    await asyncio.to_thread(wait_until, lambda: on_target.count() >= 4, 60, "target tokens")
    target.abort(request_id)
    await asyncio.to_thread(wait_until, lambda: kv_used(target) == 0, 60, "target freed")
    await asyncio.to_thread(wait_until, lambda: kv_used(source) == 0, 60, "source freed")
    before = on_source.times
    gaps = [b - a for a, b in itertools.pairwise(before[1:])]  # the first gap is the prefill
    return {
        "context_tokens": context,
        "stall_ms": report.stall_s * 1e3,
        "token_gap_ms": (on_target.times[0] - before[-1]) * 1e3,
        "tpot_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
        "precopy_s": report.precopy_s,
        "precopy_mib": report.precopy_bytes / MiB,
        "precopy_stages": report.precopy_stages,
        "precopy_blocks": report.precopy_blocks,
        "final_blocks": report.final_blocks,
        "final_kib": report.final_bytes / 1024,
        "tokens_at_pause": report.num_output_tokens,
        "stall_stages_ms": report.stall_stages_ms,
    }


def build(args: argparse.Namespace) -> tuple[ServingLoop, ServingLoop, LlamaConfig, dict[str, Any]]:
    contexts = [int(c) for c in args.contexts.split(",")]
    longest = max(contexts) + args.max_new_tokens + BLOCK_SIZE
    if args.smoke:
        config = tiny_llama_config(256, longest, rms_norm_eps=1e-5, rope_theta=10000.0)
        device, dtype = "cpu", torch.float32
    else:
        base = LlamaConfig.llama3_8b()
        config = LlamaConfig(**{**base.__dict__, "max_position_embeddings": longest})
        device, dtype = "cuda", torch.bfloat16
    weights = random_llama_weights(config, device, dtype, seed=0)
    blocks = -(-longest // BLOCK_SIZE) + 8
    engine_config = EngineConfig(
        device=device,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        num_kv_blocks=blocks,
        max_model_len=longest,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4096),
        cuda_graph_batch_sizes=(1, 2, 4),
    )
    engines = [Engine(config, weights, engine_config) for _ in range(2)]
    for engine in engines:  # graphs captured and kernels compiled before anything is timed
        engine.warm_up()
    loops = (ServingLoop(engines[0]), ServingLoop(engines[1]))
    for loop in loops:
        loop.start()
    block_bytes = (
        config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * BLOCK_SIZE
    )
    meta = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "model": "tiny (smoke)" if args.smoke else "Llama-3-8B shape, random bf16 weights",
        "kv_blocks_per_engine": blocks,
        "block_size": BLOCK_SIZE,
        "block_mib": block_bytes / MiB,
        "torch": torch.__version__,
    }
    return loops[0], loops[1], config, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the JSON.")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short contexts.")
    parser.add_argument("--contexts", default=None, help="Comma-separated context lengths.")
    parser.add_argument("--repeats", type=int, default=None, help="Migrations per context.")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if args.contexts is None:
        args.contexts = "64,256,1024" if args.smoke else "1024,4096,16384,32768"
    if args.repeats is None:
        args.repeats = 2
    if args.max_new_tokens is None:
        args.max_new_tokens = 512 if args.smoke else 6000
    if args.repeats < 1 or args.max_new_tokens < 64:
        parser.error("--repeats must be >= 1 and --max-new-tokens >= 64")
    if not args.smoke and not torch.cuda.is_available():
        print(
            "migration_bench: error: no CUDA device; use --smoke for the CPU check", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "migration_bench.json"
    started = time.monotonic()
    source, target, config, meta = build(args)
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(),
        **meta,
        "migration_config": MigrationConfig().__dict__,
        "rows": [],
    }
    log(f"built two engines in {time.monotonic() - started:.1f} s: {meta}")
    migration = MigrationConfig(answer_timeout_s=120)
    contexts = [int(c) for c in args.contexts.split(",")]
    try:
        # One short migration first: lazy initialisation is not what a migration costs.
        asyncio.run(
            one_migration(
                source,
                target,
                contexts[0],
                config.vocab_size,
                migration,
                8,
                args.max_new_tokens,
                seed=999,
            )
        )
        header = (
            f"{'context':>8} {'stall ms':>9} {'gap ms':>8} {'tpot ms':>8} {'precopy s':>10}"
            f" {'MiB':>8} {'stages':>6} {'final blk':>9}  stall stages (ms)"
        )
        log(header)
        for context in contexts:
            for repeat in range(args.repeats):
                row = asyncio.run(
                    one_migration(
                        source,
                        target,
                        context,
                        config.vocab_size,
                        migration,
                        16,
                        args.max_new_tokens,
                        seed=repeat,
                    )
                )
                results["rows"].append(row)
                log(
                    f"{context:>8} {row['stall_ms']:>9.2f} {row['token_gap_ms']:>8.2f} "
                    f"{row['tpot_ms']:>8.2f} {row['precopy_s']:>10.3f} {row['precopy_mib']:>8.1f} "
                    f"{row['precopy_stages']:>6} {row['final_blocks']:>9}  "
                    + " ".join(f"{k}={v:.2f}" for k, v in row["stall_stages_ms"].items())
                )
                out.write_text(json.dumps(results, indent=2))
    finally:
        source.stop()
        target.stop()
    by_context = {
        c: statistics.median(r["stall_ms"] for r in results["rows"] if r["context_tokens"] == c)
        for c in contexts
    }
    low, high = by_context[contexts[0]], by_context[contexts[-1]]
    results["summary"] = {
        "median_stall_ms_by_context": by_context,
        "max_median_stall_ms": max(by_context.values()),
        "stall_growth_first_to_last": high / low - 1 if low > 0 else float("nan"),
        "goal": "stall < 30 ms and growth < 20% from the shortest to the longest context",
        "elapsed_s": time.monotonic() - started,
    }
    out.write_text(json.dumps(results, indent=2))
    log(
        f"median stall by context (ms): {by_context}; "
        f"growth {results['summary']['stall_growth_first_to_last']:+.1%}"
    )
    log(f"wrote {out} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
