"""A real Prometheus (Debian's `prometheus` package) on a loopback port, for scraping tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_support import free_port

PROMETHEUS = shutil.which("prometheus")


@dataclass
class RunningPrometheus:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def check_alive(self) -> None:
        """Fail with Prometheus's own log if it exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()}")


@contextmanager
def running_prometheus(
    scrape_configs: list[dict[str, Any]], folder: Path
) -> Iterator[RunningPrometheus]:
    """Prometheus scraping `scrape_configs` every second, its data and log in `folder`."""
    if PROMETHEUS is None:
        raise RuntimeError("no prometheus binary (apt-get install prometheus)")
    config = folder / "prometheus.yml"
    config.write_text(  # JSON is YAML
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": scrape_configs,
            }
        )
    )
    port = free_port()
    log_path = folder / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield RunningPrometheus(process, port, log_path)
        finally:
            process.terminate()
            process.wait(timeout=30)
