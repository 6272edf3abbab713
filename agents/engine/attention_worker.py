"""An attention worker: it holds a decode engine's KV cache and runs its attention (Lamina).

Where it sits: an attention-offloaded engine (attention_offload.py) keeps the weights and runs
the dense layers (QKV/O projections, MLP) on its compute device; this process keeps the KV
cache (host memory and CPU cores by default, any torch device otherwise) and, per layer, takes
the batch's rotated q|k|v rows, writes k and v into its cache and returns the attention output
rows. On host memory its decode rows are attended by a pool of threads over all of the
host's cores (host_attention.py: the engine's CPU kernel per KV-head range, so the outputs are
the engine's); prefill chunks and other devices use the engine's own attention
(`model.attend`). Either way an offloaded engine samples the tokens a colocated one does.

The wire (one `multiprocessing.connection.Connection`, length-prefixed messages over a socket):
control messages are JSON objects, tensors are their raw bytes. Nothing is unpickled, so a
worker reachable over the pod network runs nothing it is sent. A session is one client from
`hello` to `close` (or its disconnect); the worker serves one session at a time, the next
connection waiting in the listen backlog, which is how a decode replica claims an idle worker.

    client -> worker                        worker -> client
    {"kind": "hello"}                       {"geometry": {...}}
    {"kind": "step", ...} + int64 metadata  (nothing)
      then per layer, per sub-batch:
      q|k|v rows [n, q + 2 kv] (raw)        attention rows [n, q] (raw)
    {"kind": "write_blocks", ids} + blocks  {"ok": true}
    {"kind": "read_blocks", ids}            blocks (raw)
    {"kind": "stats"}                       {"attention_s": ..., "scan_s": ..., ...}
    {"kind": "close"}                       (the session ends)

An error ends the session: the worker sends {"error": message} in place of what was expected
and drops the connection (the client raises AttentionWorkerError with the message).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, Listener
from typing import Any

import torch
from tessera.agents.engine import ops
from tessera.agents.engine.attention import AttentionMetadata, PrefillSpan
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.host_attention import DecodePlan, HostAttention, Kernel
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.model import attend

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class AttentionWorkerError(RuntimeError):
    """The attention worker refused a message, died, or stopped answering."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class WorkerGeometry:
    """What a worker holds: the client checks it against its model before the first step."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str
    protocol: int = PROTOCOL_VERSION

    @classmethod
    def of(cls, config: LlamaConfig, cache: PagedKVCache) -> WorkerGeometry:
        return cls(
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            block_size=cache.block_size,
            num_blocks=cache.num_blocks,
            dtype=dtype_name(cache.dtype),
        )

    def mismatch(self, config: LlamaConfig, dtype: torch.dtype) -> str | None:
        """Why a model of `config` in `dtype` cannot use this worker, or None."""
        wanted = {
            "protocol": PROTOCOL_VERSION,
            "num_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "dtype": dtype_name(dtype),
        }
        wrong = [
            f"{k} {getattr(self, k)} (model: {v})"
            for k, v in wanted.items()
            if getattr(self, k) != v
        ]
        return "; ".join(wrong) or None


# ---- one step's metadata on the wire ---------------------------------------------------------


def pack_step(
    meta: AttentionMetadata, num_tokens: int, cuts: Sequence[tuple[int, int]]
) -> tuple[dict[str, Any], torch.Tensor]:
    """The step header and one int64 tensor holding its slots, block tables and lengths."""
    parts = [meta.slot_mapping.to("cpu", torch.int64)]
    width = 0
    if meta.num_decode_tokens:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        width = int(meta.decode_block_tables.shape[1])
        parts.append(meta.decode_block_tables.to("cpu", torch.int64).flatten())
        parts.append(meta.decode_context_lens.to("cpu", torch.int64))
    spans = []
    for span in meta.prefill_spans:
        spans.append([span.start, span.num_tokens, span.num_cached, int(span.block_table.numel())])
        parts.append(span.block_table.to("cpu", torch.int64))
    header = {
        "kind": "step",
        "tokens": num_tokens,
        "num_decode": meta.num_decode_tokens,
        "width": width,
        "max_len": meta.decode_max_context_len,
        "spans": spans,
        "cuts": [list(c) for c in cuts],
    }
    return header, torch.cat(parts)


def unpack_step(header: dict[str, Any], ints: torch.Tensor) -> list[AttentionMetadata]:
    """The metadata of each sub-batch of a step (the rows `header["cuts"]` name)."""
    tokens, decode, width = int(header["tokens"]), int(header["num_decode"]), int(header["width"])
    offset = tokens
    slots = ints[:tokens]
    tables = lens = None
    if decode:
        tables = ints[offset : offset + decode * width].view(decode, width).to(torch.int32)
        offset += decode * width
        lens = ints[offset : offset + decode].to(torch.int32)
        offset += decode
    spans: list[PrefillSpan] = []
    for start, count, cached, length in header["spans"]:
        spans.append(PrefillSpan(start, count, cached, ints[offset : offset + length]))
        offset += length
    if offset != ints.numel():
        raise AttentionWorkerError(f"step metadata has {ints.numel()} ints, header says {offset}")
    metas: list[AttentionMetadata] = []
    for first, end in header["cuts"]:
        if spans and (first, end) != (0, tokens):
            raise AttentionWorkerError("a step with prefill chunks runs as one sub-batch")
        if not 0 <= first < end <= tokens or (not spans and end > decode):
            raise AttentionWorkerError(f"sub-batch rows [{first}, {end}) outside the step")
        meta = AttentionMetadata(slot_mapping=slots[first:end], prefill_spans=spans)
        if decode:
            rows = slice(first, min(end, decode))
            assert tables is not None and lens is not None
            meta.num_decode_tokens = rows.stop - rows.start
            meta.decode_block_tables = tables[rows]
            meta.decode_context_lens = lens[rows]
            meta.decode_context_lens_host = lens[rows].tolist()
            meta.decode_max_context_len = max(meta.decode_context_lens_host)
        metas.append(meta)
    return metas


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, flat (a Connection sends len() of a memoryview: its first
    dimension), without a copy when it is contiguous (any dtype, bf16 included)."""
    flat: Any = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return memoryview(flat)


