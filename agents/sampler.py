"""The agent's one sampling loop: devices and serving instances, once per period.

Every consumer (each telemetry stream, the Prometheus exporter) reads the same rounds, so the
hardware is read once per period however many operators watch, and the engines' latency
samples, which a source hands out only once, reach every consumer. Recent rounds are kept so
that a stream that fell behind can catch up without losing samples; a gap in `sequence` tells a
consumer that it fell further behind than that.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tessera.agents.backend import BackendError, DeviceBackend, DeviceReading
from tessera.agents.instance_stats import InstanceStats, InstanceStatsSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One sampling round."""

    sequence: int
    timestamp_s: float
    devices: tuple[DeviceReading, ...]
    instances: tuple[InstanceStats, ...]
    device_errors: dict[str, str] = field(default_factory=dict)


class Sampler:
    """Reads `backend` and `sources` every `interval_s` on a thread of its own."""

    def __init__(
        self,
        backend: DeviceBackend,
        sources: Sequence[InstanceStatsSource] = (),
        interval_s: float = 1.0,
        history: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s} s")
        self.backend = backend
        self.sources = list(sources)
        self.interval_s = interval_s
        self.clock = clock
        self._history: collections.deque[Snapshot] = collections.deque(maxlen=history)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._thread: threading.Thread | None = None
        self._sequence = 0

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every new round, on the sampling thread."""
        self._listeners.append(listener)

    def sample_once(self) -> Snapshot:
        """Take one round now and publish it."""
        readings: list[DeviceReading] = []
        errors: dict[str, str] = {}
        for info in self.backend.devices():
            try:
                readings.append(self.backend.read(info.uuid))
            except BackendError as error:
                log.warning("reading device %s failed: %s", info.uuid, error)
                errors[info.uuid] = str(error)
        instances: list[InstanceStats] = []
        for source in self.sources:
            try:
                instances.extend(source.instance_stats())
            except Exception:  # an engine's bug must not stop device telemetry
                log.exception("instance stats source %r failed", source)
        with self._changed:
            self._sequence += 1
            snapshot = Snapshot(
                sequence=self._sequence,
                timestamp_s=self.clock(),
                devices=tuple(readings),
                instances=tuple(instances),
                device_errors=errors,
            )
            self._history.append(snapshot)
            self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot listener %r failed", listener)
        return snapshot

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tessera-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wake every waiting consumer (they see `stopped`)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def latest(self) -> Snapshot | None:
        with self._changed:
            return self._history[-1] if self._history else None

    def wait_after(self, sequence: int, timeout_s: float) -> list[Snapshot]:
        """Rounds newer than `sequence` (oldest first), waiting up to `timeout_s` for one."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._stop.is_set() or (self._history and self._history[-1].sequence > sequence)
                ),
                timeout=timeout_s,
            )
            return [s for s in self._history if s.sequence > sequence]
