"""Leader election on a coordination.k8s.io/v1 Lease: only the replica holding it runs kopf.

The chart runs more than one operator replica only with leader election on (its values schema
says so) and grants a Role on one Lease in the release namespace. The rules are client-go's:
- the leader renews the Lease every retry period, and stops leading when it could not renew it
  for the renew deadline, or when it finds another holder in it;
- a candidate takes the Lease when it has no holder (a leader that stops cleanly empties it), or
  when its record has not changed for leaseDurationSeconds as measured on the candidate's own
  clock, so clock skew between nodes does not matter;
- every update is a merge patch that carries the resourceVersion it read, which the API server
  takes as a precondition: of two candidates racing for a free Lease one wins and the other gets
  409 Conflict.

Why not `kubernetes.leaderelection`: its loops sleep in `time.sleep` with no way to stop them,
and it never hands the Lease back, so every rollout would wait out a whole lease duration.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""The wire format of a Lease's acquireTime and renewTime (metav1.MicroTime)."""


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's defaults: a lease of 15 s, renewed every 2 s, given up after 10 s unrenewed."""

    lease_duration_s: int = 15
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError(
                "leader election needs lease_duration_s > renew_deadline_s > retry_period_s > 0, "
                f"got {self.lease_duration_s}, {self.renew_deadline_s}, {self.retry_period_s}"
            )


class LeadershipLost(RuntimeError):
    """The Lease was taken over, or could not be renewed in time: this replica must stop acting."""


class LeaseElector:
    """Campaign for one Lease from an asyncio task; `leading` is set while this replica holds it.

    Calls to the API server run in threads (the `kubernetes` client is synchronous), so a slow
    server never blocks the event loop that kopf shares.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
            tz=datetime.UTC
        ),
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self._api = client.CoordinationV1Api(api_client)
        # The typed create_namespaced_lease validates a dict body into a V1Lease and writes its
        # times back with isoformat(), which drops the fraction when the microsecond is 0; the
        # API server wants metav1.MicroTime's six digits. The generic object API sends the body
        # as given.
        self._objects = client.CustomObjectsApi(api_client)
        self._clock = clock
        self._wall_clock = wall_clock
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self.observed_holder: str | None = None
        """The holder in the Lease as last read or written (None before the first read)."""
        self.rounds = 0
        """Attempts to acquire or renew so far."""
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0

    def __str__(self) -> str:
        return f"Lease {self.namespace}/{self.name} ({self.identity})"

    async def campaign(
        self, stop: asyncio.Event, on_lost: Callable[[], None] = lambda: None
    ) -> None:
        """Acquire and renew the Lease until `stop` is set (then hand it back if held) or until
        leadership is lost (then `lost` is set, `on_lost` called and LeadershipLost raised)."""
        last_renewal = self._clock()
        # One task waits for `stop` for the whole campaign: a task created per round while kopf
        # runs would be taken by kopf for one of its own, and cancelled when kopf stops.
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    held = await asyncio.to_thread(self._try_acquire_or_renew)
                except Exception:  # the server is unreachable or failing: try again next period
                    log.exception("%s: could not read or write the Lease", self)
                    held = False
                self.rounds += 1
                now = self._clock()
                if held:
                    last_renewal = now
                    if not self.leading.is_set():
                        log.info("%s: leading", self)
                        self.leading.set()
                elif self.leading.is_set():
                    taken = self.observed_holder not in (None, self.identity)
                    if taken or now - last_renewal >= self.timing.renew_deadline_s:
                        self.leading.clear()
                        self.lost.set()
                        on_lost()
                        reason = (
                            f"now held by {self.observed_holder}"
                            if taken
                            else f"not renewed for {now - last_renewal:.1f} s"
                        )
                        raise LeadershipLost(f"{self}: lost the Lease, {reason}")
                await asyncio.wait([stopping], timeout=self.timing.retry_period_s)
        finally:
            stopping.cancel()
            if self.leading.is_set():
                self.leading.clear()
                await asyncio.to_thread(self._release)

    # -- one round --------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any] | None:
        try:
            response: Any = self._api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        lease: dict[str, Any] = json.loads(response.data)
        return lease

    def _observe(self, spec: dict[str, Any]) -> None:
        """Remember the record and when it last changed (client-go's observedTime)."""
        if spec != self._observed_spec:
            self._observed_spec = dict(spec)
            self._observed_at = self._clock()
        self.observed_holder = spec.get("holderIdentity") or ""

    def _try_acquire_or_renew(self) -> bool:
        now = self._wall_clock().strftime(MICRO_TIME)
        lease = self._read()
        if lease is None:
            spec = self._spec(acquire_time=now, renew_time=now, transitions=0)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            create = self._objects.create_namespaced_custom_object
            if not self._write(create, "coordination.k8s.io", "v1", self.namespace, "leases", body):
                return False
            self._observe(spec)
            return True
        old = lease.get("spec") or {}
        self._observe(old)
        holder = old.get("holderIdentity") or ""
        duration_s = old.get("leaseDurationSeconds") or self.timing.lease_duration_s
        if holder not in ("", self.identity) and self._clock() - self._observed_at < duration_s:
            return False  # another replica holds it and renewed it recently enough
        transitions = int(old.get("leaseTransitions") or 0)
        if holder == self.identity:
            spec = self._spec(old.get("acquireTime") or now, now, transitions)
        else:
            spec = self._spec(now, now, transitions + 1)
            log.info("%s: taking over the Lease from %r", self, holder)
        if not self._update(lease, spec):
            return False
        self._observe(spec)
        return True

    def _spec(self, acquire_time: str, renew_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.timing.lease_duration_s,
            "acquireTime": acquire_time,
            "renewTime": renew_time,
            "leaseTransitions": transitions,
        }

    def _update(self, lease: dict[str, Any], spec: dict[str, Any]) -> bool:
        """Write `spec` into the Lease as read, unless someone wrote it since."""
        precondition = {"resourceVersion": lease["metadata"]["resourceVersion"]}
        return self._write(
            self._api.patch_namespaced_lease,
            self.name,
            self.namespace,
            {"metadata": precondition, "spec": spec},
            _content_type="application/merge-patch+json",  # RFC 7386: spec merged field by field
        )

    def _write(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Create or patch; False when another replica wrote first (409 Conflict)."""
        try:
            call(*args, _preload_content=False, **kwargs)
        except ApiException as error:
            if error.status == 409:
                log.debug("%s: another replica wrote the Lease first", self)
                return False
            raise
        return True

    def _release(self) -> None:
        """Hand the Lease back (no holder, a 1 s duration), as client-go's ReleaseOnCancel does."""
        try:
            lease = self._read()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = self._wall_clock().strftime(MICRO_TIME)
            spec = self._spec(now, now, int(lease["spec"].get("leaseTransitions") or 0))
            if self._update(lease, {**spec, "holderIdentity": "", "leaseDurationSeconds": 1}):
                log.info("%s: released the Lease", self)
        except Exception:  # the successor will take the Lease once it expires
            log.exception("%s: could not release the Lease", self)