def tensor_from(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over received bytes (read-only memory: the worker never writes into it)."""
    expected = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    if len(data) != expected:
        raise AttentionWorkerError(
            f"payload of {len(data)} bytes; expected {expected} for {list(shape)}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": never written
        return torch.frombuffer(data, dtype=dtype).view(*shape)


# ---- the worker ------------------------------------------------------------------------------


def host_threads() -> int:
    """The cores this process may run on (its CPU affinity: a pod's cpuset, a taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class AttentionWorker:
    """The KV cache of one client's model and the attention over it."""

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        attention_threads: int | None = None,
        attention_kernel: Kernel = "auto",
    ) -> None:
        """`attention_threads`: the decode scanners on host memory (None: every core this
        process may use); `attention_kernel`: theirs (host_attention.py). A worker on the
        host owns its process: torch's own intra-op pool is set to one thread, or every
        scanner's op would start a team of its own."""
        self.config = config
        self.cache = PagedKVCache(config, num_blocks, block_size, device, dtype)
        self.geometry = WorkerGeometry.of(config, self.cache)
        self.scale = config.head_dim**-0.5
        self.host: HostAttention | None = None
        if self.cache.device.type == "cpu":
            threads = attention_threads or host_threads()
            torch.set_num_threads(1)
            self.host = HostAttention(threads, attention_kernel)
        self.attention_s = 0.0
        """Seconds spent writing K/V and attending (what the client's waits overlap)."""
        self.scan_s = 0.0
        """Of which in the host scanners' decode attention (the rest: K/V writes, casts)."""
        self.steps = 0

    def plan(self, meta: AttentionMetadata) -> DecodePlan | None:
        """How the host scanners split a sub-batch's decode rows (built once per step)."""
        if self.host is None or not meta.num_decode_tokens:
            return None
        return self.host.plan(meta, self.cache.block_size, self.config.num_key_value_heads)

    def attend_rows(
        self,
        layer: int,
        qkv: torch.Tensor,
        meta: AttentionMetadata,
        plan: DecodePlan | None = None,
    ) -> torch.Tensor:
        """Attention output [n, q_size] of one sub-batch's rotated q|k|v rows at one layer
        (`plan`: `self.plan(meta)`, passed by a step that reuses it over its layers)."""
        started = time.perf_counter()
        cfg = self.config
        qkv = qkv.to(self.cache.device)
        n = qkv.shape[0]
        q = qkv[:, : cfg.q_size].view(n, cfg.num_attention_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(n, cfg.num_key_value_heads, -1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(n, cfg.num_key_value_heads, cfg.head_dim)
        k_cache, v_cache = self.cache.key_cache(layer), self.cache.value_cache(layer)
        ops.write_kv(k, v, meta.slot_mapping.to(self.cache.device), k_cache, v_cache)
        if plan is None:
            plan = self.plan(meta)
        if plan is None or self.host is None:
            out = attend(q, qkv, meta, k_cache, v_cache, cfg, self.scale)
        else:  # the decode rows on the scanners, prefill chunks on the engine's path
            decode = meta.num_decode_tokens
            scan_started = time.perf_counter()
            rows = self.host.decode(q[:decode], k_cache, v_cache, plan, self.scale)
            self.scan_s += time.perf_counter() - scan_started
            out = rows
            if meta.prefill_spans:
                without = replace(meta, num_decode_tokens=0)
                out = attend(q, qkv, without, k_cache, v_cache, cfg, self.scale)
                out[:decode] = rows
        out = out.reshape(n, cfg.q_size).to("cpu")
        self.attention_s += time.perf_counter() - started
        return out

    def serve(self, conn: Connection) -> None:
        """Answer one session until the client closes it or goes."""
        inbox: queue.Queue[bytes | None] = queue.Queue()

        def read() -> None:  # drains the socket while the main thread attends, so that the
            try:  # client's sends never wait on our replies (no send/send deadlock)
                while True:
                    inbox.put(conn.recv_bytes())
            except (EOFError, OSError):
                inbox.put(None)

        threading.Thread(target=read, name="attention-reader", daemon=True).start()
        try:
            while True:
                message = inbox.get()
                if message is None:
                    return
                if not self._handle(json.loads(message), inbox, conn):
                    return
        except EOFError:
            log.warning("the client went away in the middle of a message")
        except (AttentionWorkerError, ValueError, KeyError, TypeError, RuntimeError) as error:
            log.warning("attention session ended by an error: %s", error)
            with contextlib.suppress(OSError):
                conn.send_bytes(json.dumps({"error": str(error)}).encode())

    def _next(self, inbox: queue.Queue[bytes | None]) -> bytes:
        message = inbox.get()
        if message is None:
            raise EOFError("the client went away mid-message")
        return message

    def _handle(
        self, header: dict[str, Any], inbox: queue.Queue[bytes | None], conn: Connection
    ) -> bool:
        """Carry out one message (and the payloads that follow it); False ends the session."""
        kind = header.get("kind")
        cfg, cache = self.config, self.cache
        if kind == "hello":
            conn.send_bytes(json.dumps({"geometry": vars(self.geometry)}).encode())
        elif kind == "step":
            raw = self._next(inbox)
            metas = unpack_step(header, tensor_from(raw, torch.int64, [len(raw) // 8]))
            width = cfg.q_size + 2 * cfg.kv_size
            plans = [self.plan(meta) for meta in metas]
            for layer in range(cfg.num_hidden_layers):
                for meta, plan in zip(metas, plans, strict=True):
                    rows = meta.slot_mapping.shape[0]
                    qkv = tensor_from(self._next(inbox), cache.dtype, [rows, width])
                    conn.send_bytes(tensor_bytes(self.attend_rows(layer, qkv, meta, plan)))
            self.steps += 1
        elif kind == "write_blocks":
            ids = [int(i) for i in header["ids"]]
            shape = (len(ids), *cache.data.shape[:2], *cache.data.shape[3:])
            cache.write_blocks(ids, tensor_from(self._next(inbox), cache.dtype, shape))
            conn.send_bytes(b'{"ok": true}')
        elif kind == "read_blocks":
            ids = [int(i) for i in header["ids"]]
            conn.send_bytes(tensor_bytes(cache.read_blocks(ids).to("cpu")))
        elif kind == "stats":
            kernel = "engine" if self.host is None else self.host.last_kernel or self.host.kernel
            stats = {
                "attention_s": self.attention_s,
                "scan_s": self.scan_s,
                "steps": self.steps,
                "kernel": kernel,
            }
            conn.send_bytes(json.dumps(stats).encode())
        elif kind == "close":
            return False
        else:
            raise AttentionWorkerError(f"unknown message kind {kind!r}")
        return True


def serve_forever(worker: AttentionWorker, listener: Listener) -> None:
    """Serve sessions one after another (a decode replica's restart opens a new one)."""
    while True:
        try:
            conn = listener.accept()
        except OSError as error:
            log.warning("accepting an attention session failed: %s", error)
            continue
        log.info("attention session from %s", listener.last_accepted)
        with conn:
            worker.serve(conn)
        log.info("attention session from %s ended", listener.last_accepted)


@dataclass(frozen=True)
class WorkerSpec:
    """What a local worker process is started with (pickled to it over the local pipe)."""

    config: LlamaConfig
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0
    cpu_threads: int | None = None
    """Decode attention scanners on host memory (None: every core the process may use)."""
    attention_kernel: Kernel = "auto"


def worker_main(spec: WorkerSpec, ready: Connection, lifeline: Connection) -> None:
    """A local worker process's entry point (started by `start_attention_worker`)."""
    from tessera.agents.engine.tp_worker import _die_with  # the TP ranks' lifeline

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its starter decides when it ends
    threading.Thread(target=_die_with, args=(lifeline,), name="lifeline", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="attention %(name)s %(message)s")
    try:
        worker = AttentionWorker(
            spec.config,
            spec.num_blocks,
            spec.block_size,
            spec.device,
            spec.dtype,
            spec.cpu_threads,
            spec.attention_kernel,
        )
        listener = Listener((spec.host, spec.port))
    except Exception as error:
        log.exception("attention worker failed to start")
        with contextlib.suppress(OSError):
            ready.send(("error", f"{type(error).__name__}: {error}"))
        os._exit(1)
    ready.send(("ready", os.getpid(), listener.address))
    ready.close()
    serve_forever(worker, listener)


class LocalAttentionWorker:
    """A worker process on this host, started by `start_attention_worker`; it dies with us."""

    def __init__(self, process: Any, address: tuple[str, int], lifeline: Connection) -> None:
        self.process = process
        self.address = address
        self._lifeline = lifeline

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def close(self) -> None:
        from tessera.agents.engine.tp_engine import _end_processes  # TP ranks' SIGTERM/SIGKILL

        self._lifeline.close()  # its lifeline thread exits the process
        _end_processes([self.process], deadline_s=5.0)

    def __enter__(self) -> LocalAttentionWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_attention_worker(
    spec: WorkerSpec, startup_timeout_s: float = 120.0
) -> LocalAttentionWorker:
    """Start a worker process (from the TP ranks' forkserver) and return once it listens."""
    from tessera.agents.engine.tp_engine import _end_processes, rank_context

    context = rank_context()
    ours, theirs = context.Pipe(duplex=False)
    life_theirs, life_ours = context.Pipe(duplex=False)
    process = context.Process(
        target=worker_main, args=(spec, theirs, life_theirs), name="tessera-attention", daemon=True
    )
    process.start()
    theirs.close()
    life_theirs.close()
    try:
        if not ours.poll(startup_timeout_s):
            raise AttentionWorkerError(
                f"attention worker not ready within {startup_timeout_s:.0f} s"
            )
        message = ours.recv()
    except (EOFError, AttentionWorkerError) as error:
        _end_processes([process], deadline_s=0.0)
        life_ours.close()
        raise AttentionWorkerError(f"attention worker did not start: {error}") from error
    finally:
        ours.close()
    if message[0] != "ready":
        _end_processes([process], deadline_s=0.0)
        life_ours.close()
        raise AttentionWorkerError(f"attention worker did not start: {message[1]}")
    host, port = message[2]
    return LocalAttentionWorker(process, (str(host), int(port)), life_ours)
