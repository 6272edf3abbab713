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


async def exchange(
    send: Callable[[KVChannel], Awaitable[None]], receiver: TcpTransport | None = None
) -> KVPackage:
    """Run `send` on the listening side; receive one package on the connecting side (through
    `receiver`, the sender's transport by default)."""
    transport = TcpTransport(timeout_s=5)
    listener = await transport.listen("127.0.0.1", 0, send)
    try:
        channel = await (receiver or transport).connect(listener.address, timeout_s=2)
        try:
            return await channel.receive_package()
        finally:
            await channel.close()
    finally:
        await listener.close()


def sender_damaging_frame_crc(
    sent: KVPackage, damaged: int
) -> Callable[[KVChannel], Awaitable[None]]:
    """A sender of `sent`'s frames whose block `damaged` carries a wrong frame CRC (the block
    bytes themselves are intact, so only the frame check can catch it)."""

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        await channel._write(FrameKind.PACKAGE_HEADER, sent.header_bytes())
        for index in range(sent.num_blocks):
            block = sent.block_bytes(index)
            crc = zlib.crc32(block) ^ (1 if index == damaged else 0)
            await channel._write(FrameKind.BLOCK, block, index, crc)
        await channel._write(FrameKind.PACKAGE_END, b"", sent.num_blocks)

    return send


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
        head = FRAME.pack(FrameKind.PACKAGE_HEADER, 0, len(payload), zlib.crc32(payload) ^ 1)
        await channel._send_bytes(head, payload)

    with pytest.raises(KVChecksumError, match="CRC-32"):
        asyncio.run(exchange(send))


def test_a_corrupted_length_is_refused_without_reading_it() -> None:
    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        await channel._send_bytes(FRAME.pack(FrameKind.BLOCK, 0, 1 << 40, 0))

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
        head = FRAME.pack(FrameKind.PACKAGE_HEADER, 0, len(wire), zlib.crc32(wire))
        await channel._send_bytes(head, wire[:40])

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


def test_a_block_damaged_in_transit_is_refused() -> None:
    """Damage after the sender framed the block (its frame CRC and checksum are of the good
    bytes): the receiver, which defers the frame CRC of blocks to one pass after parsing,
    still refuses it."""
    sent = package()

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        await channel._write(FrameKind.PACKAGE_HEADER, sent.header_bytes())
        for index in range(sent.num_blocks):
            good = sent.block_bytes(index)
            block = bytearray(good)
            if index == 1:
                block[5] ^= 0x10
            await channel._write(FrameKind.BLOCK, block, index, zlib.crc32(good))
        await channel._write(FrameKind.PACKAGE_END, b"", sent.num_blocks)

    with pytest.raises(KVChecksumError, match="block 1 fails its checksum"):
        asyncio.run(exchange(send))


def test_a_block_frame_damaged_behind_matching_checksums_fails_its_crc() -> None:
    """A blake2b package whose block bytes match the header but not the frame's CRC (the
    frame's own damage): the deferred frame CRC check still refuses it."""
    sent = package()
    sent = KVPackage.build(
        sent.request_id, GEOMETRY, sent.prompt_token_ids, [7], sent.num_computed_tokens,
        sent.sampling, sent.blocks, checksum_algorithm="blake2b_128",
    )  # fmt: skip

    with pytest.raises(KVChecksumError, match="BLOCK 2 fails its CRC-32"):
        asyncio.run(exchange(sender_damaging_frame_crc(sent, 2)))


def test_a_block_frame_of_the_wrong_length_is_refused_at_once() -> None:
    """The header announces each block's size: a block frame of another length (a damaged
    length field) is refused as it arrives, not after a timeout."""
    sent = package()

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        await channel._write(FrameKind.PACKAGE_HEADER, sent.header_bytes())
        await channel._write(FrameKind.BLOCK, b"\0" * 12, 0)

    with pytest.raises(KVChecksumError, match="header announces 3 blocks"):
        asyncio.run(exchange(send))


def test_received_blocks_are_one_buffer_and_match_the_sent_ones() -> None:
    sent = package(num_blocks=4)

    async def send(channel: KVChannel) -> None:
        await channel.send_package(sent)

    got = asyncio.run(exchange(send))
    assert got.checksum_algorithm == sent.checksum_algorithm
    assert got.blocks.is_contiguous() and torch.equal(got.blocks, sent.blocks)
    assert bytes(got.payload_view()) == bytes(sent.payload_view())


