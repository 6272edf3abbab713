"""The same-GPU KV transport: which transport two ends choose, and the CUDA IPC channel's
protocol (handle, acknowledgement, TCP fallback, checksums) on loopback.

Without a GPU the two CUDA calls (share a tensor, open a handle) are replaced by stand-ins that
hand the tensor over inside this process; everything else is the real channel over a real
socket. The test marked `gpu` shares a real CUDA tensor with another process and skips
without CUDA.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, write_checkpoint
from tessera.agents.engine import Engine, EngineConfig, EngineRole, SamplingParams
from tessera.agents.engine.kv_transfer import (
    UNCHECKED,
    KVChecksumError,
    KVGeometry,
    KVPackage,
)
from tessera.agents.engine.kv_transport import (
    KVChannel,
    KVEndpoint,
    KVTransportError,
    TcpTransport,
    choose_transport,
)
from tessera.agents.engine.kv_transport_cuda_ipc import (
    CudaIpcChannel,
    CudaIpcTransport,
    _decode,
    _encode,
)
from tessera.agents.serving.disaggregated import local_transports

GEOMETRY = KVGeometry(
    "tiny:abc", num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32"
)
HOST = "boot-1"
GPU = "GPU-8f0c"


def blocks(num_blocks: int = 3, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(num_blocks, *GEOMETRY.block_shape, generator=generator).to(device)


def checked(num_blocks: int = 3) -> KVPackage:
    tokens = list(range(4 * num_blocks - 1))
    return KVPackage.build(
        "kv-1", GEOMETRY, tokens, [7], len(tokens), {"max_new_tokens": 5}, blocks(num_blocks)
    )


def unchecked(data: torch.Tensor) -> KVPackage:
    """Blocks read straight off a KV cache, never on a wire: no checksums."""
    tokens = list(range(4 * data.shape[0] - 1))
    return KVPackage(
        "kv-2", GEOMETRY, tokens, [7], len(tokens), {"max_new_tokens": 5}, data, UNCHECKED, []
    )


# --- choosing -----------------------------------------------------------------------------------


def test_cuda_ipc_is_chosen_only_on_the_same_host_and_gpu() -> None:
    both = ("cuda_ipc", "tcp")
    local = KVEndpoint(HOST, GPU, both)
    assert choose_transport(local, KVEndpoint(HOST, GPU, both)) == "cuda_ipc"
    assert choose_transport(local, KVEndpoint(HOST, "GPU-other", both)) == "tcp"
    assert choose_transport(local, KVEndpoint("boot-2", GPU, both)) == "tcp"
    assert choose_transport(local, KVEndpoint(HOST, GPU, ("tcp",))) == "tcp"
    assert choose_transport(KVEndpoint(HOST, "cpu", both), KVEndpoint(HOST, "cpu", both)) == "tcp"
    assert choose_transport(KVEndpoint("", GPU, both), KVEndpoint("", GPU, both)) == "tcp"
    older_server = KVEndpoint.from_dict(None)  # a prefill that advertises no endpoint
    assert choose_transport(local, older_server) == "tcp"
    with pytest.raises(KVTransportError, match="no KV transport in common"):
        choose_transport(KVEndpoint(HOST, GPU, ("cuda_ipc",)), KVEndpoint("boot-2", GPU, both))


def test_an_endpoint_survives_its_wire_form_and_bad_fields_fall_back_to_tcp() -> None:
    endpoint = KVEndpoint(HOST, GPU, ("cuda_ipc", "tcp"))
    assert KVEndpoint.from_dict(endpoint.as_dict()) == endpoint
    assert KVEndpoint.from_dict({"host_id": HOST, "transports": "cuda_ipc"}).transports == ("tcp",)


def test_a_cpu_server_offers_tcp_only() -> None:
    endpoint, transports = local_transports("cpu", 5.0)
    assert endpoint.transports == ("tcp",) and endpoint.device == "cpu"
    assert set(transports) == {"tcp"} and isinstance(transports["tcp"], TcpTransport)
    assert endpoint.host_id


# --- the channel, with stand-ins for the two CUDA calls ---------------------------------------


class StandIn:
    """Shares tensors inside this process by key, as CUDA IPC would across processes."""

    def __init__(self, fail_open: bool = False) -> None:
        self.shared: dict[int, torch.Tensor] = {}
        self.keys = itertools.count()
        self.opened = 0
        self.fail_open = fail_open

    def share(self, tensor: torch.Tensor) -> dict[str, Any]:
        key = next(self.keys)
        self.shared[key] = tensor
        return {"key": key}

    def open(self, handle: dict[str, Any], device: torch.device) -> torch.Tensor:
        if self.fail_open:
            raise KVTransportError("cannot open the CUDA IPC handle: invalid device context")
        self.opened += 1
        return self.shared[handle["key"]]


async def exchange(
    sent: KVPackage, stand_in: StandIn, requested: str = "cuda_ipc", corrupt: bool = False
) -> tuple[KVPackage, dict[str, Any]]:
    """The prefill side listens and sends `sent` once the request names a transport."""
    transport = CudaIpcTransport("cpu", 5.0, stand_in.share, stand_in.open)
    outcome: dict[str, Any] = {}

    async def prefill(channel: KVChannel) -> None:
        request = await channel.receive_message()
        outcome["granted"] = channel.negotiate(request["kv_transport"])
        outcome["bytes"] = await channel.send_package(sent, corrupt=corrupt)
        assert isinstance(channel, CudaIpcChannel)
        outcome["fallbacks"] = channel.fallbacks

    listener = await transport.listen("127.0.0.1", 0, prefill)
    try:
        channel = await transport.connect(listener.address, 2.0)
        try:
            await channel.send_message({"request_id": "kv-1", "kv_transport": requested})
            got = await channel.receive_package()
            await asyncio.sleep(0)
        finally:
            await channel.close()
        for _ in range(100):  # the sender finishes after the receiver's answer
            if "fallbacks" in outcome:
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    return got, outcome


def test_device_blocks_travel_as_a_handle_and_are_copied_before_the_sender_lets_go() -> None:
    stand_in = StandIn()
    data = blocks()
    got, outcome = asyncio.run(exchange(unchecked(data), stand_in))
    assert outcome["granted"] == "cuda_ipc" and stand_in.opened == 1
    assert outcome["fallbacks"] == 0
    assert outcome["bytes"] == data.numel() * data.element_size()
    assert torch.equal(got.blocks, data)
    assert got.blocks.data_ptr() != data.data_ptr(), "the receiver must own a copy"
    assert (got.prompt_token_ids, got.output_token_ids) == (list(range(11)), [7])
    got.check_compatible(GEOMETRY)


def test_a_handle_the_receiver_cannot_open_falls_back_to_tcp_frames_on_the_same_channel() -> None:
    stand_in = StandIn(fail_open=True)
    data = blocks()
    got, outcome = asyncio.run(exchange(unchecked(data), stand_in))
    assert outcome["fallbacks"] == 1
    assert torch.equal(got.blocks, data)
    assert got.checksum_algorithm != UNCHECKED, "frames carry checksums"
    assert len(got.block_checksums) == 3


def test_a_package_corrupted_behind_its_checksums_is_refused_after_the_copy() -> None:
    with pytest.raises(KVChecksumError, match="fails its checksum"):
        asyncio.run(exchange(checked(), StandIn(), corrupt=True))


def test_without_ipc_negotiated_the_blocks_travel_as_frames() -> None:
    stand_in = StandIn()
    got, outcome = asyncio.run(exchange(unchecked(blocks()), stand_in, requested="tcp"))
    assert outcome["granted"] == "tcp" and stand_in.opened == 0
    assert torch.equal(got.blocks, blocks())


def test_host_blocks_are_sent_as_frames_even_over_ipc() -> None:
    stand_in = StandIn()
    transport = CudaIpcTransport("cuda:0", 5.0, stand_in.share, stand_in.open)
    assert transport.device.type == "cuda"

    async def run() -> KVPackage:
        async def prefill(channel: KVChannel) -> None:
            await channel.receive_message()
            channel.negotiate("cuda_ipc")
            await channel.send_package(checked())

        listener = await transport.listen("127.0.0.1", 0, prefill)
        try:
            channel = await TcpTransport(5.0).connect(listener.address, 2.0)
            try:
                await channel.send_message({"kv_transport": "cuda_ipc"})
                return await channel.receive_package()
            finally:
                await channel.close()
        finally:
            await listener.close()

    got = asyncio.run(run())
    assert stand_in.opened == 0 and torch.equal(got.blocks, checked().blocks)


def test_a_handle_naming_an_unknown_class_or_type_is_refused() -> None:
    with pytest.raises(KVTransportError, match="refused"):
        _decode({"class": "os.system"})
    with pytest.raises(KVTransportError, match="not shareable"):
        _encode(object())
    assert _decode(_encode((torch.Size([2, 3]), torch.float16, b"\x00\x01", 7, None))) == (
        torch.Size([2, 3]),
        torch.float16,
        b"\x00\x01",
        7,
        None,
    )


# --- the engine's device-resident export -------------------------------------------------------


def test_an_on_device_export_continues_elsewhere_with_the_colocated_tokens(
    tmp_path: Path,
) -> None:
    """What a prefill engine hands a CUDA IPC channel: blocks where its cache is, no checksums;
    imported by a decode engine, the request gives the colocated engine's greedy tokens."""
    write_checkpoint(tmp_path, seed=11)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompt = random_prompts([13], 128, seed=5)[0]

    def engine(role: EngineRole) -> Engine:
        config = EngineConfig(role=role, device="cpu", block_size=4, num_kv_blocks=64)
        return Engine.from_pretrained(tmp_path, config)

    (colocated,) = engine(EngineRole.COLOCATED).generate([prompt], params)
    prefill = engine(EngineRole.PREFILL)
    request_id = prefill.add_request(prompt, params)
    prefill.run_until_idle()
    package = prefill.export_kv(request_id, on_device=True)
    assert package.checksum_algorithm == UNCHECKED and package.block_checksums == []
    assert package.blocks.device == prefill.kv_cache.device
    assert prefill.kv_cache.allocator.num_used == 0
    decode = engine(EngineRole.DECODE)
    decode.import_kv(package)
    decode.run_until_idle()
    assert decode.pop_finished(request_id).output_token_ids == colocated.output_token_ids


