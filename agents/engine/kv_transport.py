"""Moving KV packages between engine processes: a transport interface and its TCP implementation.

A transport opens *channels* (one per transfer) between a decode instance, which connects, and a
prefill instance, which listens. On a channel both sides exchange small JSON messages (the
prefill request, an answer without KV, an error) and KV packages. A package travels block by
block: one frame with the package's checksummed header (`KVPackage.header_bytes`), one frame
per block in order (written straight from the blocks' host memory), then an end frame; the
receiver joins the blocks into one buffer and parses it with `KVPackage.from_parts` (the blocks
become a view of that buffer, no further copy), which verifies the header's and every block's
checksum. So a package corrupted anywhere between the sender's export and the receiver's import
is refused with a KVChecksumError, never imported.

Frame: kind (u8), index (u32), payload length (u64), CRC-32 of the payload (u32), payload, all
little-endian. The CRC catches damage to the framing itself at once (a flipped length would
otherwise read garbage for the rest of the stream); the package's own checksums are the
end-to-end check. Lengths are bounded, so a corrupted length cannot allocate without limit.

The interface is what another transport implements: same-host CUDA IPC
(`kv_transport_cuda_ipc.py`) sends a memory handle in place of the block frames, NIXL/UCX would
send a remote-memory descriptor; `KVChannel` and `KVTransport` are the seams, and the JSON
messages stay on the TCP control stream. Each end describes itself with a `KVEndpoint` (host,
device, the transports it runs) and `choose_transport` picks the fastest both can use.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import json
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tessera.agents.engine.kv_transfer import (
    KVChecksumError,
    KVPackage,
    KVTransferError,
)

FRAME = struct.Struct("<BIQI")
MAX_MESSAGE_BYTES = 16 << 20
MAX_BLOCK_BYTES = 1 << 30
STREAM_LIMIT_BYTES = 4 << 20
"""The stream reader's buffer limit: a whole 2 MiB block is read without pausing the socket
(asyncio's 64 KiB default pauses and resumes it 30 times per block)."""


class FrameKind(enum.IntEnum):
    MESSAGE = 1
    PACKAGE_HEADER = 2
    BLOCK = 3
    PACKAGE_END = 4
    CUDA_IPC_PACKAGE = 5
    """A package's header and the CUDA IPC handle of its blocks (kv_transport_cuda_ipc.py)."""


class KVTransportError(ConnectionError):
    """The peer went away, did not answer in time, or spoke out of protocol."""


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"KV address {address!r}: expected host:port with a port in 1..65535")
    return host.strip("[]"), int(port)


def flip_one_bit(data: bytes | bytearray | memoryview) -> bytes:
    """`data` with its middle byte's lowest bit flipped: the fault-injection hook's damage."""
    if not data:
        return bytes(data)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x01
    return bytes(damaged)


