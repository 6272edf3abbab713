"""Leader election on a Lease (tessera.operator.leader), against an API server over HTTP.

The electors talk to the emulator (or the cluster of $TESSERA_TEST_KUBECONFIG) with the official
client, in the test's own namespace. Where time matters the elector is given a clock the test
advances, so "not before the lease expires" is checked without waiting for it.

What the emulator cannot show: it answers no 409 Conflict on a stale resourceVersion, so two
candidates racing for the same free Lease in the same instant (which the resourceVersion each
write carries as a precondition settles on a real API server) is not tested here.

The last test runs three `tessera operator` processes configured as the chart configures
replicas with leader election on: one leads, the others answer their probes and wait; stopping a
follower is clean; stopping the leader hands the Lease over, and the new leader reconciles.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agent_support import free_port, start_sim_agent
from kubernetes import client
from operator_fixtures import (  # noqa: F401  (fixtures, used by name)
    DEADLINE_S,
    Cluster,
    Namespace,
    cluster_fixture,
    namespace_fixture,
    wait_for,
)
from operator_process import OperatorProcess, lease_spec, reconciled, sample
from tessera.operator.leader import LeadershipLost, LeaseElector, LeaseTiming
from tessera.operator.main import run_operator

T = TypeVar("T")
LEASE = "tessera-operator"
# A lease long enough that a takeover within the test's deadlines can only come from a release.
LONG = LeaseTiming(lease_duration_s=60, renew_deadline_s=10, retry_period_s=0.05)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(
    cluster: Cluster,
    namespace: Namespace,
    identity: str,
    timing: LeaseTiming = LONG,
    clock: Callable[[], float] | None = None,
    api_client: client.ApiClient | None = None,
) -> LeaseElector:
    options: dict[str, Any] = {"clock": clock} if clock else {}
    return LeaseElector(
        api_client or cluster.api_client, namespace.name, LEASE, identity, timing, **options
    )


async def until(probe: Callable[[], T | None], what: str) -> T:
    """Poll without blocking the event loop the electors run on."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not (result := probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


async def within_deadline(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, DEADLINE_S)


async def more_rounds(candidate: LeaseElector, count: int = 3) -> None:
    """Wait until `candidate` has tried `count` more times."""
    target = candidate.rounds + count
    await until(lambda: candidate.rounds >= target, f"{count} more rounds of {candidate}")


def holder(cluster: Cluster, namespace: Namespace) -> str | None:
    spec = lease_spec(cluster, namespace.name, LEASE)
    return None if spec is None else spec.get("holderIdentity") or ""


def test_one_replica_leads_and_hands_the_lease_over_when_it_stops(
    cluster: Cluster, namespace: Namespace
) -> None:
    async def scenario() -> None:
        a, b = elector(cluster, namespace, "pod-a"), elector(cluster, namespace, "pod-b")
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        task_a = asyncio.create_task(a.campaign(stop_a))
        await within_deadline(a.leading.wait())
        task_b = asyncio.create_task(b.campaign(stop_b))
        renewed = lease_spec(cluster, namespace.name, LEASE)
        await more_rounds(b)
        assert b.observed_holder == "pod-a" and not b.leading.is_set()
        spec = lease_spec(cluster, namespace.name, LEASE)
        assert spec is not None and renewed is not None
        assert spec["holderIdentity"] == "pod-a"
        assert spec["renewTime"] > renewed["renewTime"], "the leader renews"
        assert spec["acquireTime"] == renewed["acquireTime"]

        stop_a.set()
        await within_deadline(task_a)
        await within_deadline(b.leading.wait())  # long before the 60 s lease could expire
        spec = lease_spec(cluster, namespace.name, LEASE)
        assert spec is not None and spec["holderIdentity"] == "pod-b"
        assert spec["leaseTransitions"] == 1 and spec["leaseDurationSeconds"] == 60
        stop_b.set()
        await within_deadline(task_b)
        assert not b.leading.is_set() and not b.lost.is_set()

    asyncio.run(scenario())
    assert holder(cluster, namespace) == "", "a leader that stops hands the Lease back"


