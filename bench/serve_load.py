"""Load on `tessera serve`: TPOT through streaming HTTP against the bare serving loop, and an
open-loop load generator.

    python bench/serve_load.py --out DIR              # GPU: Llama-3-8B shape, random bf16 weights
    python bench/serve_load.py --smoke --out DIR      # CPU: a tiny model, under a minute
    python bench/serve_load.py --url http://HOST:8000 --clients 1 16 --request-rates 2 8

Self-hosted (no --url), the engine is built in this process (random weights made on the device,
no checkpoint on disk, a word-level tokenizer covering the vocabulary) and served by the real
`tessera serve` code: `start_serving` (warm-up, serving loop) and `build_app` under uvicorn on a
loopback port. Then:

1. HTTP overhead. At each batch of --clients, that many closed-loop clients complete
   --requests completions of --prompt-tokens / --max-tokens tokens (`ignore_eos`): first
   submitted straight to the server's own `ServingLoop` from threads here (the bare loop: no
   HTTP, no detokenisation), then streamed over HTTP with `return_token_ids` from a child
   process (its own interpreter: the client's parsing does not share the server's GIL). A
   request's TPOT is (last token - first token) / (tokens - 1), at each token's arrival; the
   table compares the medians. The issue's bar: HTTP within 5% at batch 1 and 64.
2. Load generator (--request-rates). Neither `aiperf` nor `guidellm` is carried to the GPU
   machine (with their dependencies they exceed what a run may carry), so this follows vLLM's
   benchmark client (`vllm bench serve`, random dataset): Poisson arrivals at each rate,
   prompt and output lengths uniform in [(1 - r) L, (1 + r) L] (--range-ratio), streaming,
   and the same report: request and output-token throughput, TTFT, TPOT, ITL (the gaps between
   chunks) and E2E latency, mean / median / p99.
3. Kernel variants compiled while serving, after the warm-up (`Engine.warm_up`): Triton's JIT
   caches are counted before and after the runs; anything other than 0 is a stall the warm-up
   missed.

Prints tables and writes DIR/serve_load.json after each part. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (makes `tessera` importable from a bare checkout)
from model_shapes import tiny_model

HERE = Path(__file__).resolve()


@dataclass
class Sample:
    """One request as its client saw it."""

    sent_s: float
    token_s: list[float] = field(default_factory=list)
    """Arrival time of every output token (the tokens of one chunk share its time)."""
    rejected: bool = False

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_s)
        return (self.token_s[-1] - self.token_s[0]) / (n - 1) if n > 1 else None

    @property
    def e2e_s(self) -> float:
        return self.token_s[-1] - self.sent_s

    def itl_s(self) -> list[float]:
        """Gaps between successive chunks."""
        times = sorted(set(self.token_s))
        return [b - a for a, b in itertools.pairwise(times)]


@dataclass
class Run:
    path: str
    """"loop" (the bare ServingLoop) or "http"."""
    kind: str
    """"closed" (--clients back to back) or "poisson" (open loop at a rate)."""
    load: float
    """Clients (closed) or requests per second (poisson)."""
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        done = [s for s in self.samples if not s.rejected and s.token_s]
        tpots = [t for s in done if (t := s.tpot_s) is not None]
        itls = [gap for s in done for gap in s.itl_s()]
        tokens = sum(len(s.token_s) for s in done)
        return {
            "path": self.path,
            "kind": self.kind,
            "load": self.load,
            "completed": len(done),
            "rejected": sum(s.rejected for s in self.samples),
            "wall_s": round(self.wall_s, 3),
            "request_throughput_per_s": round(len(done) / self.wall_s, 3) if self.wall_s else 0,
            "output_tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0,
            **summary("ttft", [s.ttft_s for s in done]),
            **summary("tpot", tpots),
            **summary("itl", itls),
            **summary("e2e", [s.e2e_s for s in done]),
        }


def summary(name: str, values_s: list[float]) -> dict[str, float | None]:
    """mean / median / p99 in milliseconds, as vLLM's benchmark client reports them."""
    if not values_s:
        return {f"{name}_mean_ms": None, f"{name}_median_ms": None, f"{name}_p99_ms": None}
    ordered = sorted(values_s)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        f"{name}_mean_ms": round(statistics.fmean(values_s) * 1e3, 3),
        f"{name}_median_ms": round(statistics.median(values_s) * 1e3, 3),
        f"{name}_p99_ms": round(p99 * 1e3, 3),
    }


