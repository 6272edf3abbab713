"""Micro-bench of the TCP KV path's stages over one package (issue 14).

Stages, each timed alone on the same blocks: `build` (host copy + a checksum per block; from a
GPU: pinned, chunked, overlapped with the hashing), `to_bytes`, `from_bytes`, `import`
(check_compatible on a received package, then one `.to(device)`), `send` (TcpTransport over
loopback, sender and receiver in one event loop, so it is the CPU both ends spend: framing,
the socket calls, verification), `send_to_device` (on a GPU: the same, the receiver copying
each block to the GPU as it lands) and `raw_loopback` (the same bytes through a plain blocking
socket between two threads, no framing or checksums: the kernel's floor for `send`). MB/s is
10^6 bytes of KV per second. Runs anywhere (CPU by default):

    python bench/kv_package_bench.py --mib 128 --out /tmp/kv_package
    python bench/kv_package_bench.py --mib 1024 --device cuda --out $OUT/kv_package   # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from tessera.agents.engine.kv_transfer import DEFAULT_CHECKSUM, KVGeometry, KVPackage
from tessera.agents.engine.kv_transport import KVChannel, TcpTransport

GEOMETRY = KVGeometry("llama3-8b-shape", 32, 8, 128, 16, "bfloat16")
"""Llama-3-8B's KV layout (2 MiB blocks of 16 tokens), as bench/kv_transfer_bench.py uses."""


def _best_s(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


async def _loopback_s(
    package: KVPackage, repeats: int, device: torch.device | None = None
) -> float:
    transport = TcpTransport(timeout_s=120.0, device=device)
    received: asyncio.Queue[KVPackage] = asyncio.Queue()

    async def handler(channel: KVChannel) -> None:
        await received.put(await channel.receive_package())

    listener = await transport.listen("127.0.0.1", 0, handler)
    best = float("inf")
    try:
        for _ in range(repeats):
            channel = await transport.connect(listener.address, 10.0)
            start = time.perf_counter()
            await channel.send_package(package)
            got = await received.get()
            best = min(best, time.perf_counter() - start)
            await channel.close()
            sent = package.blocks.view(torch.uint8)
            if not torch.equal(got.blocks.view(torch.uint8).to(sent.device), sent):
                raise AssertionError("loopback package differs from the one sent")
    finally:
        await listener.close()
    return best


def _raw_loopback_s(payload: memoryview, repeats: int) -> float:
    """Seconds for `payload` through one loopback TCP connection, sendall to recv_into in
    another thread: what the kernel gives, the bound for the transport's `send`."""
    target = memoryview(bytearray(payload.nbytes))
    best = float("inf")
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            sender = socket.create_connection(server.getsockname())
            receiver, _ = server.accept()

            def receive(sock: socket.socket = receiver) -> None:
                got = 0
                while got < target.nbytes:
                    got += sock.recv_into(target[got:])

            thread = threading.Thread(target=receive)
            start = time.perf_counter()
            thread.start()
            sender.sendall(payload)
            thread.join()
            best = min(best, time.perf_counter() - start)
            sender.close()
            receiver.close()
    if zlib.crc32(target) != zlib.crc32(payload):
        raise AssertionError("raw loopback bytes differ")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="package size in MiB (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where blocks live"
    )
    parser.add_argument("--out", type=Path, help="folder for kv_package.json")
    args = parser.parse_args(argv)
    if args.mib < 2 or args.repeats < 1:
        print("kv_package_bench: error: --mib must be >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kv_package_bench: error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    count = args.mib * (1 << 20) // GEOMETRY.block_nbytes
    shape = (count, *GEOMETRY.block_shape)
    blocks = torch.randn(shape, device=device).to(GEOMETRY.torch_dtype)
    nbytes = count * GEOMETRY.block_nbytes
    tokens = count * GEOMETRY.block_size

    def build() -> KVPackage:
        return KVPackage.build("bench", GEOMETRY, [1] * tokens, [2], tokens, {}, blocks)

    stages: dict[str, float] = {}
    stages["build"], package = _best_s(build, args.repeats)
    stages["to_bytes"], wire = _best_s(package.to_bytes, args.repeats)
    stages["from_bytes"], parsed = _best_s(lambda: KVPackage.from_bytes(wire), args.repeats)

    def import_() -> torch.Tensor:
        parsed.check_compatible(GEOMETRY)
        return parsed.blocks.to(device)

    stages["import"], _ = _best_s(import_, args.repeats)
    stages["send"] = asyncio.run(_loopback_s(package, args.repeats))
    if device.type == "cuda":
        stages["send_to_device"] = asyncio.run(_loopback_s(package, args.repeats, device))
    stages["raw_loopback"] = _raw_loopback_s(package.payload_view(), args.repeats)
    rows = {
        name: {"seconds": round(s, 4), "mb_per_s": round(nbytes / s / 1e6, 1)}
        for name, s in stages.items()
    }
    print(
        f"{args.mib} MiB, {count} blocks, checksum {DEFAULT_CHECKSUM}, device {device}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    for name, row in rows.items():
        print(f"  {name:<14} {row['seconds'] * 1e3:9.1f} ms {row['mb_per_s']:10.1f} MB/s")
    record = {
        "mib": args.mib,
        "checksum": DEFAULT_CHECKSUM,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        **rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_package.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
