"""Attention-offloaded decode (Lamina): dense layers here, attention where the KV lives.

An `Engine` built by `offloaded_engine` runs its scheduler, sampling, embedding, QKV/O
projections, MLP and LM head on its own device, and holds no KV: its cache (`RemoteKVCache`)
is only the block allocator, the blocks themselves living on an attention worker
(attention_worker.py: host memory and CPU cores, or another device). Per layer the new
q/k/v rows go to the worker and the attention rows come back.

Rotational staggering hides the exchange: a decode batch is split into sub-batches (two by
default) and the layers are walked so that while one sub-batch's attention runs on the
worker, the other runs its dense work here:

    here:    pre(A,l) pre(B,l) | post(A,l) pre(A,l+1) | post(B,l) pre(B,l+1) | ...
    worker:            attn(A,l) ........ attn(B,l) ........ attn(A,l+1) ...

(`pre` = norm, QKV, RoPE and the send; `post` = the receive, o_proj, norm, MLP.) A step with
prefill chunks runs as one sub-batch: prefill is not the steady state an offloaded decode
replica is sized for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection
from pathlib import Path

import torch
import torch.nn.functional as F
from tessera.agents.engine import ops
from tessera.agents.engine.attention import AttentionMetadata
from tessera.agents.engine.attention_worker import (
    AttentionWorkerError,
    WorkerGeometry,
    pack_step,
    tensor_bytes,
    tensor_from,
)
from tessera.agents.engine.checkpoint_identity import checkpoint_identity
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.engine import Engine, EngineConfig
from tessera.agents.engine.kv_cache import BlockAllocator, PagedKVCache
from tessera.agents.engine.model import LlamaModel
from tessera.agents.engine.warmup import WarmUpReport
from tessera.agents.engine.weights import LlamaWeights, load_llama_weights

DEFAULT_SUB_BATCHES = 2
"""Lamina's rotation: two sub-batches keep both sides busy once the dense and the attention
halves take about as long; more would shrink each GEMM for no further overlap."""
DEFAULT_REPLY_TIMEOUT_S = 600.0
"""How long the engine waits for one attention reply before it declares the worker hung."""


@dataclass
class ExchangeTimes:
    """Where the compute side's time went (cumulative seconds), for benches and telemetry."""

    send_s: float = 0.0
    """Copying q|k|v rows to the host and writing them to the worker."""
    wait_s: float = 0.0
    """Blocked on the worker's reply (its attention plus the transfer not hidden)."""
    receive_s: float = 0.0
    """Reading a reply once it is there and moving it to the compute device."""
    steps: int = 0
    exchanges: int = 0
    """Layer x sub-batch round trips."""