# --- a real CUDA tensor across two processes -----------------------------------------------------


def _gpu_sender(address: multiprocessing.Queue, done: multiprocessing.Queue) -> None:
    async def run() -> None:
        transport = CudaIpcTransport("cuda:0", 30.0)

        async def prefill(channel: KVChannel) -> None:
            request = await channel.receive_message()
            channel.negotiate(request["kv_transport"])
            await channel.send_package(unchecked(blocks(device="cuda")))

        listener = await transport.listen("127.0.0.1", 0, prefill)
        address.put(listener.address)
        await asyncio.get_running_loop().run_in_executor(None, done.get)
        await listener.close()

    asyncio.run(run())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_tensor_crosses_to_another_process_by_handle() -> None:
    context = multiprocessing.get_context("spawn")
    address, done = context.Queue(), context.Queue()
    sender = context.Process(target=_gpu_sender, args=(address, done), daemon=True)
    sender.start()
    try:
        where = address.get(timeout=120)

        async def receive() -> KVPackage:
            transport = CudaIpcTransport("cuda:0", 30.0)
            channel = await transport.connect(where, 5.0)
            try:
                await channel.send_message({"kv_transport": "cuda_ipc"})
                return await channel.receive_package()
            finally:
                await channel.close()

        got = asyncio.run(receive())
        assert got.blocks.device.type == "cuda"
        assert torch.equal(got.blocks.cpu(), blocks())
    finally:
        done.put(True)
        sender.join(timeout=30)
