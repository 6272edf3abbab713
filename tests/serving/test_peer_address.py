"""PeerDirectory against a real aiohttp server on loopback: a peer's document is asked once and
remembered, asked again after `forget`, and a document that does not say where the peer listens
is a PeerAddressError naming the URL; a refusal raised by `parse` reaches the caller as it is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tessera.agents.serving.peer_address import PeerAddressError, PeerDirectory, kv_address

PATH = "/peer"


@asynccontextmanager
async def peer(document: Any) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering `document` at PATH; yields its base URL and a list counting GETs."""
    asked: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(1)
        return web.json_response(document)

    app = web.Application()
    app.router.add_get(PATH, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


def port_of(body: Any) -> int:
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    if body.get("draining"):
        raise RuntimeError("draining")
    return int(body["port"])


def test_a_peer_is_asked_once_until_forgotten() -> None:
    async def run() -> tuple[list[int], list[int]]:
        async with peer({"port": 4242}) as (base, asked):
            directory = PeerDirectory(PATH, port_of)
            try:
                got = [await directory.get(base), await directory.get(base)]
                once = len(asked)
                directory.forget(base)
                got.append(await directory.get(base))
                return got, [once, len(asked)]
            finally:
                await directory.close()

    got, counts = asyncio.run(run())
    assert got == [4242, 4242, 4242]
    assert counts == [1, 2]


@pytest.mark.parametrize("document", [{"transport": "tcp"}, {"port": "x"}, [1, 2]])
def test_a_document_without_a_port_names_the_url(document: Any) -> None:
    async def run() -> None:
        async with peer(document) as (base, _):
            directory = PeerDirectory(PATH, port_of)
            try:
                await directory.get(base)
            finally:
                await directory.close()

    with pytest.raises(PeerAddressError, match=PATH):
        asyncio.run(run())


def test_a_refusal_passes_through_and_is_not_remembered() -> None:
    async def run() -> int:
        async with peer({"port": 1, "draining": True}) as (base, asked):
            directory = PeerDirectory(PATH, port_of)
            try:
                for _ in range(2):
                    with pytest.raises(RuntimeError, match="draining"):
                        await directory.get(base)
                return len(asked)
            finally:
                await directory.close()

    assert asyncio.run(run()) == 2


def test_an_unreachable_peer_is_a_client_error() -> None:
    from conftest import free_port

    async def run() -> None:
        directory = PeerDirectory(PATH, port_of, timeout_s=1.0)
        try:
            await directory.get(f"http://127.0.0.1:{free_port()}")
        finally:
            await directory.close()

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(run())


def test_kv_address_is_the_base_urls_host_and_the_named_port() -> None:
    assert kv_address("http://10.0.0.7:8000", 5555) == "10.0.0.7:5555"