def connect(address: tuple[str, int], timeout_s: float = 60.0) -> Connection:
    """A connection to the worker at `address`, retried until `timeout_s` (it may be starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address)
        except OSError as error:
            if time.monotonic() > deadline:
                raise AttentionWorkerError(
                    f"attention worker {address[0]}:{address[1]} unreachable: {error}"
                ) from error
            time.sleep(0.1)


def claim(service: str, timeout_s: float = 120.0, hello_timeout_s: float = 2.0) -> Connection:
    """A session with an idle worker behind `service` (host:port; a headless Service's name
    resolves to every worker pod). A worker serves one session at a time, so a busy one does
    not answer `hello` in time and the next address is tried, until `timeout_s`."""
    host, _, port = service.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = "no address"
    while time.monotonic() < deadline:
        try:
            found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as error:
            last = f"{host} does not resolve: {error}"
            found = []
        for ip in sorted({str(info[4][0]) for info in found}):
            try:
                conn = Client((ip, int(port)))
            except OSError as error:
                last = f"{ip}:{port}: {error}"
                continue
            conn.send_bytes(json.dumps({"kind": "hello"}).encode())
            if conn.poll(hello_timeout_s):
                return conn  # its hello answer waits for AttentionClient(hello_sent=True)
            conn.close()
            last = f"{ip}:{port} is serving another replica"
        time.sleep(0.5)
    raise AttentionWorkerError(
        f"no idle attention worker behind {service} in {timeout_s} s ({last})"
    )


class AttentionClient:
    """The compute side of one session with an attention worker (see attention_worker.py)."""

    def __init__(
        self,
        conn: Connection,
        config: LlamaConfig,
        dtype: torch.dtype,
        device: torch.device,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        hello_sent: bool = False,
    ) -> None:
        """`hello_sent`: `claim` already sent the session's hello on `conn`."""
        self.conn = conn
        self.config = config
        self.dtype = dtype
        self.device = device
        self.reply_timeout_s = reply_timeout_s
        self.times = ExchangeTimes()
        self._pin = device.type == "cuda"
        self._stage = torch.empty(0, dtype=torch.uint8)
        self._reply = torch.empty(0, dtype=torch.uint8)
        self.geometry = self._hello(hello_sent)

    def _hello(self, sent: bool) -> WorkerGeometry:
        if sent:
            reply = json.loads(self._recv())
            if "error" in reply:
                raise AttentionWorkerError(f"attention worker: {reply['error']}")
        else:
            reply = self._control({"kind": "hello"})
        geometry = WorkerGeometry(**reply["geometry"])
        problem = geometry.mismatch(self.config, self.dtype)
        if problem:
            raise AttentionWorkerError(f"the attention worker holds another model's KV: {problem}")
        return geometry

    def _send_json(self, message: dict[str, object]) -> None:
        try:
            self.conn.send_bytes(json.dumps(message).encode())
        except OSError as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error

    def _recv(self) -> bytes:
        try:
            if not self.conn.poll(self.reply_timeout_s):
                raise AttentionWorkerError(f"no attention reply within {self.reply_timeout_s} s")
            return self.conn.recv_bytes()
        except (EOFError, OSError) as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error

    @staticmethod
    def _refusal(data: bytes | memoryview) -> AttentionWorkerError:
        try:
            message = json.loads(bytes(data))["error"]
        except (ValueError, KeyError, TypeError):
            message = f"unexpected reply of {len(data)} bytes"
        return AttentionWorkerError(f"attention worker: {message}")

    def _control(self, message: dict[str, object]) -> dict[str, object]:
        self._send_json(message)
        reply = json.loads(self._recv())
        if "error" in reply:
            raise AttentionWorkerError(f"attention worker: {reply['error']}")
        result: dict[str, object] = reply
        return result

    def _buffer(self, current: torch.Tensor, nbytes: int) -> torch.Tensor:
        if current.numel() >= nbytes:
            return current
        return torch.empty(
            max(nbytes, 2 * current.numel()), dtype=torch.uint8, pin_memory=self._pin
        )

    # ---- a step ------------------------------------------------------------------------------

    def begin_step(
        self, meta: AttentionMetadata, tokens: int, cuts: Sequence[tuple[int, int]]
    ) -> None:
        header, ints = pack_step(meta, tokens, cuts)
        self._send_json(header)
        try:
            self.conn.send_bytes(tensor_bytes(ints))
        except OSError as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error
        self.times.steps += 1

    def send_rows(self, qkv: torch.Tensor) -> None:
        """One sub-batch's rotated q|k|v rows [n, q + 2 kv] of one layer, to the worker."""
        started = time.perf_counter()
        nbytes = qkv.numel() * qkv.element_size()
        self._stage = self._buffer(self._stage, nbytes)
        host = self._stage[:nbytes].view(qkv.dtype).view(qkv.shape)
        host.copy_(qkv)  # device -> (pinned) host; synchronous, so the buffer is ours again
        try:
            self.conn.send_bytes(tensor_bytes(host))
        except OSError as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error
        self.times.send_s += time.perf_counter() - started

    def receive_rows(self, rows: int) -> torch.Tensor:
        """The attention rows [rows, q_size] of the oldest sub-batch sent, on this device."""
        started = time.perf_counter()
        try:
            if not self.conn.poll(self.reply_timeout_s):
                raise AttentionWorkerError(f"no attention reply within {self.reply_timeout_s} s")
            arrived = time.perf_counter()
            nbytes = rows * self.config.q_size * torch.tensor([], dtype=self.dtype).element_size()
            self._reply = self._buffer(self._reply, nbytes)
            got = self.conn.recv_bytes_into(self._reply.numpy())
        except (EOFError, OSError) as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error
        if got != nbytes:
            raise self._refusal(self._reply[:got].numpy().tobytes())
        out = self._reply[:nbytes].view(self.dtype).view(rows, self.config.q_size)
        out = out.to(self.device) if self.device.type != "cpu" else out.clone()
        self.times.wait_s += arrived - started
        self.times.receive_s += time.perf_counter() - arrived
        self.times.exchanges += 1
        return out

    # ---- blocks (P->D import, migration export) and stats -----------------------------------

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        self._send_json({"kind": "write_blocks", "ids": list(block_ids)})
        try:
            self.conn.send_bytes(tensor_bytes(blocks.to("cpu", self.dtype)))
        except OSError as error:
            raise AttentionWorkerError(f"attention worker gone: {error}") from error
        reply = json.loads(self._recv())
        if "error" in reply:
            raise AttentionWorkerError(f"attention worker: {reply['error']}")

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        self._send_json({"kind": "read_blocks", "ids": list(block_ids)})
        data = self._recv()
        g = self.geometry
        shape = (len(block_ids), g.num_layers, 2, g.block_size, g.num_key_value_heads, g.head_dim)
        try:
            return tensor_from(data, self.dtype, shape).clone()
        except AttentionWorkerError:
            raise self._refusal(data) from None

    def worker_stats(self) -> dict[str, object]:
        """The worker's own counts: seconds it spent attending, steps it served."""
        return self._control({"kind": "stats"})

    def close(self) -> None:
        with contextlib.suppress(AttentionWorkerError):
            self._send_json({"kind": "close"})
        self.conn.close()


