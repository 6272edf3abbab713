"""`tessera operator`: run the kopf operator (handlers in `tessera.operator.handlers`).

Every setting the Helm chart passes is an option read from an environment variable (see the
chart's README, "The environment contract"); the node-agent collector reads its own variables
(`tessera.operator.collector.COLLECTOR_ENVIRONMENT`). tests/test_helm_chart.py fails when the
chart and these drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import kopf
from click.core import ParameterSource
from kubernetes import client, config
from prometheus_client import REGISTRY, CollectorRegistry
from tessera.operator.collector import AGENT_SERVICE_ENV, Collector, collector_from_environment
from tessera.operator.leader import LeadershipLost, LeaseElector
from tessera.operator.plan_scoring import PlanScorer
from tessera.operator.reconcile import Kube

HANDLER_MODULES = ("tessera.operator.handlers",)
"""Modules whose import registers kopf handlers in kopf's default registry."""

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

Flag = asyncio.Event | threading.Event

logger = logging.getLogger(__name__)


def load_client_configuration(
    kubeconfig: str | None = None, context: str | None = None
) -> client.Configuration:
    """In-cluster service account when running in a pod, else the kubeconfig (or $KUBECONFIG)."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return configuration
        except config.ConfigException:
            pass
    config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return configuration


def make_memo(
    configuration: client.Configuration,
    namespaces: Sequence[str],
    agents: Collector | None = None,
    plan_scorer: PlanScorer | None = None,
) -> kopf.Memo:
    """What the handlers take from kopf's memo (see `tessera.operator.handlers`).

    `agents` is the node-agent telemetry collector (None when no agents are configured);
    `plan_scorer` simulates the planner's cheapest candidates (None: analytical planning only).
    """
    from tessera.operator.handlers import LockTable

    return kopf.Memo(
        kube=Kube(client.ApiClient(configuration)),
        kube_config=configuration,
        namespaces=list(namespaces),
        locks=LockTable(),
        agents=agents,
        plan_scorer=plan_scorer,
    )


@contextlib.contextmanager
def agent_telemetry(
    agents: Collector | None, registry: CollectorRegistry = REGISTRY
) -> Iterator[None]:
    """Run the collector and export its metrics from `registry` for the duration; nothing when
    `agents` is None."""
    if agents is None:
        yield
        return
    from tessera.operator.operator_metrics import register_collector_metrics

    metrics = register_collector_metrics(agents, registry)
    try:
        agents.start()
        yield
    finally:
        agents.stop()
        registry.unregister(metrics)


async def _set_when(flag: Flag, event: asyncio.Event) -> None:
    """Set `event` once `flag` is set."""
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    else:
        # A thread blocked in threading.Event.wait() would keep asyncio.run() from returning if
        # the flag is never set, so poll it.
        while not flag.is_set():
            await asyncio.sleep(0.1)
    event.set()


async def _first_of(*awaitables: Any) -> None:
    """Wait until the first of `awaitables` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


