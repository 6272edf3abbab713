"""The node agent's view of a `tessera serve` process: an `InstanceStatsSource` over HTTP.

The engine server answers `GET INSTANCE_STATS_PATH` with its `InstanceStats` as JSON (the
load now, and the TTFT/TPOT samples since the previous read); the agent's sampler calls
`instance_stats()` once per round, so each round's telemetry carries every engine on the node
and the operator's collector sees each instance's load. An engine that does not answer (still
loading, restarting) contributes nothing that round; the agent logs the change once, not every
second.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from tessera.agents.instance_stats import INSTANCE_STATS_PATH, InstanceStats

log = logging.getLogger(__name__)

_TUPLE_FIELDS = {"device_uuids", "ttft_samples_s", "tpot_samples_s"}
_FIELDS = {f.name for f in dataclasses.fields(InstanceStats)}


def parse_instance_stats(data: Any) -> InstanceStats:
    """An `InstanceStats` from the server's JSON; unknown keys are ignored (a newer server),
    a missing required one (or a list that is not one) is a ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"instance stats must be a JSON object, got {type(data).__name__}")
    values = {key: value for key, value in data.items() if key in _FIELDS}
    for key in _TUPLE_FIELDS & values.keys():
        if not isinstance(values[key], list):
            raise ValueError(f"instance stats field {key} must be a list")
        values[key] = tuple(values[key])
    try:
        return InstanceStats(**values)
    except TypeError as error:
        raise ValueError(f"instance stats: {error}") from error


class HttpInstanceSource:
    """One engine server, read at `base_url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, base_url: str, timeout_s: float = 0.5) -> None:
        self.url = base_url.rstrip("/") + INSTANCE_STATS_PATH
        self.timeout_s = timeout_s
        self._answering = True

    def __repr__(self) -> str:
        return f"HttpInstanceSource({self.url!r})"

    def instance_stats(self) -> list[InstanceStats]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                stats = parse_instance_stats(json.load(response))
        except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors
            if self._answering:
                log.warning("engine at %s does not answer: %s", self.url, error)
            self._answering = False
            return []
        if not self._answering:
            log.info("engine at %s answers again", self.url)
        self._answering = True
        return [stats]
