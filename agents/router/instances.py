"""The router's view of its instances: health, live load, and the dispatch choice.

Every instance is probed each `probe_interval_s` (GET /ready, then /metrics, each within
`probe_timeout_s`): a refused connection or a failed request marks it out at once, two probes in
a row that time out do, so an instance that stops answering is out within about two intervals
and timeouts; a probe that succeeds brings it back. A probe that times out while a stream this
router relays from the instance delivered bytes does not count: the instance answers, its event
loop is only slow to get to /ready under load (on an H200 at 17.6 req/s a decode server's /ready
took over 0.5 s while it streamed to 70 clients, and marking it out turned slowness into 503s).
A stalled stream is the proxy's to catch (`stream_timeout_s`).
Load comes from the engine's own Prometheus series (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `tessera:kv_cache_blocks`) plus the
prompt tokens this router sent there that have not yet produced a first byte, and the choice is
`policies.dispatch.choose_instance`, the code the simulator runs.

/metrics is read rather than /tessera/v1/instance-stats because the latter hands its latency
samples to whoever reads it, and they belong to the node agent.

Instances are given as URLs (`--prefill`, `--decode`) or as *services* (`--prefill-service`,
`--decode-service`): a base URL whose host name is a headless Kubernetes Service, which
resolves to one A record per ready pod. Services are resolved again before every probe round,
so a pod added by a scale-up is probed and used within an interval, and a pod gone from the
Service's records is dropped (requests already sent there finish or fail on their own). A
failed lookup that is not "no such name" keeps the last known instances: a DNS hiccup must not
empty the pool; "no such name" is what a headless Service with no ready pod answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tessera.policies.dispatch import (
    DispatchPolicy,
    DispatchRequest,
    InstanceLoads,
    NoEligibleInstanceError,
    choose_instance,
)

log = logging.getLogger(__name__)


MISSED_PROBES_OUT = 2
"""Probes in a row that time out before an instance is marked out: one slow answer of a busy
instance is no reason to stop sending there; a refused connection marks it out at once."""


class NoHealthyInstanceError(RuntimeError):
    """No instance of a role answers its probes."""


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the name resolves to now."""


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address of `host` (the system resolver: cluster DNS in a pod), sorted, unique.
    "No such name" (a headless Service with no ready pod) is no address; other failures raise
    OSError."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


def instance_url(service_url: str, address: str) -> str:
    """The service's base URL with its host replaced by one of its addresses."""
    parsed = urlparse(service_url.rstrip("/"))
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed._replace(netloc=f"{host}:{port}").geturl()


@dataclass
class Instance:
    url: str
    role: str
    healthy: bool = False
    reason: str = "not probed yet"
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    kv_blocks: int = 0
    inflight_prompt_tokens: int = 0
    """Prompt tokens sent by this router whose response has not begun."""
    dispatched: int = 0
    failures: int = 0
    missed_probes: int = 0
    """Consecutive probes that timed out or failed mid-answer."""
    last_change_s: float = field(default_factory=time.monotonic)
    last_progress_s: float = float("-inf")
    """When a stream relayed from this instance last delivered bytes (monotonic seconds)."""

    def progressed(self) -> None:
        self.last_progress_s = time.monotonic()

    def mark(self, healthy: bool, reason: str) -> None:
        if healthy != self.healthy:
            log.warning(
                "%s instance %s is %s: %s", self.role, self.url, "in" if healthy else "out", reason
            )
            self.last_change_s = time.monotonic()
        if not healthy:
            self.failures += 1
        self.healthy, self.reason = healthy, reason

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "reason": self.reason,
            "waiting": self.waiting,
            "running": self.running,
            "kv_usage": self.kv_usage,
            "inflight_prompt_tokens": self.inflight_prompt_tokens,
            "dispatched": self.dispatched,
            "failures": self.failures,
        }


