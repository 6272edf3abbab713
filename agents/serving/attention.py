"""`tessera serve --role attention`: an attention pool's pod (Lamina's memory-side worker).

It holds the KV cache of one decode replica at a time in host memory (or on `--device`) and
runs that replica's attention (agents/engine/attention_worker.py); the decode replica finds it
through the `--attention-service` the operator renders (a headless Service of the attention
pool, on `--kv-port`). `--port` answers the pod's probes: /health while the process lives,
/ready once the cache is allocated and the worker listens.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch
from tessera.agents.engine.attention_worker import AttentionWorker, serve_forever
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_DTYPE = torch.bfloat16
"""`--dtype auto`: a GPU decode engine's default (the KV must be in the decode engine's dtype;
the operator renders the deployment's dtype on both pools)."""
CPU_FALLBACK_BLOCKS = 1024


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable: host memory the cache can take without pushing anything else out."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{meminfo} has no MemAvailable line")


def cache_blocks(
    config: LlamaConfig,
    block_size: int,
    dtype: torch.dtype,
    num_kv_blocks: int | None,
    memory_fraction: float,
    device: torch.device,
) -> int:
    """`--num-kv-blocks`, else `--kv-cache-memory-fraction` of the free memory of the device
    (MemAvailable on the host)."""
    if num_kv_blocks is not None:
        return num_kv_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free = available_host_bytes()
    else:
        return CPU_FALLBACK_BLOCKS
    return PagedKVCache.num_blocks_for_bytes(config, int(free * memory_fraction), block_size, dtype)


class _Probes(BaseHTTPRequestHandler):
    ready = threading.Event()

    def do_GET(self) -> None:  # http.server's name
        ok = self.path == "/health" or (self.path == "/ready" and self.ready.is_set())
        body = b"ok\n" if ok else b"not ready\n"
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("probe: " + format, *args)


def run_attention(config: Any) -> int:
    """Serve attention until killed (`config`: the ServeConfig `tessera serve` built)."""
    probes = ThreadingHTTPServer((config.host, config.port), _Probes)
    threading.Thread(target=probes.serve_forever, name="probes", daemon=True).start()
    model = LlamaConfig.from_pretrained(config.weights)
    device = torch.device(config.device or "cpu")
    dtype = DTYPES.get(config.dtype or "", DEFAULT_DTYPE)
    blocks = cache_blocks(
        model,
        config.block_size,
        dtype,
        config.num_kv_blocks,
        config.kv_cache_memory_fraction,
        device,
    )
    worker = AttentionWorker(model, blocks, config.block_size, device, dtype)
    listener = Listener((config.host, config.kv_port))
    _Probes.ready.set()
    log.info(
        "attention worker for %s: %d KV blocks of %d tokens (%s, %s), sessions on port %d",
        config.model_name,
        blocks,
        config.block_size,
        device,
        dtype,
        config.kv_port,
    )
    try:
        serve_forever(worker, listener)
    finally:
        probes.shutdown()
    return 0
