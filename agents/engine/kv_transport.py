"""Moving KV packages between engine processes: a transport interface and its TCP implementation.

A transport opens *channels* (one per transfer) between a decode instance, which connects, and a
prefill instance, which listens. On a channel both sides exchange small JSON messages (the
prefill request, an answer without KV, an error) and KV packages. A package travels block by
block: one frame with the package's checksummed header (`KVPackage.header_bytes`), one frame
per block in order (sent straight from the blocks' host memory), then an end frame; the
receiver verifies the header, receives each block straight into its slot of one buffer
(`IncomingPackage`: the blocks become a view of it) and hashes it on the checksum threads while
the next one arrives, and refuses the package unless the header's and every block's checksum
match. So a package corrupted anywhere between the sender's export and the receiver's import
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
import concurrent.futures
import contextlib
import enum
import json
import logging
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tessera.agents.engine.kv_transfer import (
    Buffer,
    IncomingPackage,
    KVChecksumError,
    KVPackage,
    KVTransferError,
    checksum_pool,
)

log = logging.getLogger(__name__)

FRAME = struct.Struct("<BIQI")
MAX_MESSAGE_BYTES = 16 << 20
MAX_BLOCK_BYTES = 1 << 30
SMALL_FRAME_BYTES = 64 << 10
"""A frame up to this size is sent as one buffer (head and payload joined: one syscall); a
larger one as two, so that its payload is never copied."""
PARALLEL_CRC_BYTES = 8 << 20
"""Frame CRCs of a package this large are taken on the checksum threads."""
LISTEN_BACKLOG = 128
ACCEPT_RETRY_S = 1.0
"""Pause after a failed accept (out of file descriptors) before the next, as asyncio's own."""


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
    """A channel over one non-blocking TCP socket, driven by the event loop's `sock_*` calls.

    Why not asyncio streams: a StreamReader hands each frame out as a new bytes object cut from
    its own buffer, which is itself filled from a new 256 KiB bytes object per read (three
    copies of every block before it reached the package's buffer), and a StreamWriter copies
    whatever the socket does not take at once. Here a block goes from the sender's host tensor
    into the kernel (`sock_sendall` of a memoryview) and from the kernel straight into its slot
    of the receiver's buffer (`sock_recv_into`): the only copies are the kernel's. TCP_NODELAY
    is on (a small frame after a block must not wait for an ACK); the socket buffers are left
    to the kernel's autotuning, which grows them to tcp_rmem/tcp_wmem's ceiling (tens of MiB),
    where setting SO_RCVBUF by hand would turn it off and cap them at net.core.rmem_max.
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.timeout_s = sock, timeout_s
        self._loop = asyncio.get_running_loop()
        self._head = bytearray(FRAME.size)
        self.pin_memory = False
        """Receive packages into page-locked memory (`TcpTransport` sets it on CUDA hosts)."""
        self.receive_device: torch.device | None = None
        """A GPU the received blocks are copied to as they arrive (`IncomingPackage`)."""

    async def _send_bytes(self, *parts: Buffer) -> None:
        """Every byte of `parts`, in order, into the socket (no copy: the kernel reads the
        callers' buffers); KVTransportError if the peer is gone or stalls past the timeout."""
        try:
            for part in parts:
                if len(part):
                    await asyncio.wait_for(self._loop.sock_sendall(self.sock, part), self.timeout_s)
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"sending to the KV peer failed: {error!r}") from error

    async def _write(
        self,
        kind: FrameKind,
        payload: Buffer,
        index: int = 0,
        crc: int | None = None,
    ) -> None:
        """One frame; `crc`, when the caller already has the payload's CRC-32 (a block of a
        crc32 package), saves hashing it again. A small frame is sent as one buffer, a large
        one as its head and then the payload itself (never copied)."""
        crc = zlib.crc32(payload) if crc is None else crc
        head = FRAME.pack(kind, index, len(payload), crc)
        if len(payload) <= SMALL_FRAME_BYTES:
            await self._send_bytes(head + bytes(payload))
        else:
            await self._send_bytes(head, payload)

    async def _fill(self, view: memoryview) -> None:
        """Read exactly `len(view)` bytes into `view`."""
        got, size = 0, len(view)
        while got < size:
            count = await self._loop.sock_recv_into(self.sock, view[got:])
            if count == 0:
                raise KVTransportError("the KV peer closed the connection mid-transfer")
            got += count

    async def _receive_into(self, view: memoryview) -> None:
        try:
            await asyncio.wait_for(self._fill(view), self.timeout_s)
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"receiving from the KV peer failed: {error!r}") from error

    async def _read_head(self) -> tuple[FrameKind, int, int, int]:
        """The next frame's kind, index, payload length and CRC-32, its kind and length checked
        (a corrupted length is refused before anything is read or allocated)."""
        await self._receive_into(memoryview(self._head))
        kind, index, length, crc = FRAME.unpack(self._head)
        if kind not in FrameKind.__members__.values():
            raise KVChecksumError(f"KV frame of unknown kind {kind}: the stream is corrupted")
        limit = MAX_BLOCK_BYTES if kind == FrameKind.BLOCK else MAX_MESSAGE_BYTES
        if length > limit:
            raise KVChecksumError(f"KV frame of {length} bytes (limit {limit}): corrupted")
        return FrameKind(kind), index, length, crc

    async def _read_frame(self) -> tuple[FrameKind, int, bytes]:
        """The next frame, its CRC-32 checked."""
        kind, index, length, crc = await self._read_head()
        payload = bytearray(length)
        await self._receive_into(memoryview(payload))
        if zlib.crc32(payload) != crc:
            raise KVChecksumError(f"KV frame {kind.name} {index} fails its CRC-32")
        return kind, index, bytes(payload)

    async def receive(self) -> tuple[FrameKind, bytes]:
        kind, _, payload = await self._read_frame()
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
        # A crc32 package's block checksums are the frames' CRCs, if they still match the blocks;
        # otherwise the CRCs are taken on the checksum threads, a few blocks ahead of the send.
        reuse = package.checksum_algorithm == "crc32" and package._verified_unchanged()
        blocks = [payload[index * size : (index + 1) * size] for index in range(package.num_blocks)]
        if reuse:
            crcs = [_resolved(int(checksum, 16)) for checksum in package.block_checksums]
        else:
            crcs = block_crcs(blocks)
        for index, block in enumerate(blocks):
            data: Buffer = block
            future = crcs[index]
            crc = future.result() if future.done() else await asyncio.wrap_future(future)
            if corrupt and index == 0:  # damage before framing: the frame CRC matches it
                data = flip_one_bit(block)
                crc = zlib.crc32(data)
            await self._write(FrameKind.BLOCK, data, index, crc)
        await self._write(FrameKind.PACKAGE_END, b"", package.num_blocks)
        return len(header) + payload.nbytes

    async def receive_package(self, first: tuple[FrameKind, bytes] | None = None) -> KVPackage:
        kind, header = first if first is not None else await self.receive()
        if kind != FrameKind.PACKAGE_HEADER:
            raise KVTransportError(f"expected a KV package header, got {kind.name}")
        incoming = IncomingPackage(header, pin_memory=self.pin_memory, device=self.receive_device)
        received = 0
        while True:
            kind, index, length, crc = await self._read_head()
            if kind == FrameKind.PACKAGE_END:
                break
            if kind != FrameKind.BLOCK or index != received:
                raise KVTransferError(
                    f"KV package out of order: {kind.name} {index} after {received} blocks"
                )
            if index >= incoming.num_blocks or length != incoming.block_nbytes:
                raise KVChecksumError(
                    f"KV frame BLOCK {index} has {length} bytes; the header announces "
                    f"{incoming.num_blocks} blocks of {incoming.block_nbytes}"
                )
            await self._receive_into(incoming.block_buffer(index))
            incoming.block_arrived(index, crc)
            received += 1
        if index != received:
            raise KVChecksumError(
                f"KV package ends after {received} of {incoming.num_blocks} blocks "
                f"(its end frame says {index})"
            )
        pending = incoming.pending()
        if pending:
            await asyncio.wait([asyncio.wrap_future(future) for future in pending])
        return incoming.finish()

    async def close(self) -> None:
        self.sock.close()