def test_a_dead_leaders_lease_is_taken_after_its_duration_on_the_candidates_clock(
    cluster: Cluster, namespace: Namespace
) -> None:
    dead = {
        "holderIdentity": "dead-pod",
        "leaseDurationSeconds": 15,
        # Far in the future: clock skew between nodes must not matter, only what the candidate
        # sees change on its own clock.
        "acquireTime": "2099-01-01T00:00:00.000000Z",
        "renewTime": "2099-01-01T00:00:00.000000Z",
        "leaseTransitions": 4,
    }
    # Through the generic object API: the typed create rewrites the times in a form the API
    # server refuses (see LeaseElector).
    client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
        "coordination.k8s.io",
        "v1",
        namespace.name,
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE},
            "spec": dead,
        },
    )
    clock = FakeClock()

    async def scenario() -> None:
        b = elector(cluster, namespace, "pod-b", clock=clock)
        stop = asyncio.Event()
        task = asyncio.create_task(b.campaign(stop))
        await more_rounds(b)
        clock.now += 14.5
        await more_rounds(b)
        assert b.observed_holder == "dead-pod" and not b.leading.is_set()
        clock.now += 1.0
        await within_deadline(b.leading.wait())
        spec = lease_spec(cluster, namespace.name, LEASE)
        assert spec is not None
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 5)
        stop.set()
        await within_deadline(task)

    asyncio.run(scenario())


def test_a_lease_created_on_a_whole_second_is_accepted(
    cluster: Cluster, namespace: Namespace
) -> None:
    """metav1.MicroTime has six fraction digits; isoformat() writes none at microsecond 0."""
    whole_second = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
    candidate = LeaseElector(
        cluster.api_client, namespace.name, LEASE, "pod-a", LONG, wall_clock=lambda: whole_second
    )

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(candidate.campaign(stop))
        await within_deadline(candidate.leading.wait())
        stop.set()
        await within_deadline(task)

    asyncio.run(scenario())
    spec = lease_spec(cluster, namespace.name, LEASE)
    assert spec is not None and spec["acquireTime"].startswith("2026-12-01T12:00:00")


def test_a_leader_that_finds_another_holder_stops_leading(
    cluster: Cluster, namespace: Namespace
) -> None:
    coordination = client.CoordinationV1Api(cluster.api_client)

    async def scenario() -> None:
        a = elector(cluster, namespace, "pod-a")
        task = asyncio.create_task(a.campaign(asyncio.Event()))
        await within_deadline(a.leading.wait())
        coordination.patch_namespaced_lease(
            LEASE,
            namespace.name,
            {"spec": {"holderIdentity": "intruder"}},
            _content_type="application/merge-patch+json",
        )
        with pytest.raises(LeadershipLost, match="now held by intruder"):
            await within_deadline(task)
        assert a.lost.is_set() and not a.leading.is_set()

    asyncio.run(scenario())
    assert holder(cluster, namespace) == "intruder", "the loser must not release another's Lease"


def test_a_leader_that_cannot_renew_stops_leading_at_the_renew_deadline(
    cluster: Cluster, namespace: Namespace
) -> None:
    configuration = copy.deepcopy(cluster.configuration)
    configuration.retries = 0
    clock = FakeClock()

    async def scenario() -> None:
        a = elector(
            cluster, namespace, "pod-a", clock=clock, api_client=client.ApiClient(configuration)
        )
        task = asyncio.create_task(a.campaign(asyncio.Event()))
        await within_deadline(a.leading.wait())
        configuration.host = f"http://127.0.0.1:{free_port()}"  # the API server is unreachable
        await more_rounds(a)
        clock.now += LONG.renew_deadline_s - 1
        await more_rounds(a)
        assert a.leading.is_set(), "still within the renew deadline"
        clock.now += 1
        with pytest.raises(LeadershipLost, match="not renewed"):
            await within_deadline(task)
        assert a.lost.is_set() and not a.leading.is_set()

    asyncio.run(scenario())