@contextlib.asynccontextmanager
async def _follower_health(endpoint: str | None) -> AsyncIterator[None]:
    """Answer the probes while waiting for the Lease (kopf serves them once it runs): a
    follower is healthy, and must not be restarted for not leading."""
    if not endpoint:
        yield
        return
    import aiohttp.web  # kopf's own web server library

    url = urllib.parse.urlsplit(endpoint)

    async def healthy(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"leader": False})

    app = aiohttp.web.Application()
    app.router.add_get(url.path or "/", healthy)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, url.hostname, url.port, shutdown_timeout=1.0).start()
    try:
        yield
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop` (main thread only; kopf installs its own handlers later)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def run_operator(
    configuration: client.Configuration,
    *,
    namespaces: Sequence[str] = (),
    standalone: bool | None = None,
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: Flag | None = None,
    ready_flag: Flag | None = None,
    agents: Collector | None = None,
    metrics_registry: CollectorRegistry = REGISTRY,
    elector: LeaseElector | None = None,
    plan_scorer: PlanScorer | None = None,
) -> None:
    """Run the operator until stopped: cluster-wide when `namespaces` is empty.

    `namespaces` may hold glob patterns (kopf's syntax). With `agents`, the node-agent telemetry
    collector runs beside kopf and its metrics are exported from `metrics_registry`. With an
    `elector`, kopf (and the collector) run only once this replica holds the Lease, and stop
    when it loses it (LeadershipLost). Used by the CLI and by the tests.
    """
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    kwargs: dict[str, Any] = {"clusterwide": True} if not namespaces else {}
    if namespaces:
        kwargs["namespaces"] = list(namespaces)

    async def operate(kopf_stop: Flag | None) -> None:
        with agent_telemetry(agents, metrics_registry):
            await kopf.operator(
                registry=kopf.get_default_registry(),
                standalone=standalone,
                peering_name=peering_name,
                liveness_endpoint=liveness_endpoint,
                stop_flag=kopf_stop,
                ready_flag=ready_flag,
                memo=make_memo(configuration, namespaces, agents, plan_scorer),
                **kwargs,
            )

    if elector is None:
        await operate(stop_flag)
        return

    # Set by the caller's flag or a signal while following, or when the Lease is lost. Tasks are
    # created before kopf starts: kopf takes the tasks created while it runs for its own, and
    # waits for them when it stops.
    stop = asyncio.Event()
    bridge = asyncio.create_task(_set_when(stop_flag, stop)) if stop_flag is not None else None
    operating: asyncio.Task[None] | None = None

    def lost() -> None:
        stop.set()
        if operating is not None:
            operating.cancel()  # at once: kopf must not act a moment longer without the Lease

    stop_campaign = asyncio.Event()
    campaign = asyncio.create_task(elector.campaign(stop_campaign, on_lost=lost))
    try:
        logger.info("%s: waiting to lead", elector)
        async with _follower_health(liveness_endpoint):
            with _stop_on_signals(stop):
                await _first_of(elector.leading.wait(), stop.wait(), asyncio.shield(campaign))
        if elector.leading.is_set() and not stop.is_set():
            # kopf waits for a threading.Event in an executor thread that asyncio.run() would
            # then wait for, stopped or not: give it the asyncio event the caller's flag sets.
            kopf_stop = stop if stop_flag is not None else None
            operating = asyncio.create_task(operate(kopf_stop), name="operator")
            try:
                await operating
            except asyncio.CancelledError:
                if not elector.lost.is_set():
                    raise
    finally:
        if bridge is not None:
            bridge.cancel()
            await asyncio.gather(bridge, return_exceptions=True)
        stop_campaign.set()
        await campaign  # hands the Lease back if held; raises LeadershipLost if it was lost


def _lease_namespace(given: str | None) -> str:
    if given:
        return given
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError as error:
        raise click.UsageError(
            "--leader-election needs the Lease's namespace: give --leader-election-namespace "
            "or POD_NAMESPACE (outside a pod there is no service account to read it from)"
        ) from error


class _NamespaceList(click.ParamType):
    """One namespace (or glob) per option; a comma-separated list in TESSERA_WATCH_NAMESPACES."""

    name = "namespace"
    envvar_list_splitter = ","

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value).strip()


LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


@click.command("operator")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    type=_NamespaceList(),
    envvar="TESSERA_WATCH_NAMESPACES",
    help="Serve ModelDeployments in this namespace (repeatable; glob patterns allowed; "
    "comma-separated in the environment variable).",
)
@click.option(
    "-A",
    "--all-namespaces",
    is_flag=True,
    help="Serve every namespace (the default when no --namespace is given).",
)
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Kubeconfig file.")
@click.option("--context", help="Kubeconfig context.")
@click.option(
    "--standalone",
    is_flag=True,
    help="Run without kopf peering (a single replica). By default peering is detected.",
)
@click.option("--peering", "peering_name", help="Name of the kopf peering object to require.")
@click.option(
    "--bind",
    default="0.0.0.0",
    show_default=True,
    help="Address the health and metrics endpoints listen on.",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    envvar="TESSERA_HEALTH_PORT",
    help="Port of GET /healthz, for the liveness and readiness probes (0 to disable).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9090,
    show_default=True,
    envvar="TESSERA_METRICS_PORT",
    help="Port of the Prometheus /metrics endpoint (0 to disable).",
)
@click.option(
    "--leader-election/--no-leader-election",
    default=False,
    show_default=True,
    envvar="TESSERA_LEADER_ELECTION",
    help="Act only while holding a coordination.k8s.io Lease, so that several replicas can run "
    "(implies --standalone: no kopf peering).",
)
@click.option(
    "--leader-election-lease",
    default="tessera-operator",
    show_default=True,
    envvar="TESSERA_LEADER_ELECTION_LEASE",
    help="Name of the Lease.",
)
@click.option(
    "--leader-election-namespace",
    envvar="POD_NAMESPACE",
    help="Namespace of the Lease [default: the pod's own namespace].",
)
@click.option(
    "--identity",
    default=socket.gethostname,
    envvar="POD_NAME",
    help="This replica's name in the Lease (a unique suffix is added) [default: host name].",
)
@click.option(
    "--log-level",
    type=click.Choice(sorted(LOG_LEVELS, key=LOG_LEVELS.__getitem__), case_sensitive=False),
    default="info",
    show_default=True,
    envvar="TESSERA_LOG_LEVEL",
)
@click.option(
    "--simulate-candidates/--no-simulate-candidates",
    default=True,
    show_default=True,
    envvar="TESSERA_SIMULATE_CANDIDATES",
    help="Simulate the planner's cheapest candidate plans before choosing (short, seeded runs; "
    "scores are cached); off: analytical planning only.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (--log-level debug).")
@click.pass_context
def operator_command(
    ctx: click.Context,
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    kubeconfig: str | None,
    context: str | None,
    standalone: bool,
    peering_name: str | None,
    bind: str,
    health_port: int,
    metrics_port: int,
    leader_election: bool,
    leader_election_lease: str,
    leader_election_namespace: str | None,
    identity: str,
    log_level: str,
    simulate_candidates: bool,
    verbose: bool,
) -> None:
    """Run the Tessera operator: plan and run ModelDeployments on the fleet's accelerators.

    When TESSERA_AGENT_SERVICE names the node agents' headless Service, the operator also follows
    their telemetry (see `tessera.operator.collector`) and exports it with its metrics.
    """
    namespaces = tuple(n for n in namespaces if n)
    if all_namespaces and namespaces:
        if ctx.get_parameter_source("namespaces") != ParameterSource.ENVIRONMENT:
            raise click.UsageError("use either --all-namespaces or --namespace, not both")
        namespaces = ()  # the command line wins over TESSERA_WATCH_NAMESPACES
    if standalone and peering_name:
        raise click.UsageError("use either --standalone or --peering, not both")
    if leader_election and peering_name:
        raise click.UsageError("use either --leader-election or --peering, not both")
    level = logging.DEBUG if verbose else LOG_LEVELS[log_level.lower()]
    kopf.configure(verbose=level <= logging.DEBUG, quiet=level >= logging.WARNING)
    logging.getLogger().setLevel(level)

    agents = None
    if os.environ.get(AGENT_SERVICE_ENV):
        try:
            agents = collector_from_environment(os.environ)
        except ValueError as error:
            raise click.UsageError(f"node-agent telemetry: {error}") from error
    else:
        logger.info("%s is not set: not following node-agent telemetry", AGENT_SERVICE_ENV)

    configuration = load_client_configuration(kubeconfig, context)
    elector = None
    if leader_election:
        elector = LeaseElector(
            client.ApiClient(configuration),
            _lease_namespace(leader_election_namespace),
            leader_election_lease,
            # Unique per process, as client-go's: a restarted container must not inherit its
            # predecessor's leadership before the Lease says so.
            f"{identity}_{uuid.uuid4().hex[:8]}",
        )
        standalone = True
    liveness_endpoint = None
    if health_port:
        host = f"[{bind}]" if ":" in bind else bind
        liveness_endpoint = f"http://{host}:{health_port}/healthz"
    metrics_server = None
    if metrics_port:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(metrics_port, addr=bind)
        logger.info("metrics on %s:%d/metrics", bind, metrics_port)
    try:
        asyncio.run(
            run_operator(
                configuration,
                namespaces=namespaces,
                standalone=True if standalone else None,
                peering_name=peering_name,
                liveness_endpoint=liveness_endpoint,
                agents=agents,
                elector=elector,
                plan_scorer=PlanScorer() if simulate_candidates else None,
            )
        )
    except LeadershipLost as error:
        raise click.ClickException(f"{error}; exiting so that the replica starts over") from error
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