def _resolved(value: int) -> concurrent.futures.Future[int]:
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.set_result(value)
    return future


def block_crcs(blocks: list[memoryview]) -> list[concurrent.futures.Future[int]]:
    """Each block's CRC-32 (the frames'): started on the checksum threads when there is much
    to hash (the sender awaits each one just before its frame), else taken here."""
    if len(blocks) < 2 or sum(block.nbytes for block in blocks) < PARALLEL_CRC_BYTES:
        return [_resolved(zlib.crc32(block)) for block in blocks]
    pool = checksum_pool()
    return [pool.submit(zlib.crc32, block) for block in blocks]


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to the first of `host`'s addresses that answers."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as failed:
            sock.close()
            error = failed
        except BaseException:
            sock.close()
            raise
    raise error


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets on each of `host`'s addresses (as
    `asyncio.start_server` binds them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class TcpListener(KVListener):
    """Accept loops on the listening sockets; each accepted channel runs its handler in a task
    of its own (kept here until it ends, so that it is not collected mid-transfer)."""

    sockets: list[socket.socket]
    address: str
    accepting: list[asyncio.Task[None]] = field(default_factory=list)
    handling: set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        """Stop accepting; channels already open run to their end (as asyncio servers do)."""
        for task in self.accepting:
            task.cancel()
        for task in self.accepting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self.sockets:
            sock.close()


