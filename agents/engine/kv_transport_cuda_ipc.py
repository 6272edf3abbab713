"""KV packages between two processes on one GPU through CUDA IPC: a `KVTransport` whose
channels send a memory handle in place of the blocks' bytes.

Where it sits: `kv_transport.py` holds the interface, the TCP transport and `choose_transport`
(which picks this one when both ends run on the same host and GPU); this module is the
same-host variant. NIXL/UCX would be a third file of the same shape, sending a remote-memory
descriptor where this sends a CUDA IPC handle.

A channel is a TCP channel (the control stream: JSON messages, and the TCP frames as the
fallback) that can also carry one more frame kind, CUDA_IPC_PACKAGE: the package's header (the
same fields as on the wire, block checksums included when the package has them) and the handle
of a CUDA tensor holding its blocks, as torch's own multiprocessing shares CUDA tensors
(`torch.multiprocessing.reductions.reduce_tensor`). The receiver opens the handle, copies the
blocks into its own memory (in a worker thread, on a stream of its own), synchronises that
stream, and answers `{"ipc": "copied"}`; only then does the sender drop its tensor (CUDA frees
memory another process still reads otherwise). If the receiver cannot open the handle (another
GPU after all, a container without the IPC namespace, no CUDA) it answers `{"ipc": "failed",
"error": ...}` and the sender sends the same package as TCP frames on the same channel: a
transfer never fails for want of IPC.

The handle travels as JSON, not pickle: a pickle from the peer would run whatever code it
names. Its arguments are ints, bytes, a dtype, sizes, and two classes, each mapped back from an
allowlist.

Checksums: a package with block checksums (what `export_kv` builds) is verified on receipt,
after the copy, so a package corrupted by the test hook is refused as over TCP. A package built
without checksums (`UNCHECKED`: blocks read straight from the KV cache on the device, never on
a wire) skips hashing; hashing would copy every block to the host, the cost IPC avoids.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ValidationError
from tessera.agents.engine.kv_transfer import (
    UNCHECKED,
    KVChecksumError,
    KVGeometry,
    KVPackage,
    KVTransferError,
    _header_error,
    _WireHeader,
)
from tessera.agents.engine.kv_transport import (
    ChannelHandler,
    FrameKind,
    KVChannel,
    KVListener,
    KVTransport,
    KVTransportError,
    TcpChannel,
    TcpTransport,
    decode_message,
)

CUDA_IPC = "cuda_ipc"

Handle = dict[str, Any]
"""A shared tensor's handle, JSON-safe."""
ShareFunction = Callable[[torch.Tensor], Handle]
OpenFunction = Callable[[Handle, torch.device], torch.Tensor]


def _allowed_classes() -> dict[str, type]:
    classes: list[type] = [torch.Tensor, torch.nn.Parameter, torch.UntypedStorage]
    classes.append(torch.storage.TypedStorage)
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def _encode(value: Any) -> Any:
    if isinstance(value, type):
        name = f"{value.__module__}.{value.__qualname__}"
        if name not in _allowed_classes():
            raise KVTransportError(f"CUDA IPC handle names class {name}, not shareable")
        return {"class": name}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise KVTransportError(f"CUDA IPC handle holds a {type(value).__name__}, not shareable")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise KVTransportError(f"CUDA IPC handle field of type {type(value).__name__}")
    if set(value) == {"class"}:
        cls = _allowed_classes().get(value["class"])
        if cls is None:
            raise KVTransportError(f"CUDA IPC handle names class {value['class']!r}: refused")
        return cls
    if set(value) == {"dtype"}:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise KVTransportError(f"CUDA IPC handle dtype {value['dtype']!r} is unknown")
        return dtype
    if set(value) == {"bytes"}:
        return base64.b64decode(value["bytes"], validate=True)
    if set(value) == {"size"}:
        return torch.Size(int(v) for v in value["size"])
    if set(value) == {"tuple"}:
        return tuple(_decode(v) for v in value["tuple"])
    raise KVTransportError(f"CUDA IPC handle field {sorted(value)} is unknown")


MAX_SHARED_BLOCKS = 1 << 20
"""A bound on a header's block count (a whole GPU of 16-token blocks is far fewer)."""

STORAGE_DEVICE_ARG = 6
"""Index of the storage's device in `rebuild_cuda_tensor`'s arguments: the receiver puts its own
index there (the same GPU may have another index under its CUDA_VISIBLE_DEVICES)."""


