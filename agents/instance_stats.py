"""What a serving instance (an engine process on the node) tells the agent about itself, and
what the operator reads back: the one Python type of the contract's `InstanceSample`.

`tessera serve` answers `INSTANCE_STATS_PATH` with its `InstanceStats` as JSON
(`agents.serving.metrics.ServingMetrics.instance_stats`, from the engine's own
`EngineStatsSnapshot`); on the node agent, `agents.engine_source.HttpInstanceSource` (one per
`--engine-url`) is the `InstanceStatsSource` that reads it. The agent's sampler polls every
source once per round and ships the result in its telemetry stream and Prometheus metrics
(`agents.proto_mapping.instance_to_proto`); the operator's collector maps it back
(`instance_from_proto`). This module imports nothing heavy, so an engine can depend on it
without pulling in gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

INSTANCE_STATS_PATH = "/tessera/v1/instance-stats"
"""Where `tessera serve` answers with its `InstanceStats` as JSON (the agent's HTTP source)."""


@dataclass(frozen=True)
class InstanceStats:
    """One instance's state now, and latency samples: from a source, those of requests finished
    since the previous call (a source hands each sample out once); in the operator's collector,
    the most recent ones the agent sent."""

    instance_id: str
    model: str
    role: str  # "prefill", "decode" or "colocated"
    device_uuids: tuple[str, ...] = ()
    queue_length: int = 0
    running_batch: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    tokens_per_s: float = 0.0
    ttft_samples_s: tuple[float, ...] = ()
    tpot_samples_s: tuple[float, ...] = ()
    requests_completed_total: int = 0
    tokens_generated_total: int = 0


@runtime_checkable
class InstanceStatsSource(Protocol):
    """Anything that can report serving instances: the engine, or an adapter to another one."""

    def instance_stats(self) -> Sequence[InstanceStats]:
        """The instances this source serves; latency samples since the previous call."""
        ...
