"""`tessera operator`: run the kopf operator (handlers in `tessera.operator.handlers`)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import click
import kopf
from kubernetes import client, config
from tessera.operator.reconcile import Kube

HANDLER_MODULES = ("tessera.operator.handlers",)
"""Modules whose import registers kopf handlers in kopf's default registry."""

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


def make_memo(configuration: client.Configuration, namespaces: Sequence[str]) -> kopf.Memo:
    """What the handlers take from kopf's memo (see `tessera.operator.handlers`)."""
    from tessera.operator.handlers import LockTable

    return kopf.Memo(
        kube=Kube(client.ApiClient(configuration)),
        kube_config=configuration,
        namespaces=list(namespaces),
        locks=LockTable(),
    )


async def run_operator(
    configuration: client.Configuration,
    *,
    namespaces: Sequence[str] = (),
    standalone: bool | None = None,
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until stopped: cluster-wide when `namespaces` is empty.

    `namespaces` may hold glob patterns (kopf's syntax). Used by the CLI and by the tests.
    """
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    kwargs: dict[str, Any] = {"clusterwide": True} if not namespaces else {}
    if namespaces:
        kwargs["namespaces"] = list(namespaces)
    await kopf.operator(
        registry=kopf.get_default_registry(),
        standalone=standalone,
        peering_name=peering_name,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=make_memo(configuration, namespaces),
        **kwargs,
    )


@click.command("operator")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Serve ModelDeployments in this namespace (repeatable; glob patterns allowed).",
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
    "--liveness",
    "liveness_endpoint",
    default="http://0.0.0.0:8080/healthz",
    show_default=True,
    help="Liveness endpoint URL (empty to disable).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9090,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint (0 to disable).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def operator_command(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    kubeconfig: str | None,
    context: str | None,
    standalone: bool,
    peering_name: str | None,
    liveness_endpoint: str,
    metrics_port: int,
    verbose: bool,
) -> None:
    """Run the Tessera operator: plan and run ModelDeployments on the fleet's accelerators."""
    if all_namespaces and namespaces:
        raise click.UsageError("use either --all-namespaces or --namespace, not both")
    if standalone and peering_name:
        raise click.UsageError("use either --standalone or --peering, not both")
    kopf.configure(verbose=verbose)
    configuration = load_client_configuration(kubeconfig, context)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
        logger.info("metrics on :%d/metrics", metrics_port)
    asyncio.run(
        run_operator(
            configuration,
            namespaces=namespaces,
            standalone=True if standalone else None,
            peering_name=peering_name,
            liveness_endpoint=liveness_endpoint or None,
        )
    )