def test_from_parts_takes_the_payload_and_refuses_a_prefix_with_more_than_the_header() -> None:
    sent = package()
    wire = sent.to_bytes()
    header = sent.header_bytes()
    payload = bytearray(wire[len(header) :])
    got = KVPackage.from_parts(header, payload)
    assert torch.equal(got.blocks, sent.blocks)
    payload[0] ^= 0xFF  # the blocks are a view of the payload: no copy was made
    assert not torch.equal(got.blocks, sent.blocks)
    assert KVPackage.payload_layout(header) == (3, GEOMETRY.block_nbytes)
    with pytest.raises(KVChecksumError, match="bytes after it"):
        KVPackage.from_parts(wire, bytearray())
    with pytest.raises(KVTransferError, match="bytearray"):
        KVPackage.from_parts(header, bytes(payload))  # type: ignore[arg-type]


LARGE = KVGeometry(
    "tiny:abc", num_layers=2, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32"
)
"""256 KiB blocks: 40 of them (10 MiB) take the checksum threads' path on both ends."""


def large_package(checksum_algorithm: str = "crc32", num_blocks: int = 40) -> KVPackage:
    blocks = torch.randn(num_blocks, *LARGE.block_shape, generator=torch.Generator().manual_seed(3))
    tokens = list(range(16 * num_blocks))
    return KVPackage.build(
        "kv-large", LARGE, tokens, [], len(tokens), {}, blocks, checksum_algorithm
    )


@pytest.mark.parametrize("algorithm", ["crc32", "blake2b_128"])
def test_a_large_package_arrives_bit_for_bit_through_the_checksum_threads(algorithm: str) -> None:
    sent = large_package(algorithm)

    async def send(channel: KVChannel) -> None:
        await channel.send_package(sent)

    got = asyncio.run(exchange(send))
    assert got.checksum_algorithm == algorithm
    assert torch.equal(got.blocks, sent.blocks)
    got.check_compatible(LARGE)


@pytest.mark.parametrize("algorithm", ["crc32", "blake2b_128"])
def test_a_large_package_flipped_behind_its_checksums_is_refused(algorithm: str) -> None:
    async def send(channel: KVChannel) -> None:
        await channel.send_package(large_package(algorithm), corrupt=True)

    with pytest.raises(KVChecksumError, match="block 0 fails its checksum"):
        asyncio.run(exchange(send))


def test_a_large_packages_damaged_frame_crc_is_refused_by_the_checksum_threads() -> None:
    sent = large_package("blake2b_128")

    with pytest.raises(KVChecksumError, match="BLOCK 33 fails its CRC-32"):
        asyncio.run(exchange(sender_damaging_frame_crc(sent, 33)))


def test_a_package_cut_short_by_its_end_frame_is_refused() -> None:
    sent = package()

    async def send(channel: KVChannel) -> None:
        assert isinstance(channel, TcpChannel)
        await channel._write(FrameKind.PACKAGE_HEADER, sent.header_bytes())
        await channel._write(FrameKind.BLOCK, sent.block_bytes(0), 0)
        await channel._write(FrameKind.PACKAGE_END, b"", 1)

    with pytest.raises(KVChecksumError, match="ends after 1 of 3 blocks"):
        asyncio.run(exchange(send))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_receiver_with_a_device_gets_the_blocks_there() -> None:
    sent = large_package()

    async def send(channel: KVChannel) -> None:
        await channel.send_package(sent)

    got = asyncio.run(exchange(send, receiver=TcpTransport(timeout_s=5, device="cuda")))
    assert got.blocks.device.type == "cuda"
    assert torch.equal(got.blocks.cpu(), sent.blocks)
    got.check_compatible(LARGE)


def test_a_pageable_receiver_reuses_the_buffer_of_a_package_nobody_holds() -> None:
    from tessera.agents.engine.host_buffers import shared_pool

    sent = large_package()

    async def send(channel: KVChannel) -> None:
        await channel.send_package(sent)

    async def receive_twice() -> tuple[int, bool]:
        listener = await TcpTransport(timeout_s=5).listen("127.0.0.1", 0, send)
        receiver = TcpTransport(timeout_s=5, pin_memory=False)
        try:
            pointers = []
            for _ in range(2):
                channel = await receiver.connect(listener.address, timeout_s=2)
                try:
                    got = await channel.receive_package()
                finally:
                    await channel.close()
                assert torch.equal(got.blocks, sent.blocks)
                pointers.append(got.blocks.data_ptr())
                del got  # the engine has imported it: its buffer is free again
            return shared_pool.reused, pointers[0] == pointers[1]
        finally:
            await listener.close()

    with shared_pool._lock:  # earlier tests' free buffers of this size would be taken first
        shared_pool._buffers.clear()  # (their holders keep theirs; the pool only forgets them)
    before = shared_pool.reused
    reused, same = asyncio.run(receive_twice())
    assert reused > before and same
