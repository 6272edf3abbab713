"""The TCP KV transport on loopback: packages arrive bit for bit, and every kind of damage in
transit (a flipped bit behind the checksums, a damaged frame, a peer gone mid-package, blocks
out of order) is refused with a KVTransferError or KVTransportError, never imported."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Awaitable, Callable

import pytest
import torch
from tessera.agents.engine.kv_transfer import (
    KVChecksumError,
    KVGeometry,
    KVPackage,
    KVTransferError,
)
from tessera.agents.engine.kv_transport import (
    FRAME,
    FrameKind,
    KVChannel,
    KVTransportError,
    TcpChannel,
    TcpTransport,
    parse_address,
)

GEOMETRY = KVGeometry(
    "tiny:abc", num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32"
)


def package(num_blocks: int = 3) -> KVPackage:
    blocks = torch.randn(
        num_blocks, *GEOMETRY.block_shape, generator=torch.Generator().manual_seed(1)
    )
    tokens = list(range(4 * num_blocks - 1))
    return KVPackage.build(
        "kv-1", GEOMETRY, tokens, [7], len(tokens), {"max_new_tokens": 5}, blocks
    )


async def exchange(send: Callable[[KVChannel], Awaitable[None]]) -> KVPackage:
    """Run `send` on the listening side; receive one package on the connecting side."""
    transport = TcpTransport(timeout_s=5)
    listener = await transport.listen("127.0.0.1", 0, send)
    try:
        channel = await transport.connect(listener.address, timeout_s=2)
        try:
            return await channel.receive_package()
        finally:
            await channel.close()
    finally:
        await listener.close()


def test_a_package_arrives_bit_for_bit() -> None:
    sent = package()

    async def send(channel: KVChannel) -> None:
        await channel.send_package(sent)

    got = asyncio.run(exchange(send))
    assert torch.equal(got.blocks, sent.blocks)
    assert (got.prompt_token_ids, got.output_token_ids, got.block_checksums) == (
        sent.prompt_token_ids,
        sent.output_token_ids,
        sent.block_checksums,
    )
    got.check_compatible(GEOMETRY)


def test_a_bit_flipped_behind_the_checksums_is_refused() -> None:
    async def send(channel: KVChannel) -> None:
        await channel.send_package(package(), corrupt=True)

    with pytest.raises(KVChecksumError, match="block 0 fails its checksum"):
        asyncio.run(exchange(send))


def test_a_damaged_frame_fails_its_crc() -> None:
    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        payload = b"x" * 64
        channel.writer.write(
            FRAME.pack(FrameKind.PACKAGE_HEADER, 0, len(payload), zlib.crc32(payload) ^ 1)
        )
        channel.writer.write(payload)
        await channel.writer.drain()

    with pytest.raises(KVChecksumError, match="CRC-32"):
        asyncio.run(exchange(send))


def test_a_corrupted_length_is_refused_without_reading_it() -> None:
    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        channel.writer.write(FRAME.pack(FrameKind.BLOCK, 0, 1 << 40, 0))
        await channel.writer.drain()

    async def receive() -> None:
        transport = TcpTransport(timeout_s=5)
        listener = await transport.listen("127.0.0.1", 0, send)
        channel = await transport.connect(listener.address, timeout_s=2)
        try:
            await channel.receive()
        finally:
            await channel.close()
            await listener.close()

    with pytest.raises(KVChecksumError, match="limit"):
        asyncio.run(receive())


def test_a_peer_gone_mid_package_is_a_transport_error() -> None:
    sent = package()

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        wire = sent.to_bytes()
        # A header frame announcing the whole package, cut short; then the peer is gone.
        channel.writer.write(FRAME.pack(FrameKind.PACKAGE_HEADER, 0, len(wire), zlib.crc32(wire)))
        channel.writer.write(wire[:40])
        await channel.writer.drain()

    with pytest.raises(KVTransportError, match="closed the connection"):
        asyncio.run(exchange(send))


def test_blocks_out_of_order_are_refused() -> None:
    sent = package()

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        wire = sent.to_bytes()
        (length,) = struct.unpack_from("<Q", wire, 8)
        start = 16 + length
        size = GEOMETRY.block_nbytes
        await channel._write(FrameKind.PACKAGE_HEADER, wire[:start])
        await channel._write(FrameKind.BLOCK, wire[start + size : start + 2 * size], 1)

    with pytest.raises(KVTransferError, match="out of order"):
        asyncio.run(exchange(send))


def test_an_unreachable_peer_is_a_transport_error_within_the_timeout() -> None:
    from conftest import free_port

    async def connect() -> None:
        await TcpTransport().connect(f"127.0.0.1:{free_port()}", timeout_s=1)

    with pytest.raises(KVTransportError, match="cannot reach"):
        asyncio.run(connect())


@pytest.mark.parametrize("address", ["host", "host:0", "host:99999", ":80", "host:x"])
def test_bad_addresses_are_named(address: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address(address)
