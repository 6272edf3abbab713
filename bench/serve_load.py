"""Load on a running `tessera serve`: closed-loop streaming clients, and the bare serving loop.

    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 1 16 --requests 64 \
        --max-tokens 64 [--weights /path/to/hf-folder] [--out results.json]

Each of `--clients` concurrent clients streams completions back to back (fixed prompt and
output lengths, `ignore_eos`) until `--requests` have finished. Per request it records the
time to the first token, the mean time per output token after it, and the status (429s are
counted, not retried). With `--weights` the same requests also run through the engine's
`ServingLoop` in this process, without HTTP, so the table shows what HTTP and streaming add
to TPOT. Prints a table and writes JSON; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx2 as httpx


@dataclass
class RunResult:
    path: str
    clients: int
    requests: int
    rejected: int
    wall_s: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

        return {
            "path": self.path,
            "clients": self.clients,
            "req/s": round(self.requests / self.wall_s, 2),
            "tok/s": round(self.output_tokens / self.wall_s, 1),
            "429s": self.rejected,
            "ttft p50 ms": round(pct(self.ttft_s, 0.5), 2),
            "ttft p99 ms": round(pct(self.ttft_s, 0.99), 2),
            "tpot p50 ms": round(pct(self.tpot_s, 0.5), 3),
            "tpot p99 ms": round(pct(self.tpot_s, 0.99), 3),
        }


def prompt_ids(length: int, index: int) -> list[int]:
    return [3 + (index * 7 + i) % 90 for i in range(length)]


async def http_run(
    url: str, clients: int, total: int, prompt_len: int, max_tokens: int
) -> RunResult:
    result = RunResult("http", clients, 0, 0, 0.0, 0)
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < total:
            index = issued
            issued += 1
            body = {
                "prompt": prompt_ids(prompt_len, index),
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
            }
            sent = time.perf_counter()
            stamps: list[float] = []
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code == 429:
                    result.rejected += 1
                    await response.aread()
                    continue
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    tokens = json.loads(line[6:])["choices"][0].get("token_ids") or []
                    stamps.extend([time.perf_counter()] * len(tokens))
            result.requests += 1
            result.output_tokens += len(stamps)
            result.ttft_s.append(stamps[0] - sent)
            if len(stamps) > 1:
                result.tpot_s.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        result.wall_s = time.perf_counter() - started
    return result


def loop_run(weights: str, clients: int, total: int, prompt_len: int, max_tokens: int) -> RunResult:
    """The same requests through the engine's ServingLoop on its thread, no HTTP."""
    from tessera.agents.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig
    from tessera.agents.engine.serving_loop import ServingLoop, TokenEvent

    engine = Engine.from_pretrained(
        weights, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max(clients, 1)))
    )
    loop = ServingLoop(engine, max_waiting=total + 1)
    loop.start()
    result = RunResult("loop", clients, 0, 0, 0.0, 0)
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
            stamps: list[float] = []
            done = threading.Event()

            def sink(
                event: TokenEvent, stamps: list[float] = stamps, done: threading.Event = done
            ) -> None:
                stamps.extend([time.perf_counter()] * len(event.token_ids))
                if event.finished:
                    done.set()

            params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
            sent = time.perf_counter()
            loop.submit(prompt_ids(prompt_len, index), params, sink).result()
            done.wait()
            with lock:
                result.requests += 1
                result.output_tokens += len(stamps)
                result.ttft_s.append(stamps[0] - sent)
                if len(stamps) > 1:
                    result.tpot_s.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    loop.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running tessera serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--weights", help="also run the bare ServingLoop on this HF folder")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results: list[RunResult] = []
    for clients in args.clients:
        results.append(
            asyncio.run(
                http_run(args.url, clients, args.requests, args.prompt_tokens, args.max_tokens)
            )
        )
        if args.weights:
            results.append(
                loop_run(args.weights, clients, args.requests, args.prompt_tokens, args.max_tokens)
            )
    rows = [r.row() for r in results]
    header = list(rows[0])
    print("  ".join(f"{h:>12}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>12}" for h in header))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"args": vars(args), "rows": rows, "runs": [asdict(r) for r in results]}, handle
            )


if __name__ == "__main__":
    main()
