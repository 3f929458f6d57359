"""`birdflow up`: the embedded Prefect server, the ingest API and the executor, each supervised.

A child that exits is restarted with back-off; Ctrl-C or SIGTERM stops them all (SIGTERM, then
SIGKILL after a grace period).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from birdflow.metrics import MULTIPROC_ENV
from birdflow.settings import SETTINGS_FILE_ENV, Settings

log = logging.getLogger("birdflow.up")
STOP_GRACE_S = 15.0


def prefect_environment(settings: Settings) -> dict[str, str]:
    """Prefect settings for every birdflow process (documented in the README's Prefect section)."""
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(settings.prefect_home.resolve()),
        "PREFECT_API_URL": settings.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        # results of cached tasks (analysis tables) live beside the rest of the station's data
        "PREFECT_LOCAL_STORAGE_PATH": str((settings.prefect_home / "storage").resolve()),
    }
    if settings.embedded_prefect:
        env.update(
            {
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
                "PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///"
                + str((settings.prefect_home / "prefect.db").resolve()),
                "PREFECT_UI_API_URL": settings.api_url,
            }
        )
    return env


def child_environment(settings: Settings, settings_file: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(prefect_environment(settings))
    env[MULTIPROC_ENV] = str(settings.metrics_dir.resolve())
    env["DATA_DIR"] = str(settings.data_dir.resolve())
    if settings_file:
        env[SETTINGS_FILE_ENV] = os.path.abspath(settings_file)
    return env


def wait_for_prefect(api_url: str, timeout_s: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect API at {api_url} did not become healthy within {timeout_s:.0f} s")


@dataclass
class Child:
    name: str
    command: list[str]
    process: Optional[subprocess.Popen] = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        log.info("starting %s", self.name)
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)


def supervise(settings: Settings, settings_file: Optional[str]) -> int:
    """Run the stack until SIGINT/SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    shutil.rmtree(settings.metrics_dir, ignore_errors=True)
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings, settings_file)
    cli = [sys.executable, "-m", "birdflow.cli"]
    children = []
    if settings.embedded_prefect:
        server = Child(
            "prefect server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect_port)],
        )
        children.append(server)
        server.start(env)
        try:
            wait_for_prefect(settings.api_url, 120, alive=lambda: server.alive() and not stop.is_set())
        except RuntimeError as exc:
            log.error("%s", exc)
            server.stop()
            return 1
        if not server.alive():
            log.error("the Prefect server exited during start-up (is port %d in use?)", settings.prefect_port)
            return 1
    else:
        wait_for_prefect(settings.api_url, 60)
    if not stop.is_set():
        from blocks import register_blocks

        os.environ.update(prefect_environment(settings))
        for slug in register_blocks(settings):
            log.info("block %s registered", slug)
    for child in (Child("ingest API", cli + ["ingest"]), Child("executor", cli + ["execute"])):
        children.append(child)
        if not stop.is_set():
            child.start(env)
    print(
        f"birdflow is up: ingest API on http://{settings.ingest_host}:{settings.ingest_port} "
        f"(metrics at /metrics), Prefect UI at {settings.api_url.removesuffix('/api')}. Ctrl-C stops.",
        flush=True,
    )
    while not stop.wait(1.0):
        for child in children:
            if not child.alive():
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0  # it ran fine for a while: restart quickly
                delay = min(2**child.restarts, 60)
                log.warning("%s exited with %s; restarting in %d s", child.name, child.process.returncode, delay)
                if stop.wait(delay):
                    break
                child.restarts += 1
                child.start(env)
    log.info("stopping")
    for child in reversed(children):
        child.stop()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in reversed(children):
        while child.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        child.kill()
    return 0