class KVChannel(abc.ABC):
    """One transfer's connection: JSON messages and KV packages, both ways."""

    def negotiate(self, requested: str | None) -> str:
        """The transport the receiver asked for (in its request message), granted when this
        channel can carry it; returns what packages will travel by. TCP frames are always
        possible."""
        return "tcp"

    @abc.abstractmethod
    async def send_message(self, message: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def receive_message(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def send_package(self, package: KVPackage, corrupt: bool = False) -> int:
        """Send a package; returns the bytes sent. `corrupt` is a test hook: one bit of the
        first block is flipped after its checksum was taken (damage no link-level check sees),
        so that tests can prove the receiver refuses it."""

    @abc.abstractmethod
    async def receive_package(self, first: tuple[FrameKind, bytes] | None = None) -> KVPackage:
        """Receive and verify a package (KVChecksumError / KVTransferError if it is bad)."""

    @abc.abstractmethod
    async def receive(self) -> tuple[FrameKind, bytes]:
        """The next frame, for a receiver that accepts either a message or a package."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class KVListener(abc.ABC):
    """A listening endpoint; `address` is what peers connect to."""

    address: str

    @abc.abstractmethod
    async def close(self) -> None: ...


ChannelHandler = Callable[[KVChannel], Awaitable[None]]


class KVTransport(abc.ABC):
    """Opens channels to peers and accepts theirs."""

    name: str

    @abc.abstractmethod
    async def connect(self, address: str, timeout_s: float) -> KVChannel: ...

    @abc.abstractmethod
    async def listen(self, host: str, port: int, handler: ChannelHandler) -> KVListener: ...


TRANSPORT_PREFERENCE = ("cuda_ipc", "tcp")
"""Fastest first. NIXL/UCX would go before tcp: RDMA between hosts."""


@dataclass(frozen=True)
class KVEndpoint:
    """What one end tells the other about itself (a prefill instance in its KV endpoint's
    answer; a decode instance knows its own)."""

    host_id: str
    """The kernel's boot id: equal for two containers on one node, different across nodes."""
    device: str
    """The GPU's UUID, or "cpu"."""
    transports: tuple[str, ...] = ("tcp",)

    def as_dict(self) -> dict[str, Any]:
        return {"host_id": self.host_id, "device": self.device, "transports": list(self.transports)}

    @classmethod
    def from_dict(cls, data: Any) -> KVEndpoint:
        """The peer's description; a peer that sent none (an older server) speaks TCP only."""
        if not isinstance(data, dict):
            return cls(host_id="", device="unknown")
        transports = data.get("transports")
        names = (
            tuple(t for t in transports if isinstance(t, str))
            if isinstance(transports, list)
            else ()
        )
        return cls(
            str(data.get("host_id", "")), str(data.get("device", "unknown")), names or ("tcp",)
        )


def choose_transport(local: KVEndpoint, remote: KVEndpoint) -> str:
    """The fastest transport both ends run: CUDA IPC only between two processes on the same
    host and the same GPU (a handle means nothing in another machine's or GPU's memory); TCP
    otherwise. Raises KVTransportError when they share none."""
    for name in TRANSPORT_PREFERENCE:
        if name not in local.transports or name not in remote.transports:
            continue
        if name == "cuda_ipc" and not (
            local.host_id
            and local.host_id == remote.host_id
            and local.device not in ("cpu", "unknown")
            and local.device == remote.device
        ):
            continue
        return name
    raise KVTransportError(
        f"no KV transport in common: this end runs {', '.join(local.transports)}, "
        f"the peer {', '.join(remote.transports)}"
    )


def host_id() -> str:
    """The kernel's boot id (shared by every container of a node), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


def decode_message(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as error:
        raise KVTransportError(f"KV channel message is not JSON: {error}") from error
    if not isinstance(message, dict):
        raise KVTransportError("KV channel message is not a JSON object")
    return message


class TcpChannel(KVChannel):
    """A channel over one asyncio TCP stream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
    ) -> None:
        self.reader, self.writer, self.timeout_s = reader, writer, timeout_s

    async def _write(
        self,
        kind: FrameKind,
        payload: bytes | bytearray | memoryview,
        index: int = 0,
        crc: int | None = None,
    ) -> None:
        """One frame; `crc`, when the caller already has the payload's CRC-32 (a block of a
        crc32 package), saves hashing it again. A memoryview payload is written as is (the
        stream copies only what the socket does not take at once)."""
        crc = zlib.crc32(payload) if crc is None else crc
        self.writer.write(FRAME.pack(kind, index, len(payload), crc))
        self.writer.write(payload)
        try:
            await asyncio.wait_for(self.writer.drain(), self.timeout_s)
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"sending to the KV peer failed: {error!r}") from error

    async def _read_frame(self, check_block_crc: bool = True) -> tuple[FrameKind, int, bytes, int]:
        """The next frame and its CRC-32, checked unless it is a BLOCK and not
        `check_block_crc` (`receive_package` checks those once the package is parsed)."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(FRAME.size), self.timeout_s)
            kind, index, length, crc = FRAME.unpack(head)
            if kind not in FrameKind.__members__.values():
                raise KVChecksumError(f"KV frame of unknown kind {kind}: the stream is corrupted")
            limit = MAX_BLOCK_BYTES if kind == FrameKind.BLOCK else MAX_MESSAGE_BYTES
            if length > limit:
                raise KVChecksumError(f"KV frame of {length} bytes (limit {limit}): corrupted")
            payload = await asyncio.wait_for(self.reader.readexactly(length), self.timeout_s)
        except asyncio.IncompleteReadError as error:
            raise KVTransportError("the KV peer closed the connection mid-transfer") from error
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"receiving from the KV peer failed: {error!r}") from error
        if (check_block_crc or kind != FrameKind.BLOCK) and zlib.crc32(payload) != crc:
            raise KVChecksumError(f"KV frame {FrameKind(kind).name} {index} fails its CRC-32")
        return FrameKind(kind), index, payload, crc

    async def receive(self) -> tuple[FrameKind, bytes]:
        kind, _, payload, _ = await self._read_frame()
        return kind, payload

    async def send_message(self, message: dict[str, Any]) -> None:
        await self._write(FrameKind.MESSAGE, json.dumps(message).encode())

    async def receive_message(self) -> dict[str, Any]:
        kind, payload = await self.receive()
        if kind != FrameKind.MESSAGE:
            raise KVTransportError(f"expected a message on the KV channel, got {kind.name}")
        return decode_message(payload)

    async def send_package(self, package: KVPackage, corrupt: bool = False) -> int:
        header = package.header_bytes()
        await self._write(FrameKind.PACKAGE_HEADER, header)
        payload = package.payload_view()
        size = package.geometry.block_nbytes
        # A crc32 package's block checksums are the frames' CRCs, if they still match the blocks.
        reuse = package.checksum_algorithm == "crc32" and package._verified_unchanged()
        for index in range(package.num_blocks):
            block: bytes | memoryview = payload[index * size : (index + 1) * size]
            crc = int(package.block_checksums[index], 16) if reuse else None
            if corrupt and index == 0:
                block, crc = flip_one_bit(block), None
            await self._write(FrameKind.BLOCK, block, index, crc)
        await self._write(FrameKind.PACKAGE_END, b"", package.num_blocks)
        return len(header) + payload.nbytes

    async def receive_package(self, first: tuple[FrameKind, bytes] | None = None) -> KVPackage:
        kind, header = first if first is not None else await self.receive()
        if kind != FrameKind.PACKAGE_HEADER:
            raise KVTransportError(f"expected a KV package header, got {kind.name}")
        num_blocks, block_nbytes = KVPackage.payload_layout(header)
        payload = bytearray(num_blocks * block_nbytes)
        view = memoryview(payload)
        crcs: list[int] = []
        while True:
            kind, index, block, crc = await self._read_frame(check_block_crc=False)
            if kind == FrameKind.PACKAGE_END:
                break
            if kind != FrameKind.BLOCK or index != len(crcs):
                raise KVTransferError(
                    f"KV package out of order: {kind.name} {index} after {len(crcs)} blocks"
                )
            if index >= num_blocks or len(block) != block_nbytes:
                raise KVChecksumError(
                    f"KV frame BLOCK {index} has {len(block)} bytes; the header announces "
                    f"{num_blocks} blocks of {block_nbytes}"
                )
            view[index * block_nbytes : (index + 1) * block_nbytes] = block
            crcs.append(crc)
        view.release()
        if index != len(crcs) or len(crcs) != num_blocks:
            raise KVChecksumError(f"KV package ends after {len(crcs)} of {num_blocks} blocks")
        package = KVPackage.from_parts(header, payload)
        # The frames' CRCs, after the package's own checksums: free when those are CRC-32 too.
        same = package.checksum_algorithm == "crc32"
        for index, crc in enumerate(crcs):
            actual = (
                int(package.block_checksums[index], 16)
                if same
                else zlib.crc32(package.block_bytes(index))
            )
            if actual != crc:
                raise KVChecksumError(f"KV frame BLOCK {index} fails its CRC-32")
        return package

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


@dataclass
class TcpListener(KVListener):
    server: asyncio.Server
    address: str

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2.0)


class TcpTransport(KVTransport):
    """KV over TCP: works between any two hosts; the default."""

    name = "tcp"

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        """Longest wait for any one frame (or a drain) once a channel is open."""

    async def connect(self, address: str, timeout_s: float) -> KVChannel:
        host, port = parse_address(address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=STREAM_LIMIT_BYTES), timeout_s
            )
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"cannot reach the KV peer {address}: {error!r}") from error
        return TcpChannel(reader, writer, self.timeout_s)

    async def listen(self, host: str, port: int, handler: ChannelHandler) -> KVListener:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            channel = TcpChannel(reader, writer, self.timeout_s)
            try:
                await handler(channel)
            finally:
                await channel.close()

        server = await asyncio.start_server(accepted, host, port, limit=STREAM_LIMIT_BYTES)
        bound = server.sockets[0].getsockname()
        return TcpListener(server, f"{host}:{bound[1]}")