def test_the_operator_stops_at_once_when_its_lease_is_taken(
    cluster: Cluster, namespace: Namespace
) -> None:
    leader = elector(cluster, namespace, "pod-a")
    ready, stop = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(
                run_operator(
                    cluster.configuration,
                    namespaces=[namespace.name],
                    elector=leader,
                    ready_flag=ready,
                    stop_flag=stop,
                )
            )
        except BaseException as error:
            outcome.append(error)
        ready.set()

    thread = threading.Thread(target=run, name="operator")
    thread.start()
    try:
        assert ready.wait(DEADLINE_S) and not outcome, outcome
        assert holder(cluster, namespace) == "pod-a"
        client.CoordinationV1Api(cluster.api_client).patch_namespaced_lease(
            LEASE,
            namespace.name,
            {"spec": {"holderIdentity": "intruder"}},
            _content_type="application/merge-patch+json",
        )
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "the operator went on without the Lease"
    finally:
        stop.set()
        thread.join(DEADLINE_S)
    [error] = outcome
    assert isinstance(error, LeadershipLost), repr(error)
    assert holder(cluster, namespace) == "intruder"


def test_replicas_of_tessera_operator_elect_one_leader_and_hand_over(
    cluster: Cluster, namespace: Namespace, tmp_path: Path
) -> None:
    agent = start_sim_agent("node-x")
    election = {
        "TESSERA_WATCH_NAMESPACES": namespace.name,
        "TESSERA_LEADER_ELECTION": "true",
        "TESSERA_LEADER_ELECTION_LEASE": LEASE,
        "POD_NAMESPACE": namespace.name,
        "TESSERA_AGENT_SERVICE": "127.0.0.1",
        "TESSERA_AGENT_GRPC_PORT": str(agent.port),
    }
    replicas: dict[str, OperatorProcess] = {}

    def start(name: str) -> OperatorProcess:
        replicas[name] = OperatorProcess(cluster, tmp_path, name, {**election, "POD_NAME": name})
        wait_for(lambda: replicas[name].alive() and replicas[name].health(), f"{name}'s /healthz")
        return replicas[name]

    def lease_holder_is(name: str) -> bool:
        return (holder(cluster, namespace) or "").startswith(f"{name}_")

    def agent_up(replica: OperatorProcess) -> float | None:
        return sample(
            replica.metrics(), "tessera_collector_agent_up", agent="127.0.0.1", node="node-x"
        )

    try:
        a = start("pod-a")
        wait_for(lambda: lease_holder_is("pod-a"), "pod-a to hold the Lease")
        wait_for(lambda: agent_up(a) == 1.0, "the leader to follow the agent")
        b, c = start("pod-b"), start("pod-c")
        assert b.health() == c.health() == '{"leader": false}'
        namespace.create_classes("l40s")
        document = namespace.chat_deployment()
        cluster.create_md(namespace.name, document)
        reconciled(cluster, namespace, 1)
        assert lease_holder_is("pod-a")
        assert "tessera_collector_" not in (b.metrics() or "x"), "followers follow no agents"

        assert c.terminate() == 0, "a follower stops cleanly"
        assert a.terminate() == 0
        wait_for(lambda: lease_holder_is("pod-b"), "pod-b to take the released Lease over")
        wait_for(lambda: agent_up(b) == 1.0, "the new leader to follow the agent")
        traffic = document["spec"]["traffic"]
        busier = {**traffic, "requestRatePerSecond": traffic["requestRatePerSecond"] * 1.5}
        cluster.patch_md(namespace.name, "chat", {"spec": {"traffic": busier}})
        reconciled(cluster, namespace, 2)
        assert b.terminate() == 0
        assert holder(cluster, namespace) == ""
    finally:
        for replica in replicas.values():
            replica.kill()
        agent.stop(grace_s=0)
    for replica in replicas.values():
        assert "Traceback" not in replica.output(), replica.output()
