"""A real Prefect server for the tests; the other real servers (SeaweedFS, InfluxDB line protocol, the
fault proxy) live in birdflow_tools.testbed, which the drills use too."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from birdflow_tools.testbed import LOOPBACK, free_port, stop_process, wait_until


@dataclass
class PrefectServer:
    home: Path
    port: int = field(default_factory=free_port)
    extra_env: dict = field(default_factory=dict)  # server settings of a test's own
    plain: bool = False  # `prefect server start` as Prefect ships it (a fleet's central server), not birdflow's
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
        }

    def start(self, log: Path) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        # the server `birdflow up` embeds: Prefect's, with SQLite transactions that take the write lock first
        module = ["prefect", "server"] if self.plain else ["birdflow.app.prefect_server"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", *module, "start", "--host", LOOPBACK, "--port", str(self.port)],
            env={**os.environ, **self.env(), **self.extra_env},
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200, 120, "Prefect server")
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, grace_s=10)