def parse_load(text: str) -> dict[str, float]:
    """The load series of an engine's /metrics text (summed over their label sets)."""
    wanted = {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "tessera:kv_cache_blocks",
    }
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class InstancePool:
    """The instances of one role, their probes, and the choice among them."""

    def __init__(
        self,
        role: str,
        urls: list[str],
        policy: DispatchPolicy,
        block_size: int,
        seed: int = 0,
        services: list[str] | None = None,
        resolver: Resolver = resolve_addresses,
    ) -> None:
        self.role, self.policy, self.block_size = role, policy, block_size
        self.instances = [Instance(url.rstrip("/"), role) for url in urls]
        self.services = [url.rstrip("/") for url in services or []]
        self.resolver = resolver
        self._static = {i.url for i in self.instances}
        self._sequence = itertools.count()
        self._rng = np.random.default_rng(seed)

    @property
    def configured(self) -> bool:
        """Whether this role has instances or services to find them by (a router without
        prefill instances sends requests to decode or colocated instances alone)."""
        return bool(self.instances or self.services)

    async def discover(self) -> None:
        """Re-resolve the services: add the instances of new addresses (out until probed), drop
        those whose address is gone. Static URLs stay."""
        if not self.services:
            return
        found: set[str] = set()
        for service in self.services:
            parsed = urlparse(service)
            host = parsed.hostname or ""
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                addresses = await self.resolver(host, port)
            except OSError as error:
                log.warning(
                    "cannot resolve %s service %s (keeping its instances): %r",
                    self.role,
                    service,
                    error,
                )
                return
            found.update(instance_url(service, address) for address in addresses)
        known = {i.url for i in self.instances}
        wanted = found | self._static
        for url in sorted(known - wanted):
            log.warning("%s instance %s left its service", self.role, url)
        kept = [i for i in self.instances if i.url in wanted]
        added = [Instance(url, self.role) for url in sorted(found - known)]
        for instance in added:
            log.info("%s instance %s found through its service", self.role, instance.url)
        self.instances = kept + added

    def loads(self, candidates: list[Instance]) -> InstanceLoads:
        capacity = np.array(
            [max(i.kv_blocks, 1) * self.block_size for i in candidates], dtype=np.float64
        )
        return InstanceLoads(
            waiting_requests=np.array([i.waiting for i in candidates], dtype=np.int64),
            running_requests=np.array([i.running for i in candidates], dtype=np.int64),
            pending_prefill_tokens=np.array(
                [i.inflight_prompt_tokens for i in candidates], dtype=np.float64
            ),
            kv_used_tokens=np.array([i.kv_usage for i in candidates]) * capacity,
            kv_capacity_tokens=capacity,
            speed=np.ones(len(candidates), dtype=np.float64),
        )

    def choose(self, prompt_tokens: int, exclude: Collection[str] = ()) -> Instance:
        """The instance `policies.dispatch` picks among the healthy ones not in `exclude`."""
        candidates = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not candidates:
            states = "; ".join(f"{i.url}: {i.reason}" for i in self.instances) or "none given"
            raise NoHealthyInstanceError(f"no healthy {self.role} instance ({states})")
        request = DispatchRequest(prompt_tokens=prompt_tokens, sequence=next(self._sequence))
        try:
            index = choose_instance(self.policy, request, self.loads(candidates), self._rng)
        except NoEligibleInstanceError as error:
            raise NoHealthyInstanceError(f"{self.role}: {error}") from error
        chosen = candidates[index]
        chosen.dispatched += 1
        return chosen

    async def probe(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        await asyncio.gather(*(self._probe_one(session, i, timeout_s) for i in self.instances))

    async def _probe_one(
        self, session: aiohttp.ClientSession, instance: Instance, timeout_s: float
    ) -> None:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        started = time.monotonic()
        try:
            async with session.get(f"{instance.url}/ready", timeout=timeout) as ready:
                if ready.status != 200:
                    instance.mark(False, f"/ready answered {ready.status}")
                    return
            async with session.get(f"{instance.url}/metrics", timeout=timeout) as metrics:
                text = await metrics.text()
        except (aiohttp.ClientConnectorError, ConnectionError) as error:  # nobody listens
            instance.mark(False, f"probe failed: {type(error).__name__} {error}".strip())
            return
        except (aiohttp.ClientError, TimeoutError, OSError) as error:  # busy, or hung
            if isinstance(error, TimeoutError) and instance.last_progress_s >= started:
                return  # it streamed to us meanwhile: busy, not gone (its last load stands)
            instance.missed_probes += 1
            if instance.missed_probes >= MISSED_PROBES_OUT:
                instance.mark(False, f"{instance.missed_probes} probes failed, last: {error!r}")
            return
        instance.missed_probes = 0
        load = parse_load(text)
        instance.waiting = int(load.get("vllm:num_requests_waiting", 0))
        instance.running = int(load.get("vllm:num_requests_running", 0))
        instance.kv_usage = float(load.get("vllm:kv_cache_usage_perc", 0.0))
        instance.kv_blocks = int(load.get("tessera:kv_cache_blocks", 0))
        instance.mark(True, "ok")


async def probe_forever(
    pools: list[InstancePool],
    session: aiohttp.ClientSession,
    interval_s: float,
    timeout_s: float,
) -> None:
    """Probe every pool each interval until cancelled."""
    while True:
        started = time.monotonic()
        await probe_round(pools, session, timeout_s)
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


async def probe_round(
    pools: list[InstancePool], session: aiohttp.ClientSession, timeout_s: float
) -> None:
    """Re-resolve every pool's services, then probe every instance."""
    try:
        await asyncio.gather(*(pool.discover() for pool in pools))
        await asyncio.gather(*(pool.probe(session, timeout_s) for pool in pools))
    except Exception:  # a probe bug must not end probing
        log.exception("probe round failed")
