"""An open-loop streaming client for benches: requests sent at their planned arrival times to an
OpenAI-compatible `/v1/completions`, each request's first-token and finish times recorded.

Why not bench/serve_load.py's `http_poisson`: that one reports summaries, draws its own lengths
and keeps a request only once it has finished. A goodput bench needs every planned request,
finished or not, at its *scheduled* arrival (time the client spends elsewhere counts against the
server, as bench/serving_validation.py's driver counts it), and a request still streaming at the
point's deadline is cut and counted as missed, its partial tokens kept.

At tens of requests per second with hundreds of concurrent streams one Python process parsing
every chunk falls behind, and its lag would show up as server latency; so the requests of a point
are dealt round-robin to `shards` client processes (spawned) that start on one shared monotonic
clock (CLOCK_MONOTONIC is system-wide on Linux, `time.perf_counter` reads it).

Pure parts: `Record` and `latency_arrays` (records -> arrival, first token, finish, outputs).
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from serve_load import prompt_ids, request_body

CONNECT_TIMEOUT_S = 30.0


@dataclass
class Record:
    """One planned request, as its client saw it; times in seconds from the point's start."""

    index: int
    arrival_s: float
    """Scheduled arrival (what TTFT is measured from)."""
    prompt_tokens: int
    max_tokens: int
    sent_s: float = math.inf
    first_token_s: float = math.inf
    finish_s: float = math.inf
    """When the stream ended with [DONE]; inf if it was cut, failed or never finished."""
    output_tokens: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: infinities as None."""
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        times = ("sent_s", "first_token_s", "finish_s")
        fields: dict[str, Any] = {
            k: (math.inf if k in times and v is None else v) for k, v in data.items()
        }
        return cls(**fields)


def latency_arrays(records: list[Record]) -> tuple[np.ndarray, ...]:
    """(arrival, first token, finish, output tokens) for serving_validation.latencies(): a
    request that did not finish every token it asked for has finish at infinity (missed)."""
    complete = [r.finish_s if r.output_tokens >= r.max_tokens else math.inf for r in records]
    return (
        np.array([r.arrival_s for r in records], dtype=float),
        np.array([r.first_token_s for r in records], dtype=float),
        np.array(complete, dtype=float),
        np.array([r.max_tokens for r in records], dtype=np.int64),
    )


@dataclass
class Point:
    """What one client shard is told: where, when, and which requests."""

    url: str
    start_at: float
    """perf_counter time of the point's t=0 (shared by every shard)."""
    deadline_s: float
    """Seconds after start_at when streams still open are cut."""
    vocab: int
    prompt_base: int = 0
    """Added to a request's index to pick its prompt: points given different bases share no
    prompt (nor a prefix)."""
    requests: list[tuple[int, float, int, int]] = field(default_factory=list)
    """(index, arrival_s, prompt tokens, max tokens)."""


async def stream(session: Any, point: Point, record: Record) -> None:
    """Send one request at its arrival time and record its tokens as they arrive."""
    await asyncio.sleep(max(0.0, point.start_at + record.arrival_s - time.perf_counter()))
    body = request_body(
        prompt_ids(record.prompt_tokens, point.prompt_base + record.index, point.vocab),
        record.max_tokens,
    )
    record.sent_s = time.perf_counter() - point.start_at
    async with session.post(f"{point.url}/v1/completions", json=body) as response:
        if response.status != 200:
            record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            return
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                record.finish_s = time.perf_counter() - point.start_at
                return
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                record.error = f"stream error: {chunk['error']}"[:300]
                return
            choices = chunk.get("choices") or []
            ids = choices[0].get("token_ids") if choices else None
            if ids:
                if math.isinf(record.first_token_s):
                    record.first_token_s = time.perf_counter() - point.start_at
                record.output_tokens += len(ids)
        record.error = "stream ended without [DONE]"


async def run_shard(point: Point) -> list[Record]:
    import aiohttp

    records = [Record(i, a, p, m) for i, a, p, m in point.requests]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(record: Record) -> None:
            try:
                await stream(session, point, record)
            except asyncio.CancelledError:
                record.error = record.error or "cut at the point's deadline"
                raise
            except (aiohttp.ClientError, OSError, ValueError) as error:
                record.error = f"{type(error).__name__}: {error}"[:300]

        tasks = [asyncio.create_task(one(r)) for r in records]
        remaining = point.start_at + point.deadline_s - time.perf_counter()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return records


def _shard_main(point: Point, results: Any) -> None:
    records = asyncio.run(run_shard(point))
    results.put([r.as_dict() for r in records])


def run_point(
    url: str,
    requests: list[tuple[float, int, int]],
    vocab: int,
    deadline_s: float,
    shards: int = 1,
    prompt_base: int = 0,
    lead_s: float = 2.0,
) -> list[Record]:
    """Serve `requests` ((arrival_s, prompt tokens, max tokens), sorted by arrival) against
    `url` from `shards` client processes; every request's record, in plan order. Each request
    gets a distinct prompt (no two share a prefix). `lead_s`: head start for the shards'
    start-up, so the first arrivals are not late."""
    indexed = [(i, a, p, m) for i, (a, p, m) in enumerate(requests)]
    start_at = time.perf_counter() + lead_s
    points = [
        Point(url, start_at, deadline_s, vocab, prompt_base, indexed[k::shards])
        for k in range(shards)
    ]
    if shards == 1:
        records = asyncio.run(run_shard(points[0]))
    else:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_shard_main, args=(p, results)) for p in points]
        for worker in workers:
            worker.start()
        records = [
            Record.from_dict(d)
            for _ in workers
            for d in results.get(timeout=lead_s + deadline_s + 120)
        ]
        for worker in workers:
            worker.join(timeout=30)
    return sorted(records, key=lambda r: r.index)
