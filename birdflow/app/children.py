"""The processes `birdflow up` keeps: each a Child, started with its environment, restarted with back-off when it
exits, and stopped in order (clients, then the Prefect server, then its database)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client import multiprocess

from birdflow.app.single import dying_with_this_process
from birdflow.settings import Settings

log = logging.getLogger("birdflow.up")
STOP_GRACE_S = 15.0
# what the Prefect server takes to store its clients' last events once they stopped: its task run recorder flushes
# every second (prefect_env.py); stopped in the middle of a flush, it logs the batch as lost with a traceback
SERVER_SETTLE_S = 2.0
SERVER_SECRETS = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_DATABASE_CONNECTION_URL")


def without_server_secrets(env: dict[str, str]) -> dict[str, str]:
    """What a client of the Prefect server (ingest, executor, a command) needs: not the server's own secrets."""
    return {name: value for name, value in env.items() if name not in SERVER_SECRETS}


def wait_until_ready(ready, timeout_s: float, failure: str, alive=lambda: True, interval_s: float = 0.5) -> None:
    """Poll `ready()` until it is true; RuntimeError(failure) after the timeout or once `alive()` is false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if ready():
            return
        time.sleep(interval_s)
    raise RuntimeError(failure)


def prefect_answers(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Prefect API at api_url says it is healthy."""
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_prefect(api_url: str, timeout_s: float, alive=lambda: True) -> None:
    failure = f"the Prefect API at {api_url} did not become healthy within {timeout_s:.0f} s"
    wait_until_ready(lambda: prefect_answers(api_url), timeout_s, failure, alive)


def wait_for_port(port: int, timeout_s: float, alive=lambda: True) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until_ready(listening, timeout_s, f"nothing listens on port {port} after {timeout_s:.0f} s", alive, 0.2)


@dataclass
class Child:
    name: str
    command: list[str]
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    signal_group: bool = True  # False: signal the leader only, which stops its own workers in order
    server_secrets: bool = False  # the Prefect server alone gets its auth string and database URL
    serves: int = 0  # stopped after its clients: 1 the Prefect server, 2 its database
    keep_fds: tuple[int, ...] = ()  # descriptors it inherits: the data folder's lock (birdflow.app.single)
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    restart_at: float | None = None  # set while it waits out its back-off

    def start(self, env: dict[str, str]) -> None:
        log.info("starting %s", self.name)
        self.process = subprocess.Popen(
            self.command,
            env=env if self.server_secrets else without_server_secrets(env),
            start_new_session=True,
            user=self.user,
            group=self.user,
            pass_fds=self.keep_fds,
            preexec_fn=dying_with_this_process(),
        )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.alive():
            (os.killpg if self.signal_group else os.kill)(self.process.pid, self.stop_signal)

    def kill(self) -> None:
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)


def stop_all(children: list[Child]) -> None:
    """The Prefect server's clients first (all at once), then the server, then its database, each once the one
    before has stopped: a server stopped under its clients, or a database under its server, fails every call in
    flight with a traceback; the server gets SERVER_SETTLE_S to store what its clients sent last. Whatever still
    runs when the grace period is over is killed."""
    deadline = time.monotonic() + STOP_GRACE_S
    for tier in sorted({child.serves for child in children}):
        stopping = [child for child in reversed(children) if child.serves == tier]
        if tier == 1 and any(child.serves == 0 for child in children):
            time.sleep(max(0.0, min(SERVER_SETTLE_S, deadline - time.monotonic())))
        for child in stopping:
            child.stop()
        for child in stopping:
            while child.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
    for child in children:
        child.kill()


def restart_when_due(child: Child, env: dict[str, str], settings: Settings) -> None:
    """A child found dead waits out its own back-off, then starts again."""
    now = time.monotonic()
    if child.alive() or child.process is None:
        return
    if child.restart_at is None:
        # the gauges a dead process left (open streams, backlog) must not count any more
        multiprocess.mark_process_dead(child.process.pid, str(settings.metrics_dir))
        if now - child.started_at > 60:
            child.restarts = 0  # it ran fine for a while: restart quickly
        delay = min(2**child.restarts, 60)
        log.warning("%s exited with %s; restarting in %d s", child.name, child.process.returncode, delay)
        child.restart_at = now + delay
    elif now >= child.restart_at:
        child.restart_at = None
        child.restarts += 1
        child.start(env)
