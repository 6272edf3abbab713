"""KV transfer between two engine processes on one GPU: CUDA IPC against TCP.

Two processes share one GPU, each limited to its own share of its memory
(`torch.cuda.set_per_process_memory_fraction`): a prefill process (spawned) that listens for KV
channels as `tessera serve --role prefill` does, and this process, the decode side, which opens
a channel per transfer as a decode instance does. Measured, on the decode side's clock:

- transfer time vs KV size: KV blocks of a Llama-3-8B-shaped model (32 layers, 8 KV heads,
  head_dim 128, bf16: 128 KiB per token) already on the GPU in the prefill process, until they
  are on the GPU in this one. TCP: the real path (copy to pinned host memory with a checksum
  per block, framed over loopback, verified and copied back to the GPU block by block as it
  lands). CUDA IPC: a memory handle, one device-to-device copy, no checksum (the blocks never
  leave the GPU's memory);
- TTFT overhead vs colocated at 1k / 4k / 8k-token prompts, with random weights in both
  engines: colocated is the prefill engine's time to its first token (the decode engine gets
  only the answer); disaggregated adds the export, the transfer and the decode engine's
  import_kv (the point from which a decode server streams): `Engine.export_kv` as the prefill
  server calls it, over TCP with a host copy and checksums, over CUDA IPC with `on_device`
  (the blocks stay on the GPU and are shared as they are).

The transfer rows are what `sim/transfer.py` fits (`MeasuredTransport.from_bench`) into a fixed
latency and a bandwidth per transport.

    python bench/kv_transfer_bench.py --out $OUT/kv_transfer         # GPU, about 2 minutes
    python bench/kv_transfer_bench.py --smoke --out /tmp/kv_smoke    # CPU, tiny model, TCP only

Needs torch and pydantic (the KV package's header schema); prints a table and writes
`kv_transfer.json` under --out after each section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from model_shapes import tiny_llama_config
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.engine import Engine, EngineConfig, EngineRole
from tessera.agents.engine.kv_transfer import DEFAULT_CHECKSUM, UNCHECKED, KVGeometry, KVPackage
from tessera.agents.engine.kv_transport import KVChannel, KVTransport, TcpTransport
from tessera.agents.engine.request import SamplingParams
from tessera.agents.engine.weights import random_llama_weights

MEMORY_FRACTION = 0.45
"""Each process's share of the GPU: two engines of 16 GB weights and their KV caches fit in
one H200 twice over, and neither can take the other's memory."""
BLOCK_SIZE = 16
TRANSFER_GEOMETRY = KVGeometry("llama3-8b-shape", 32, 8, 128, BLOCK_SIZE, "bfloat16")
"""The transfer section's blocks: Llama-3-8B's KV (128 KiB per token), in --smoke too, so the
CPU run measures the sizes the simulator's fit is used at."""
TIME_BUDGET_S = 200.0
"""Past this, the remaining measurements are skipped (the GPU run must end within 4 minutes)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    smoke: bool
    device: str
    transports: tuple[str, ...]
    transfer_tokens: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    transfer_repeats: int
    ttft_repeats: int

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    def model(self) -> LlamaConfig:
        longest = max(self.prompt_tokens) + 64
        if self.smoke:
            return tiny_llama_config(512, longest)
        return dataclasses.replace(LlamaConfig.llama3_8b(), max_position_embeddings=longest)

    def kv_blocks(self) -> int:
        return 2 * (max(self.prompt_tokens) // BLOCK_SIZE + 2)


def setup_for(smoke: bool) -> Setup:
    if smoke:
        return Setup(True, "cpu", ("tcp",), (64, 256, 1024), (32, 128), 3, 2)
    return Setup(
        False, "cuda", ("cuda_ipc", "tcp"), (256, 1024, 2048, 4096, 8192), (1024, 4096, 8192), 3, 3
    )


def make_engine(setup: Setup, role: EngineRole) -> Engine:
    config = setup.model()
    weights = random_llama_weights(config, setup.device, setup.dtype, seed=0)
    engine_config = EngineConfig(
        role=role, device=setup.device, num_kv_blocks=setup.kv_blocks(), block_size=BLOCK_SIZE
    )
    return Engine(config, weights, engine_config)


def transport_for(setup: Setup, name: str) -> KVTransport:
    if name == "cuda_ipc":
        from tessera.agents.engine.kv_transport_cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(torch.device(setup.device, 0), timeout_s=120.0)
    # On a GPU the receiver copies each block to the device as it lands (pinned, overlapped).
    return TcpTransport(timeout_s=120.0, device=setup.device if setup.device == "cuda" else None)


def synchronize(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def device_package(request_id: str, blocks: torch.Tensor, tokens: int) -> KVPackage:
    """A package of blocks on the device, without checksums (what CUDA IPC sends)."""
    return KVPackage(
        request_id=request_id,
        geometry=TRANSFER_GEOMETRY,
        prompt_token_ids=[1] * tokens,
        output_token_ids=[2],
        num_computed_tokens=tokens,
        sampling=SamplingParams(max_new_tokens=16, ignore_eos=True).to_dict(),
        blocks=blocks,
        checksum_algorithm=UNCHECKED,
        block_checksums=[],
    )


# ---- the prefill process -----------------------------------------------------------------


class PrefillSide:
    """Answers one request per channel: stage blocks, send them, or prefill a prompt."""

    def __init__(self, setup: Setup, engine: Engine) -> None:
        self.setup, self.engine = setup, engine
        self.staged: dict[int, torch.Tensor] = {}
        self.stopped = asyncio.Event()
        self.generator = torch.Generator().manual_seed(5)

    async def handle(self, channel: KVChannel) -> None:
        request = await channel.receive_message()
        op = request["op"]
        transport = channel.negotiate(request.get("transport"))
        if op == "stop":
            await channel.send_message({"stopping": True})
            self.stopped.set()
        elif op == "stage":
            tokens = int(request["tokens"])
            count = -(-tokens // BLOCK_SIZE)
            shape = (count, *TRANSFER_GEOMETRY.block_shape)
            dtype = TRANSFER_GEOMETRY.torch_dtype
            self.staged[tokens] = torch.randn(shape, device=self.setup.device).to(dtype)
            synchronize(self.setup)
            await channel.send_message({"staged": tokens})
        elif op == "transfer":
            tokens = int(request["tokens"])
            package = device_package(f"t{tokens}", self.staged[tokens], tokens)
            if transport == "tcp":  # the TCP path: host copy and a checksum per block
                package = KVPackage.build(
                    package.request_id,
                    package.geometry,
                    package.prompt_token_ids,
                    package.output_token_ids,
                    package.num_computed_tokens,
                    package.sampling,
                    package.blocks,
                )
            await channel.send_package(package)
        elif op == "ttft":
            await self.prefill(channel, int(request["tokens"]), request["mode"], transport)
        if op in ("transfer", "ttft"):
            await channel.receive_message()  # the decode side has what it needs

    async def prefill(self, channel: KVChannel, tokens: int, mode: str, transport: str) -> None:
        engine = self.engine
        vocab = engine.config.vocab_size
        prompt = torch.randint(0, vocab, (tokens,), generator=self.generator).tolist()
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        request_id = engine.add_request(prompt, params)
        while request_id not in engine.parked:
            engine.step()
        if mode == "colocated":
            engine.abort(request_id)
            with contextlib.suppress(KeyError, ValueError):
                engine.pop_finished(request_id)
            await channel.send_message({"finished": True})
            return
        # TCP: the host copy and a checksum per block; CUDA IPC: the blocks stay on the GPU.
        package = engine.export_kv(request_id, on_device=transport != "tcp")
        await channel.send_package(package)
        with contextlib.suppress(KeyError, ValueError):
            engine.pop_finished(request_id)


def prefill_process(setup: Setup, addresses: Any) -> None:
    if setup.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(MEMORY_FRACTION)
    engine = make_engine(setup, EngineRole.PREFILL)
    side = PrefillSide(setup, engine)

    async def serve() -> None:
        transport = transport_for(setup, setup.transports[0])
        listener = await transport.listen("127.0.0.1", 0, side.handle)
        addresses.put(listener.address)
        await side.stopped.wait()
        await listener.close()

    asyncio.run(serve())


# ---- the decode side (this process) ------------------------------------------------------


class DecodeSide:
    def __init__(self, setup: Setup, address: str, engine: Engine) -> None:
        self.setup, self.address, self.engine = setup, address, engine

    async def call(
        self, message: dict[str, Any], transport: str = "tcp", receive: bool = False
    ) -> tuple[float, KVPackage | dict[str, Any]]:
        """Seconds from sending `message` to its answer (a package on this GPU, or a message)."""
        channel = await transport_for(self.setup, transport).connect(self.address, 10.0)
        try:
            started = time.perf_counter()
            await channel.send_message({**message, "transport": transport})
            if receive:
                answer: Any = await channel.receive_package()
                answer.blocks = answer.blocks.to(self.setup.device)
                synchronize(self.setup)
            else:
                answer = await channel.receive_message()
            elapsed = time.perf_counter() - started
            if message["op"] in ("transfer", "ttft"):
                await channel.send_message({"done": True})
            return elapsed, answer
        finally:
            await channel.close()

    async def transfer(self, tokens: int, transport: str) -> float:
        seconds, _ = await self.call({"op": "transfer", "tokens": tokens}, transport, True)
        return seconds

    async def ttft(self, tokens: int, mode: str, transport: str) -> float:
        message = {"op": "ttft", "tokens": tokens, "mode": mode}
        if mode == "colocated":
            seconds, _ = await self.call(message, transport)
            return seconds
        started = time.perf_counter()
        _, package = await self.call(message, transport, True)
        assert isinstance(package, KVPackage)
        request_id = self.engine.import_kv(package)
        synchronize(self.setup)
        seconds = time.perf_counter() - started
        self.engine.abort(request_id)
        with contextlib.suppress(KeyError, ValueError):
            self.engine.pop_finished(request_id)
        return seconds


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


async def measure(setup: Setup, side: DecodeSide, record: dict[str, Any], out: Path) -> None:
    began = time.monotonic()
    per_block = TRANSFER_GEOMETRY.block_nbytes
    for tokens in setup.transfer_tokens:
        await side.call({"op": "stage", "tokens": tokens})
        for transport in setup.transports:
            if time.monotonic() - began > TIME_BUDGET_S:
                record["skipped"].append(f"transfer {transport} {tokens}")
                continue
            await side.transfer(tokens, transport)  # warm: first touch, connections
            times = [await side.transfer(tokens, transport) for _ in range(setup.transfer_repeats)]
            nbytes = -(-tokens // BLOCK_SIZE) * per_block
            row = {
                "transport": transport,
                "tokens": tokens,
                "bytes": int(nbytes),
                "seconds": times,
                "median_ms": median_ms(times),
                "gbps": round(nbytes / statistics.median(times) / 1e9, 3),
            }
            record["transfer"].append(row)
            print(
                f"transfer {transport:8s} {tokens:6d} tokens {nbytes / 2**20:9.1f} MiB "
                f"{row['median_ms']:9.2f} ms {row['gbps']:7.2f} GB/s",
                flush=True,
            )
            write(out, record)
    modes = [("colocated", "tcp"), *(("disaggregated", t) for t in setup.transports)]
    for tokens in setup.prompt_tokens:
        for mode, transport in modes:
            await side.ttft(tokens, mode, transport)  # warm: kernels for this length
        colocated = 0.0
        for mode, transport in modes:
            if time.monotonic() - began > TIME_BUDGET_S:
                record["skipped"].append(f"ttft {mode} {transport} {tokens}")
                continue
            times = [await side.ttft(tokens, mode, transport) for _ in range(setup.ttft_repeats)]
            ms = median_ms(times)
            if mode == "colocated":
                colocated = ms
            row = {
                "prompt_tokens": tokens,
                "mode": mode,
                "transport": None if mode == "colocated" else transport,
                "seconds": times,
                "median_ms": ms,
                "overhead_ms": round(ms - colocated, 3),
            }
            record["ttft"].append(row)
            label = "colocated" if mode == "colocated" else f"disagg/{transport}"
            print(
                f"ttft {label:18s} {tokens:6d} tokens {ms:9.2f} ms  overhead "
                f"{row['overhead_ms']:+8.2f} ms",
                flush=True,
            )
            write(out, record)
    await side.call({"op": "stop"})


def write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_transfer.json").write_text(json.dumps(record, indent=1) + "\n")


def fitted(record: dict[str, Any]) -> dict[str, Any]:
    """The simulator's fit of these rows (latency + bytes / bandwidth), where it imports."""
    try:
        from tessera.sim.transfer import MeasuredTransport
    except ImportError as error:  # the simulator's dependencies are not on the GPU machine
        return {"error": f"not fitted here: {error}"}
    fits = MeasuredTransport.fit_rows(record["transfer"])
    return {name: dataclasses.asdict(fit) for name, fit in fits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kv_transfer.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, TCP only")
    args = parser.parse_args(argv)
    setup = setup_for(args.smoke)
    if setup.device == "cuda" and not torch.cuda.is_available():
        print(
            "kv_transfer_bench: error: no CUDA device; run with --smoke on a CPU", file=sys.stderr
        )
        raise SystemExit(2)
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")
    addresses = context.Queue()
    child = context.Process(target=prefill_process, args=(setup, addresses), daemon=True)
    child.start()
    if setup.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(MEMORY_FRACTION)
    engine = make_engine(setup, EngineRole.DECODE)
    address = addresses.get(timeout=300)
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    print(
        f"{device}: prefill process at {address}, ready after {time.monotonic() - started:.0f} s; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {DEFAULT_CHECKSUM}",
        flush=True,
    )
    record: dict[str, Any] = {
        "bench": "kv_transfer",
        "device": device,
        "smoke": setup.smoke,
        "model": "tiny" if setup.smoke else "llama3-8b-shape, random weights",
        "memory_fraction_per_process": MEMORY_FRACTION,
        "transfer_kv_bytes_per_token": TRANSFER_GEOMETRY.block_nbytes // BLOCK_SIZE,
        "engine_kv_bytes_per_token": engine.kv_geometry.block_nbytes // BLOCK_SIZE,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "load_average_at_start": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "checksum": DEFAULT_CHECKSUM,
        "transfer": [],
        "ttft": [],
        "skipped": [],
    }
    try:
        asyncio.run(measure(setup, DecodeSide(setup, address, engine), record, args.out))
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    record["load_average_at_end"] = list(os.getloadavg())
    record["fit"] = fitted(record)
    record["wall_s"] = round(time.monotonic() - started, 1)
    write(args.out, record)
    print(json.dumps(record["fit"]), flush=True)
    print(f"wrote {args.out / 'kv_transfer.json'} in {record['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
