"""What the GIL switch interval costs `tessera serve`'s engine thread (CPU only, seconds).

The serving loop's thread and uvicorn's event loop share one interpreter. The engine thread
lets go of the GIL while it waits on the GPU; when the wait ends and the event loop is busy
(streaming 64 tokens a step), it waits for the GIL until the event loop's thread is asked to
drop it, every switch interval. This measures that extra wait: a thread sleeps 1 ms (a GPU
sync's stand-in, GIL released) while another runs Python non-stop, at Python's default 5 ms
and at `server.GIL_SWITCH_INTERVAL_S`.

    python bench/serve_gil_wait.py --out DIR     # prints a table, writes DIR/serve_gil_wait.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import checkout_layout  # noqa: F401  (makes `tessera` importable from a bare checkout)

WAIT_S = 0.001


def extra_wait_ms(switch_interval_s: float, waits: int) -> dict[str, float]:
    """Median and p95 of how much longer than WAIT_S a sleep took with a busy thread by."""
    sys.setswitchinterval(switch_interval_s)
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    delays = []
    for _ in range(waits):
        started = time.perf_counter()
        time.sleep(WAIT_S)
        delays.append((time.perf_counter() - started - WAIT_S) * 1e3)
    stop.set()
    thread.join()
    return {
        "switch_interval_ms": switch_interval_s * 1e3,
        "extra_wait_median_ms": round(statistics.median(delays), 3),
        "extra_wait_p95_ms": round(statistics.quantiles(delays, n=20)[-1], 3),
    }


def main() -> None:
    from tessera.agents.serving.server import GIL_SWITCH_INTERVAL_S

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", default="bench/results/serve_gil_wait")
    parser.add_argument("--waits", type=int, default=300)
    args = parser.parse_args()
    default = sys.getswitchinterval()
    rows = [extra_wait_ms(s, args.waits) for s in (0.005, GIL_SWITCH_INTERVAL_S)]
    sys.setswitchinterval(default)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_gil_wait.json").write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {out / 'serve_gil_wait.json'}")


if __name__ == "__main__":
    main()
