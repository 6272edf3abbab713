"""The loop of a periodic controller's kopf daemon: one round, then wait the interval it asks.

The PowerBudget and RebalancePolicy controllers each run one daemon per object; a round returns
the seconds until the next one, or None once its object is gone. A failing round is logged and
the next one starts from the server's state again, after `retry_s`.
"""

from __future__ import annotations

from collections.abc import Callable

import kopf


def run_rounds(
    round_once: Callable[[], float | None],
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    what: str,
    retry_s: float,
) -> None:
    """Call `round_once` until it returns None or the daemon is stopped."""
    while not stopped:
        interval: float | None = retry_s
        try:
            interval = round_once()
        except Exception:  # the next round starts from the server's state again
            logger.exception("%s: round failed", what)
        if interval is None:
            return
        stopped.wait(interval)
