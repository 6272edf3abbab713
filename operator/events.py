"""core/v1 Events the operator's loops post through the API themselves.

The autoscaler and the rebalancer run rounds outside kopf's handler context, where kopf's own
event posting does not work; both build their Event here, so the shape (involved object,
timestamps, source) is written once. Posting, and what a failed post means, stays with them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tessera.api.common import GROUP, VERSION

MESSAGE_LIMIT = 1024
"""The API server refuses an Event whose message is longer than this (in characters)."""


def rfc3339(value: datetime) -> str:
    """`value` (UTC) as Kubernetes writes times: `2026-01-02T03:04:05.000006Z`."""
    return value.isoformat().replace("+00:00", "Z")


def event_body(
    *,
    kind: str,
    name: str,
    uid: str | None,
    object_namespace: str | None,
    event_namespace: str,
    type_: str,
    reason: str,
    message: str,
    now: datetime,
    component: str,
) -> dict[str, Any]:
    """An Event about the tessera object `kind`/`name` (namespaced when `object_namespace` is
    given; a cluster-scoped object's Events live in `event_namespace`)."""
    involved: dict[str, Any] = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "name": name}
    if object_namespace is not None:
        involved["namespace"] = object_namespace
    involved["uid"] = uid
    return {
        "metadata": {"generateName": f"{name}.", "namespace": event_namespace},
        "involvedObject": involved,
        "type": type_,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "firstTimestamp": rfc3339(now),
        "lastTimestamp": rfc3339(now),
        "count": 1,
        "source": {"component": component},
    }