def requests_for(args: argparse.Namespace, clients: int) -> int:
    """--requests, else two rounds of the batch and at least 8 (TPOT medians need a few)."""
    return int(args.requests) or max(8, 2 * clients)


def prompt_ids(length: int, index: int, vocab: int) -> list[int]:
    """A distinct prompt per request (no two share a prefix), ids clear of special tokens."""
    span = vocab - 10
    return [10 + (index * 7919 + i * 31) % span for i in range(length)]


# ---- the client (any process) ------------------------------------------------------------


async def stream_one(session: Any, url: str, body: dict[str, Any]) -> Sample:
    sample = Sample(time.perf_counter())
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status == 429:
            await response.read()
            sample.rejected = True
            return sample
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            choices = chunk.get("choices") or []
            ids = choices[0].get("token_ids") if choices else None
            if ids:
                now = time.perf_counter()
                sample.token_s.extend([now] * len(ids))
    return sample


def request_body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "temperature": 0,
    }


async def http_closed(args: argparse.Namespace, clients: int, vocab: int) -> Run:
    import aiohttp

    run = Run("http", "closed", clients)
    total = requests_for(args, clients)
    issued = 0

    async def client(session: Any) -> None:
        nonlocal issued
        while issued < total:
            index = issued
            issued += 1
            body = request_body(prompt_ids(args.prompt_tokens, index, vocab), args.max_tokens)
            run.samples.append(await stream_one(session, args.url, body))

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        run.wall_s = time.perf_counter() - started
    return run


def poisson_requests(
    args: argparse.Namespace, rate: float, vocab: int
) -> list[tuple[float, list[int], int]]:
    """(arrival offset, prompt, max_tokens) of each request: vLLM's random dataset."""
    import numpy as np

    rng = np.random.default_rng([args.seed, int(rate * 1000)])
    gaps = rng.exponential(1.0 / rate, args.num_prompts)
    arrivals = np.cumsum(gaps) - gaps[0]
    r = args.range_ratio
    prompts = rng.integers(
        max(1, int(args.prompt_tokens * (1 - r))), int(args.prompt_tokens * (1 + r)) + 1,
        args.num_prompts,
    )  # fmt: skip
    outputs = rng.integers(
        max(1, int(args.max_tokens * (1 - r))), int(args.max_tokens * (1 + r)) + 1,
        args.num_prompts,
    )  # fmt: skip
    return [
        (float(arrivals[i]), prompt_ids(int(prompts[i]), 10_000 + i, vocab), int(outputs[i]))
        for i in range(args.num_prompts)
    ]


async def http_poisson(args: argparse.Namespace, rate: float, vocab: int) -> Run:
    import aiohttp

    run = Run("http", "poisson", rate)
    requests = poisson_requests(args, rate, vocab)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()

        async def one(offset: float, prompt: list[int], max_tokens: int) -> None:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            run.samples.append(
                await stream_one(session, args.url, request_body(prompt, max_tokens))
            )

        await asyncio.gather(*(one(*request) for request in requests))
        run.wall_s = time.perf_counter() - started
    return run


def client_main(args: argparse.Namespace) -> list[Run]:
    """The --url mode: closed-loop clients, then Poisson rates, against a running server."""
    vocab = args.vocab_size
    runs: list[Run] = []
    for clients in args.clients:
        runs.append(asyncio.run(http_closed(args, clients, vocab)))
        print(f"http closed {clients}: {json.dumps(runs[-1].report())}", flush=True)
    for rate in args.request_rates:
        runs.append(asyncio.run(http_poisson(args, rate, vocab)))
        print(f"http poisson {rate}/s: {json.dumps(runs[-1].report())}", flush=True)
    return runs


# ---- self-hosted: the engine and the server in this process ------------------------------


