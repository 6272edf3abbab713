"""`tessera router`: the flags, checked, and the router started.

Bad input is a one-line error naming the flag, exit status 2. Importing this module costs only
click; aiohttp, numpy and the dispatch policy load when it runs.
"""

from __future__ import annotations

from typing import Any, NoReturn
from urllib.parse import urlparse

import click

POLICIES = ("least-tokens", "least-requests", "least-kv", "round-robin", "power-of-two")


def fail(message: str) -> NoReturn:
    click.echo(f"tessera router: error: {message}", err=True)
    raise SystemExit(2)


def check_urls(flag: str, urls: tuple[str, ...]) -> list[str]:
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            fail(f"{flag} {url}: expected an http(s)://host:port base URL")
    return list(urls)


@click.command("router")
@click.option("--prefill", "prefill", multiple=True, help="A prefill instance's base URL.")
@click.option("--decode", "decode", multiple=True, help="A decode (or colocated) instance's URL.")
@click.option(
    "--prefill-service",
    multiple=True,
    help="Base URL whose host is a headless Service of prefill pods (re-resolved every probe).",
)
@click.option(
    "--decode-service",
    multiple=True,
    help="Base URL whose host is a headless Service of decode pods (re-resolved every probe).",
)
@click.option("--policy", type=click.Choice(POLICIES), default="least-tokens", show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="The engines' KV block size (their capacity in tokens is blocks x this).",
)
@click.option("--probe-interval-s", type=click.FloatRange(0.05, 60), default=1.0, show_default=True)
@click.option("--probe-timeout-s", type=click.FloatRange(0.05, 30), default=0.5, show_default=True)
@click.option(
    "--stream-timeout-s",
    type=click.FloatRange(0.1, 3600),
    default=30.0,
    show_default=True,
    help="Longest wait for an instance's next byte; past it the stream ends with an error.",
)
@click.option("--max-attempts", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def router_command(**flags: Any) -> None:
    """Route OpenAI requests: a prefill instance computes the prompt, a decode one the tokens."""
    decode = check_urls("--decode", flags["decode"])
    prefill = check_urls("--prefill", flags["prefill"])
    decode_services = check_urls("--decode-service", flags["decode_service"])
    prefill_services = check_urls("--prefill-service", flags["prefill_service"])
    if not decode and not decode_services:
        fail("--decode: give at least one decode (or colocated) instance or --decode-service")
    import logging

    from tessera.agents.router.proxy import RouterConfig, run

    logging.basicConfig(level=flags["log_level"].upper(), format="%(asctime)s %(name)s %(message)s")
    run(
        RouterConfig(
            prefill_urls=prefill,
            decode_urls=decode,
            policy=flags["policy"],
            host=flags["host"],
            port=flags["port"],
            block_size=flags["block_size"],
            probe_interval_s=flags["probe_interval_s"],
            probe_timeout_s=flags["probe_timeout_s"],
            stream_timeout_s=flags["stream_timeout_s"],
            max_attempts=flags["max_attempts"],
            prefill_services=tuple(prefill_services),
            decode_services=tuple(decode_services),
        )
    )