class RemoteKVCache(PagedKVCache):
    """An offloaded engine's cache: the block allocator here, the blocks on the worker."""

    def __init__(self, config: LlamaConfig, client: AttentionClient) -> None:
        geometry = client.geometry
        self.config = config
        self.block_size = geometry.block_size
        self.num_blocks = geometry.num_blocks
        self.dtype = client.dtype
        self.device = torch.device("cpu")
        self.data = torch.empty(0, dtype=client.dtype)
        self.allocator = BlockAllocator(geometry.num_blocks)
        self.client = client

    def key_cache(self, layer: int) -> torch.Tensor:
        raise RuntimeError("an offloaded engine's K/V live on its attention worker")

    value_cache = key_cache

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        return self.client.read_blocks(block_ids)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        g = self.client.geometry
        expected = (
            len(block_ids),
            g.num_layers,
            2,
            g.block_size,
            g.num_key_value_heads,
            g.head_dim,
        )
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, cache expects {expected}")
        if blocks.dtype != self.dtype:
            raise ValueError(f"blocks are {blocks.dtype}, the cache holds {self.dtype}")
        self.client.write_blocks(block_ids, blocks)


def sub_batch_cuts(meta: AttentionMetadata, tokens: int, sub_batches: int) -> list[tuple[int, int]]:
    """Row ranges of the step's sub-batches: the decode rows split evenly, or the whole step."""
    decode = meta.num_decode_tokens
    if meta.prefill_spans or sub_batches <= 1 or decode < sub_batches:
        return [(0, tokens)]
    bounds = [decode * i // sub_batches for i in range(sub_batches + 1)]
    return list(itertools.pairwise(bounds))


class OffloadedLlamaModel(LlamaModel):
    """The dense half of the forward; attention goes to the worker (see the module docstring)."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        client: AttentionClient,
        max_positions: int | None = None,
        sub_batches: int = DEFAULT_SUB_BATCHES,
    ) -> None:
        super().__init__(config, weights, max_positions)
        if sub_batches < 1:
            raise ValueError(f"sub_batches must be >= 1, got {sub_batches}")
        self.client = client
        self.sub_batches = sub_batches

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        cfg, layers = self.config, self.weights.layers
        eps = cfg.rms_norm_eps
        tokens = input_ids.shape[0]
        cuts = sub_batch_cuts(meta, tokens, self.sub_batches)
        self.client.begin_step(meta, tokens, cuts)
        embedded = F.embedding(input_ids, self.weights.embed)
        hidden = [embedded[a:b] for a, b in cuts]
        residual: list[torch.Tensor | None] = [None] * len(cuts)
        where = [positions[a:b] for a, b in cuts]

        def pre(s: int, index: int) -> None:
            layer = layers[index]
            x, residual[s] = ops.rms_norm(hidden[s], layer.input_norm, eps, residual[s])
            qkv = F.linear(x, layer.qkv)
            ops.rope(
                qkv, where[s], self.rope_cos, self.rope_sin,
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            )  # fmt: skip
            self.client.send_rows(qkv)

        def post(s: int, index: int) -> None:
            layer = layers[index]
            attn = self.client.receive_rows(hidden[s].shape[0])
            out = F.linear(attn, layer.o)
            x, residual[s] = ops.rms_norm(out, layer.post_attention_norm, eps, residual[s])
            hidden[s] = F.linear(ops.silu_and_mul(F.linear(x, layer.gate_up)), layer.down)

        for s in range(len(cuts)):
            pre(s, 0)
        for index in range(len(layers)):
            for s in range(len(cuts)):
                post(s, index)
                if index + 1 < len(layers):
                    pre(s, index + 1)
        outs = [
            ops.rms_norm(hidden[s], self.weights.final_norm, eps, residual[s])[0]
            for s in range(len(cuts))
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class OffloadedEngine(Engine):
    """An Engine whose attention runs on a worker: nothing of the device's attention to warm."""

    def warm_up(self) -> WarmUpReport:
        """No decode graphs and no device attention kernels to compile: those are what the
        colocated warm-up launches (warmup.py), and here they would only send every reachable
        (batch, context) variant through the worker. The dense kernels compile on the short
        warm-up generation the server runs after this."""
        return WarmUpReport((), 0, 0, 0.0)


def offloaded_engine(
    config: LlamaConfig,
    weights: LlamaWeights,
    client: AttentionClient,
    engine_config: EngineConfig | None = None,
    sub_batches: int = DEFAULT_SUB_BATCHES,
    identity: str | None = None,
) -> Engine:
    """An Engine whose attention and KV live on `client`'s worker (its block count is the
    worker's). No CUDA graphs: a step talks to another process between its kernels.
    `identity`: the model's in KV packages (an engine loaded from a folder passes
    `checkpoint_identity`, as a colocated one does, so that KV moves between them)."""
    ec = replace(
        engine_config or EngineConfig(),
        num_kv_blocks=client.geometry.num_blocks,
        block_size=client.geometry.block_size,
        use_cuda_graphs=False,
    )
    max_len = ec.max_model_len or config.max_position_embeddings
    model = OffloadedLlamaModel(config, weights, client, max_len, sub_batches)
    return OffloadedEngine(
        config, weights, ec, model=model, kv_cache=RemoteKVCache(config, client), identity=identity
    )


def offloaded_engine_from_pretrained(
    path: str | Path,
    address: tuple[str, int],
    engine_config: EngineConfig | None = None,
    sub_batches: int = DEFAULT_SUB_BATCHES,
    connect_timeout_s: float = 60.0,
) -> Engine:
    """Load a local Hugging Face folder and attach it to the worker at `address`."""
    ec = engine_config or EngineConfig()
    device = ec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = ec.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    config = LlamaConfig.from_pretrained(path)
    weights = load_llama_weights(path, config, device=device, dtype=dtype)
    client = AttentionClient(connect(address, connect_timeout_s), config, dtype, weights.device)
    return offloaded_engine(
        config, weights, client, ec, sub_batches, identity=checkpoint_identity(path, config)
    )


def offloaded_engine_from_service(
    path: str | Path,
    service: str,
    engine_config: EngineConfig | None = None,
    sub_batches: int = DEFAULT_SUB_BATCHES,
    claim_timeout_s: float = 120.0,
) -> Engine:
    """`tessera serve --attention-service`: load the weights, claim an idle worker of the
    attention pool behind `service` (host:port) and run offloaded on it."""
    ec = engine_config or EngineConfig()
    device = ec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = ec.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    config = LlamaConfig.from_pretrained(path)
    weights = load_llama_weights(path, config, device=device, dtype=dtype)
    conn = claim(service, claim_timeout_s)
    client = AttentionClient(conn, config, dtype, weights.device, hello_sent=True)
    return offloaded_engine(
        config, weights, client, ec, sub_batches, identity=checkpoint_identity(path, config)
    )