class TcpTransport(KVTransport):
    """KV over TCP: works between any two hosts; the default."""

    name = "tcp"

    def __init__(
        self,
        timeout_s: float = 30.0,
        pin_memory: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        """Longest wait for any one frame (or a send) once a channel is open."""
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        """Receive packages into page-locked memory: on by default where CUDA is, where the
        importing engine copies them to a GPU next."""
        self.device = None if device is None else torch.device(device)
        """Where received packages' blocks go, copied block by block as they arrive (a GPU:
        the copy overlaps the transfer); None keeps them on the host."""

    def _channel(self, sock: socket.socket) -> TcpChannel:
        channel = TcpChannel(sock, self.timeout_s)
        channel.pin_memory, channel.receive_device = self.pin_memory, self.device
        return channel

    async def connect(self, address: str, timeout_s: float) -> KVChannel:
        host, port = parse_address(address)
        try:
            sock = await asyncio.wait_for(_open_socket(host, port), timeout_s)
        except (OSError, TimeoutError) as error:
            raise KVTransportError(f"cannot reach the KV peer {address}: {error!r}") from error
        return self._channel(sock)

    async def listen(self, host: str, port: int, handler: ChannelHandler) -> KVListener:
        loop = asyncio.get_running_loop()
        sockets = _listening_sockets(host, port)
        listener = TcpListener(sockets, f"{host}:{sockets[0].getsockname()[1]}")

        async def serve(sock: socket.socket) -> None:
            channel = self._channel(sock)
            try:
                await handler(channel)
            except Exception:
                log.exception("KV channel handler failed (peer %s)", _peer(sock))
            finally:
                await channel.close()

        async def accept(listening: socket.socket) -> None:
            while True:
                try:
                    sock, _ = await loop.sock_accept(listening)
                except OSError as error:  # out of descriptors, say: asyncio's servers wait too
                    if listening.fileno() == -1:  # closed: the listener is gone
                        return
                    log.warning("accepting KV channels failed (%r); retrying", error)
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                task = loop.create_task(serve(sock))
                listener.handling.add(task)
                task.add_done_callback(listener.handling.discard)

        listener.accepting = [loop.create_task(accept(sock)) for sock in sockets]
        return listener


def _peer(sock: socket.socket) -> str:
    with contextlib.suppress(OSError):
        return str(sock.getpeername())
    return "gone"
