"""Where a served request's time goes, read from outside the servers: per-thread CPU of each
process (Linux /proc) and the servers' own Prometheus counters, before and after a load point.

Why: a client's TPOT through `tessera router` can exceed what the engine's GPU steps take for
reasons no GPU timer shows: the decode server's event loop (one thread streaming every token
as a server-sent event) sharing the GIL with its engine thread, the router relaying every chunk.
The deltas over a point tell them apart: CPU microseconds per streamed token on each process's
event loop (its main thread: uvicorn's, aiohttp's) and on its busiest other thread (the engine's
serving loop), and the decode server's own TPOT (engine clock) beside the client's.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SERVER_SAMPLES = (
    "vllm:request_time_per_output_token_seconds_sum",
    "vllm:request_time_per_output_token_seconds_count",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:num_preemptions_total",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
)


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid` so far; {} once it is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def server_samples(url: str) -> dict[str, float]:
    """SERVER_SAMPLES of a server's /metrics, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = dict.fromkeys(SERVER_SAMPLES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found


def snapshot(processes: Mapping[str, tuple[int, str | None]]) -> dict[str, Any]:
    """Per process (name -> (pid, metrics URL or None)): its threads' CPU and its counters."""
    taken: dict[str, Any] = {}
    for name, (pid, url) in processes.items():
        samples: dict[str, float] = {}
        if url is not None:
            try:
                samples = server_samples(url)
            except OSError:
                samples = {}
        taken[name] = {"pid": pid, "cpu": thread_cpu_s(pid), "samples": samples}
    return taken


def difference(before: dict[str, Any], after: dict[str, Any], tokens: int) -> dict[str, Any]:
    """What a point cost each process: CPU microseconds per streamed token on its main thread
    (the event loop), its busiest other thread (the engine's loop in a server) and the rest,
    and its counters' increments (the decode server's mean TPOT on its own clock)."""
    out: dict[str, Any] = {"tokens": tokens}
    for name, now in after.items():
        then = before.get(name, {"cpu": {}, "samples": {}})
        pid = now["pid"]
        spent = {tid: cpu - then["cpu"].get(tid, 0.0) for tid, cpu in now["cpu"].items()}
        main = spent.pop(pid, 0.0)
        busiest = max(spent.values(), default=0.0)
        rest = sum(spent.values()) - busiest
        per_token = 1e6 / tokens if tokens else 0.0
        entry: dict[str, Any] = {
            "event_loop_cpu_us_per_token": round(main * per_token, 1),
            "busiest_thread_cpu_us_per_token": round(busiest * per_token, 1),
            "other_threads_cpu_us_per_token": round(rest * per_token, 1),
        }
        grown = {
            key: now["samples"][key] - then["samples"].get(key, 0.0)
            for key in now["samples"]
            if key in then["samples"]
        }
        if grown:
            entry["counters"] = grown
            count = grown.get("vllm:request_time_per_output_token_seconds_count", 0.0)
            if count:
                sum_s = grown["vllm:request_time_per_output_token_seconds_sum"]
                entry["server_tpot_mean_ms"] = round(1e3 * sum_s / count, 2)
        out[name] = entry
    return out