def share_cuda_tensor(tensor: torch.Tensor) -> Handle:
    """The IPC handle of a CUDA tensor (torch's own reduction, as torch.multiprocessing sends
    it to a child process)."""
    from torch.multiprocessing.reductions import reduce_tensor

    if tensor.device.type != "cuda":
        raise KVTransportError(f"CUDA IPC shares CUDA tensors; this one is on {tensor.device}")
    _, args = reduce_tensor(tensor)
    return {"torch": torch.__version__, "args": [_encode(a) for a in args]}


def open_cuda_tensor(handle: Handle, device: torch.device) -> torch.Tensor:
    """The tensor behind a handle of another process, on this process's `device`."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available():
        raise KVTransportError("CUDA IPC handle received, but this process has no CUDA")
    version = handle.get("torch")
    if version != torch.__version__:
        raise KVTransportError(f"CUDA IPC handle from torch {version}; this is {torch.__version__}")
    args = [_decode(a) for a in handle.get("args") or []]
    if len(args) <= STORAGE_DEVICE_ARG:
        raise KVTransportError(f"CUDA IPC handle has {len(args)} arguments")
    args[STORAGE_DEVICE_ARG] = device.index if device.index is not None else 0
    try:
        return rebuild_cuda_tensor(*args)
    except (RuntimeError, TypeError) as error:
        raise KVTransportError(f"cannot open the CUDA IPC handle: {error}") from error


def _package_fields(package: KVPackage) -> dict[str, Any]:
    return {
        "request_id": package.request_id,
        "geometry": {
            "model_signature": package.geometry.model_signature,
            "num_layers": package.geometry.num_layers,
            "num_kv_heads": package.geometry.num_kv_heads,
            "head_dim": package.geometry.head_dim,
            "block_size": package.geometry.block_size,
            "dtype": package.geometry.dtype,
        },
        "prompt_token_ids": list(package.prompt_token_ids),
        "output_token_ids": list(package.output_token_ids),
        "num_computed_tokens": package.num_computed_tokens,
        "sampling": dict(package.sampling),
        "num_blocks": package.num_blocks,
        "checksum_algorithm": package.checksum_algorithm,
        "block_checksums": list(package.block_checksums),
    }


def with_checksums(package: KVPackage) -> KVPackage:
    """The package as TCP sends it: blocks on the host, each with its checksum."""
    if package.checksum_algorithm != UNCHECKED:
        return package
    return KVPackage.build(
        request_id=package.request_id,
        geometry=package.geometry,
        prompt_token_ids=package.prompt_token_ids,
        output_token_ids=package.output_token_ids,
        num_computed_tokens=package.num_computed_tokens,
        sampling=package.sampling,
        blocks=package.blocks,
    )


class CudaIpcChannel(TcpChannel):
    """A TCP channel that sends packages as CUDA IPC handles once `negotiate` enabled it:
    those whose blocks are on this channel's device; others travel as TCP frames."""

    def __init__(
        self,
        tcp: TcpChannel,
        device: torch.device,
        share: ShareFunction = share_cuda_tensor,
        open_handle: OpenFunction = open_cuda_tensor,
    ) -> None:
        super().__init__(tcp.sock, tcp.timeout_s)
        self.pin_memory, self.receive_device = tcp.pin_memory, tcp.receive_device
        self.device, self.share, self.open_handle = device, share, open_handle
        self.ipc = False
        self._stream: Any = None
        """The CUDA stream received copies run on (made at the first one)."""
        self.fallbacks = 0
        """Packages this channel sent as TCP frames after the peer could not open a handle."""

    def negotiate(self, requested: str | None) -> str:
        self.ipc = requested == CUDA_IPC
        return CUDA_IPC if self.ipc else "tcp"

    async def send_package(self, package: KVPackage, corrupt: bool = False) -> int:
        blocks = package.blocks
        if not self.ipc or blocks.device.type != self.device.type or package.num_blocks == 0:
            # Blocks on the host (what export_kv builds) gain nothing from a handle.
            return await super().send_package(with_checksums(package), corrupt)
        shared = blocks.contiguous()
        if corrupt:  # after the checksums were taken, as the TCP hook does
            shared = shared.clone()
            flat = shared.view(-1).view(torch.uint8)
            flat[flat.numel() // 2] ^= 1
        header = _package_fields(package)
        header["handle"] = self.share(shared)
        await self._write(FrameKind.CUDA_IPC_PACKAGE, json.dumps(header).encode())
        answer = await self.receive_message()  # `shared` stays alive until the peer copied it
        if answer.get("ipc") == "copied":
            return int(shared.numel() * shared.element_size())
        if answer.get("ipc") != "failed":
            raise KVTransportError(f"unexpected answer to a CUDA IPC package: {answer}")
        self.fallbacks += 1
        return await super().send_package(with_checksums(package), corrupt)

    async def receive_package(self, first: tuple[FrameKind, bytes] | None = None) -> KVPackage:
        kind, payload = first if first is not None else await self.receive()
        if kind != FrameKind.CUDA_IPC_PACKAGE:
            return await super().receive_package((kind, payload))
        header = decode_message(payload)
        handle = header.pop("handle", None)
        unchecked = header.get("checksum_algorithm") == UNCHECKED
        count = header.get("num_blocks")
        if unchecked and header.get("block_checksums") == [] and isinstance(count, int):
            if not 0 <= count <= MAX_SHARED_BLOCKS:
                raise KVTransferError(f"KV package header field num_blocks: {count} out of range")
            header["block_checksums"] = [UNCHECKED] * count  # the schema wants one per block
        try:
            wire = _WireHeader.model_validate(header)
        except ValidationError as error:
            raise _header_error(error) from None
        if unchecked:
            wire.block_checksums = []
        geometry = KVGeometry(**wire.geometry.model_dump())
        try:
            if not isinstance(handle, dict):
                raise KVTransportError("CUDA IPC package without a handle")
            blocks = await asyncio.to_thread(self._copy_shared, handle)
        except (KVTransportError, RuntimeError) as error:
            await self.send_message({"ipc": "failed", "error": str(error)})
            return await super().receive_package()
        await self.send_message({"ipc": "copied"})
        expected = (wire.num_blocks, *geometry.block_shape)
        if tuple(blocks.shape) != expected or blocks.dtype != geometry.torch_dtype:
            raise KVChecksumError(
                f"{wire.request_id}: shared blocks are {blocks.dtype} {tuple(blocks.shape)}, "
                f"the header says {geometry.dtype} {expected}"
            )
        package = KVPackage.from_wire(wire, geometry, blocks, wire.checksum_algorithm)
        if wire.checksum_algorithm != UNCHECKED or wire.block_checksums:
            await asyncio.to_thread(package.verify)  # KVChecksumError names the first bad block
        return package

    def _copy_shared(self, handle: Handle) -> torch.Tensor:
        """The peer's blocks copied into memory of ours (run in a worker thread).

        Not on the event loop, and not on the default stream: the engine thread's decode steps
        run there, so a copy queued behind them waited a whole step, and the loop (every stream's
        next token, /ready) with it. The copy runs on this channel's own stream, in memory of that
        stream's pool, recorded as used on the default stream where the engine imports it (the
        allocator then never hands it out while an import still reads it)."""
        shared = self.open_handle(handle, self.device)
        if shared.device.type != "cuda":
            return shared.to(self.device, copy=True)
        if self._stream is None:
            self._stream = torch.cuda.Stream(shared.device)
        with torch.cuda.stream(self._stream):
            blocks = shared.to(self.device, copy=True)
        self._stream.synchronize()  # the sender may drop `shared` once we answer
        blocks.record_stream(torch.cuda.default_stream(blocks.device))
        return blocks


class CudaIpcTransport(KVTransport):
    """Channels that share KV through CUDA IPC with a peer on the same GPU, TCP otherwise.

    `share` and `open_handle` are the two CUDA calls; a test without a GPU gives stand-ins
    to exercise the protocol (acknowledgement, fallback, checksums)."""

    name = CUDA_IPC

    def __init__(
        self,
        device: torch.device | str,
        timeout_s: float = 30.0,
        share: ShareFunction = share_cuda_tensor,
        open_handle: OpenFunction = open_cuda_tensor,
    ) -> None:
        self.device = torch.device(device)
        self.tcp = TcpTransport(timeout_s)
        self.share, self.open_handle = share, open_handle

    def _wrap(self, channel: KVChannel) -> CudaIpcChannel:
        assert isinstance(channel, TcpChannel)
        return CudaIpcChannel(channel, self.device, self.share, self.open_handle)

    async def connect(self, address: str, timeout_s: float) -> KVChannel:
        channel = self._wrap(await self.tcp.connect(address, timeout_s))
        channel.negotiate(CUDA_IPC)
        return channel

    async def listen(self, host: str, port: int, handler: ChannelHandler) -> KVListener:
        async def wrapped(channel: KVChannel) -> None:
            await handler(self._wrap(channel))

        return await self.tcp.listen(host, port, wrapped)


def cuda_ipc_available() -> bool:
    """Whether this process could share CUDA tensors at all."""
    with contextlib.suppress(Exception):
        return bool(torch.cuda.is_available())
    return False


__all__ = [
    "CUDA_IPC",
    "CudaIpcChannel",
    "CudaIpcTransport",
    "KVTransferError",
    "cuda_ipc_available",
    "open_cuda_tensor",
    "share_cuda_tensor",
    "with_checksums",
]
