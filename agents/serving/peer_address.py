"""Where a peer server takes KV channels: asked once over HTTP, then remembered.

Two callers need a peer's KV address before they open a channel to it: a decode instance asks a
prefill instance (`disaggregated.py`, its KV transport endpoint: port and `KVEndpoint`), and a
migration source asks its target (`migration.py`, its migration endpoint: port, draining). Both
GET one small JSON document from the peer's HTTP base URL on a lazily opened aiohttp session,
keep what it says per base URL, and forget it when a channel to that peer fails (the peer may
have restarted on another port). That is `PeerDirectory`; what the document means is the
caller's `parse`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

import aiohttp
from tessera.agents.engine.kv_transport import KVTransportError

CONNECT_TIMEOUT_S = 2.0
"""Longest wait for a peer's answer to the address request, and for a KV channel's connect:
a peer that takes longer is treated as unreachable (the caller tries another or fails fast)."""

T = TypeVar("T")


class PeerAddressError(KVTransportError):
    """A peer answered its address request with a document that does not say where it listens."""


def kv_address(base: str, port: int) -> str:
    """`host:port` of a peer's KV listener: the host of its HTTP base URL, the port it named."""
    return f"{urlparse(base).hostname}:{port}"


class PeerDirectory(Generic[T]):
    """What each peer's `path` document says (`parse` of its JSON), asked once per base URL.

    `parse` raises KeyError, TypeError or ValueError for a document it cannot read (reported
    as PeerAddressError naming the URL); anything else it raises (a refusal: the peer is
    draining) reaches the caller as it is, and nothing is remembered.
    """

    def __init__(
        self, path: str, parse: Callable[[Any], T], timeout_s: float = CONNECT_TIMEOUT_S
    ) -> None:
        self.path, self.parse, self.timeout_s = path, parse, timeout_s
        self._known: dict[str, T] = {}
        self._session: aiohttp.ClientSession | None = None

    async def get(self, base: str) -> T:
        """The peer's parsed document; aiohttp.ClientError or TimeoutError if it does not
        answer in `timeout_s`."""
        known = self._known.get(base)
        if known is not None:
            return known
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._session.get(base + self.path, timeout=timeout) as answer:
            answer.raise_for_status()
            body = await answer.json()
        try:
            known = self.parse(body)
        except (KeyError, TypeError, ValueError) as error:
            raise PeerAddressError(f"{base}{self.path} answered {body!r}: {error!r}") from error
        self._known[base] = known
        return known

    def forget(self, base: str) -> None:
        """Ask `base` again next time (a channel to it failed)."""
        self._known.pop(base, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