def word_level_tokenizer(folder: Path, vocab: int) -> None:
    """A tokenizer.json with one word per id, the first three special (<unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@dataclass
class StepTimes:
    """The engine thread's `Engine.step` wall times, by phase ("loop", "http") and batch: how
    much serving streams over HTTP slows the engine's own step (GIL contention with the event
    loop), apart from what the client sees."""

    phase: str = "warmup"
    ms: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    period_ms: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """From one step's start to the next one's: the step plus the loop thread's other work
    (sinks, metrics, commands) and its waits for the GIL."""
    _last_start: float = 0.0

    def wrap(self, engine: Any) -> None:
        step = engine.step

        def timed() -> Any:
            started = time.perf_counter()
            outputs = step()
            elapsed_ms = (time.perf_counter() - started) * 1e3
            key = (self.phase, len(outputs))
            self.ms.setdefault(key, []).append(elapsed_ms)
            if self._last_start:
                self.period_ms.setdefault(key, []).append((started - self._last_start) * 1e3)
            self._last_start = started
            return outputs

        engine.step = timed

    def rows(self, batches: list[int]) -> list[dict[str, Any]]:
        """Median step time of the decode steps of each batch, bare loop against HTTP."""
        rows = []
        for batch in batches:
            loop, http = self.ms.get(("loop", batch), []), self.ms.get(("http", batch), [])
            if not loop or not http:
                continue
            loop_ms, http_ms = statistics.median(loop), statistics.median(http)
            loop_period = statistics.median(self.period_ms.get(("loop", batch)) or [0.0])
            http_period = statistics.median(self.period_ms.get(("http", batch)) or [0.0])
            rows.append(
                {
                    "batch": batch,
                    "loop_step_median_ms": round(loop_ms, 3),
                    "http_step_median_ms": round(http_ms, 3),
                    "step_inflation": round(http_ms / loop_ms, 4),
                    "loop_period_median_ms": round(loop_period, 3),
                    "http_period_median_ms": round(http_period, 3),
                    "loop_steps": len(loop),
                    "http_steps": len(http),
                }
            )
        return rows


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds a thread of this process has run (Linux /proc; 0 elsewhere): unlike wall
    times, not inflated by other processes on a shared machine."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Hosted:
    url: str
    served: Any
    stop: Any
    vocab: int
    warmup: dict[str, Any]
    steps: StepTimes
    server_thread: threading.Thread

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the event loop's thread and the engine's."""
        engine_thread = self.served.loop._thread
        return {
            "event_loop": thread_cpu_s(self.server_thread.native_id),
            "engine": thread_cpu_s(engine_thread.native_id if engine_thread else None),
        }


def host(args: argparse.Namespace, folder: Path) -> Hosted:
    """Random weights on the device, warmed up and served over HTTP on a loopback port."""
    import socket

    import torch
    import uvicorn
    from tessera.agents.engine import Engine, EngineConfig, LlamaConfig, SchedulerConfig
    from tessera.agents.engine.weights import random_llama_weights
    from tessera.agents.serving.app import Served, build_app
    from tessera.agents.serving.metrics import ServingMetrics
    from tessera.agents.serving.server import ServeConfig, start_serving
    from tessera.agents.serving.tokenizer import ServingTokenizer

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        config = LlamaConfig.from_dict(
            tiny_model(512, args.max_model_len, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
        )
    else:
        config = replace(LlamaConfig.llama3_8b(), max_position_embeddings=args.max_model_len)
    word_level_tokenizer(folder, config.vocab_size)
    print(f"weights: {device} {dtype}, {config.num_hidden_layers} layers", flush=True)
    weights = random_llama_weights(config, device, dtype, seed=0)
    scheduler = SchedulerConfig(
        max_num_seqs=max(args.clients), max_num_batched_tokens=args.max_num_batched_tokens
    )
    engine_config = EngineConfig(
        device=device,
        dtype=dtype,
        max_model_len=args.max_model_len,
        scheduler=scheduler,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        num_kv_blocks=None if device == "cuda" else 2048,
    )
    engine = Engine(config, weights, engine_config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve_config = ServeConfig(
        weights=folder,
        model_name="bench",
        instance_id="bench",
        host="127.0.0.1",
        port=port,
        max_model_len=args.max_model_len,
        pool="bench",
        role="colocated",
        dtype=None,
        device=device,
        scheduler=scheduler,
        block_size=16,
        num_kv_blocks=None,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        max_waiting_requests=100_000,
        request_timeout_s=None,
        seed=0,
        log_level="warning",
    )
    served = Served(
        model_name="bench",
        max_model_len=args.max_model_len,
        metrics=ServingMetrics("bench", "bench", "colocated"),
    )
    started = time.perf_counter()
    start_serving(engine, ServingTokenizer.from_folder(folder), serve_config, served)
    warmup = asdict(served.warmup) | {"startup_s": round(time.perf_counter() - started, 2)}
    print(f"warm-up: {warmup}", flush=True)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    print(f"GIL switch interval: {sys.getswitchinterval() * 1e3} ms", flush=True)
    steps = StepTimes()
    steps.wrap(engine)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(served), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)  # polling uvicorn's started flag, with the deadline above

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        served.loop.stop()

    return Hosted(
        f"http://127.0.0.1:{port}", served, stop, config.vocab_size, warmup, steps, thread
    )


def loop_closed(args: argparse.Namespace, hosted: Hosted, clients: int) -> Run:
    """The same requests straight into the server's ServingLoop, from threads here."""
    from tessera.agents.engine import SamplingParams
    from tessera.agents.engine.serving_loop import TokenEvent

    loop = hosted.served.loop
    run = Run("loop", "closed", clients)
    total = requests_for(args, clients)
    lock = threading.Lock()
    issued = 0

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= total:
                    return
                index = issued
                issued += 1
            sample = Sample(time.perf_counter())
            done = threading.Event()

            def sink(
                event: TokenEvent, sample: Sample = sample, done: threading.Event = done
            ) -> None:
                now = time.perf_counter()
                sample.token_s.extend([now] * len(event.token_ids))
                if event.finished:
                    done.set()

            # greedy, as the HTTP requests ask (temperature 0)
            params = SamplingParams(
                max_new_tokens=args.max_tokens, ignore_eos=True, temperature=0.0
            )
            prompt = prompt_ids(args.prompt_tokens, index, hosted.vocab)
            loop.submit(prompt, params, sink).result()
            if not done.wait(1800):
                raise RuntimeError("a bare-loop request did not finish in 30 minutes")
            with lock:
                run.samples.append(sample)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.wall_s = time.perf_counter() - started
    return run


def child_client(
    args: argparse.Namespace, hosted: Hosted, out: Path, rates: bool
) -> list[dict[str, Any]]:
    """The HTTP client in its own interpreter; its per-run reports."""
    command = [
        sys.executable,
        str(HERE),
        f"--url={hosted.url}",
        f"--vocab-size={hosted.vocab}",
        f"--requests={args.requests}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--max-tokens={args.max_tokens}",
        f"--num-prompts={args.num_prompts}",
        f"--range-ratio={args.range_ratio}",
        f"--seed={args.seed}",
        f"--client-out={out}",
        "--clients",
        *([] if rates else [str(c) for c in args.clients]),
        "--request-rates",
        *([str(r) for r in args.request_rates] if rates else []),
    ]
    done = subprocess.run(command, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the HTTP client exited {done.returncode}")
    reports: list[dict[str, Any]] = json.loads(out.read_text())["reports"]
    return reports


def compiled() -> dict[str, int] | None:
    from tessera.agents.engine import ops

    if not ops.triton_available():
        return None
    counts: dict[str, int] = ops.triton_kernels().compiled_variants()
    return counts


def overhead_rows(loop_runs: list[Run], http: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in loop_runs:
        bare = run.report()
        match = next(r for r in http if r["kind"] == "closed" and r["load"] == run.load)
        loop_tpot, http_tpot = bare["tpot_median_ms"], match["tpot_median_ms"]
        ratio = http_tpot / loop_tpot if loop_tpot and http_tpot else None
        rows.append(
            {
                "batch": int(run.load),
                "loop_tpot_median_ms": loop_tpot,
                "http_tpot_median_ms": http_tpot,
                "http_over_loop": round(ratio, 4) if ratio else None,
                "within_5pct": ratio is not None and ratio <= 1.05,
                "loop_ttft_median_ms": bare["ttft_median_ms"],
                "http_ttft_median_ms": match["ttft_median_ms"],
                "loop_tok_per_s": bare["output_tokens_per_s"],
                "http_tok_per_s": match["output_tokens_per_s"],
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    header = list(rows[0])
    print("  ".join(f"{h:>20}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>20}" for h in header))


def self_hosted(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "serve_load.json"
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": vars(args),
    }

    def save() -> None:
        path.write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory() as scratch:
        hosted = host(args, Path(scratch))
        results["warmup"] = hosted.warmup
        results["compiled_after_warmup"] = before = compiled()
        save()
        try:
            loop_runs = []
            hosted.steps.phase = "loop"
            for clients in args.clients:
                loop_runs.append(loop_closed(args, hosted, clients))
                print(f"loop closed {clients}: {json.dumps(loop_runs[-1].report())}", flush=True)
            results["loop"] = [run.report() for run in loop_runs]
            save()
            hosted.steps.phase = "http"
            cpu_before = hosted.cpu_s()
            http = child_client(args, hosted, Path(scratch) / "closed.json", rates=False)
            cpu_after = hosted.cpu_s()
            hosted.steps.phase = "rates"
            completed = sum(r["completed"] for r in http if r["kind"] == "closed")
            tokens = max(1, completed * args.max_tokens)  # 1: no closed runs asked for
            results["http_cpu"] = {
                f"{name}_cpu_us_per_token": round(
                    (cpu_after[name] - cpu_before[name]) / tokens * 1e6, 2
                )
                for name in cpu_after
            } | {"tokens": tokens}
            results["http"] = http
            results["overhead"] = overhead_rows(loop_runs, http)
            results["engine_step"] = hosted.steps.rows(args.clients)
            save()
            if args.request_rates:
                results["load_generator"] = child_client(
                    args, hosted, Path(scratch) / "rates.json", rates=True
                )
                save()
            after = compiled()
            results["compiled_after_serving"] = after
            if before is not None and after is not None:
                results["compiled_while_serving"] = {k: after[k] - before[k] for k in after}
            save()
        finally:
            hosted.stop()
    print("\nHTTP overhead (closed loop, TPOT medians):")
    print_table(results["overhead"])
    print("\nengine thread's step time (Engine.step, decode steps of the full batch):")
    print_table(results["engine_step"])
    print(f"\nCPU per streamed token, all HTTP closed runs: {results['http_cpu']}")
    if results.get("load_generator"):
        print("\nload generator (Poisson arrivals, vLLM benchmark client's metrics):")
        keys = ["load", "completed", "request_throughput_per_s", "output_tokens_per_s"]
        keys += [f"{m}_{s}_ms" for m in ("ttft", "tpot", "itl", "e2e") for s in ("median", "p99")]
        print_table([{k: r[k] for k in keys} for r in results["load_generator"]])
    print(f"\nkernel variants compiled while serving: {results.get('compiled_while_serving')}")
    print(f"wrote {path}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", help="a running tessera serve (else: serve one here)")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, small counts")
    parser.add_argument("--out", default="bench/results/serve_load", help="self-hosted: folder")
    parser.add_argument("--clients", type=int, nargs="*", default=None)
    parser.add_argument(
        "--requests", type=int, default=0, help="per closed-loop batch (0: 2 rounds, >= 8)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--request-rates", type=float, nargs="*", default=None)
    parser.add_argument("--num-prompts", type=int, default=None, help="per Poisson rate")
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=128256, help="--url: ids to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="self-hosted: the GIL switch interval after start-up (default: tessera serve's)",
    )
    parser.add_argument("--client-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.smoke
    defaults = {
        "clients": [1, 4] if small else [1, 64],
        "prompt_tokens": 16 if small else 1024,
        "max_tokens": 24 if small else 256,
        "request_rates": [20.0] if small else [4.0, 16.0],
        "num_prompts": 16 if small else 64,
        "max_model_len": 256 if small else 4096,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.url:
        runs = client_main(args)
        if args.client_out:
            Path(args.client_out).write_text(json.dumps({"reports": [r.report() for r in runs]}))
        else:
            print_table([r.report() for r in runs])
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    self_hosted(args)


if __name__ == "__main__":
    main()
