"""`birdflow up`: the embedded Prefect server, the ingest API and the executor, each supervised.

A child that exits is restarted with back-off (1, 2, 4 ... 60 s), each on its own clock, so one that
keeps failing never holds the others down; Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL
after a grace period).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client import multiprocess

from birdflow.app.postgres import PostgresCredentials, credentials, provision_now
from birdflow.app.single import AlreadyRunning, dying_with_this_process, hold_lock
from birdflow.runtime.metrics import MULTIPROC_ENV
from birdflow.settings import SETTINGS_FILE_ENV, Settings

log = logging.getLogger("birdflow.up")
STOP_GRACE_S = 15.0
UP_LOCK = "up.lock"  # under data_dir, held by `up` and its children (birdflow.app.single)
PREFECT_SERVER = "prefect server"
POSTGRES = "postgres"
# how often `up` looks for a first automation (the embedded server then needs its triggers on)
AUTOMATION_CHECK_S = 30.0


# Task-run states reach the server as events, which its task-run recorder writes; by default one event per
# transaction, ~30 ms of server CPU per task run. In batches (at most a second late in the UI) ~2 ms.
TASK_RUN_RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


# Prefect's vacuum: old runs (with their task runs, logs, artifacts) and, when the event persister is on,
# old events; Prefect's default is events only
VACUUM = "events,flow_runs"


def prefect_environment(settings: Settings, triggers: bool = False) -> dict[str, str]:
    """Prefect settings for every birdflow process (docs/fleet.md, "Prefect settings birdflow sets"). `triggers`: the
    embedded server evaluates automations (turned on once one exists, see `automations_exist`)."""
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(settings.prefect_home.resolve()),
        "PREFECT_API_URL": settings.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        # results of cached tasks (analysis tables) live beside the rest of the station's data
        "PREFECT_LOCAL_STORAGE_PATH": str((settings.prefect_home / "storage").resolve()),
    }
    if settings.prefect.public_ui_url:  # the run links of logs, notifications and review pages
        env["PREFECT_UI_URL"] = settings.prefect.public_ui_url
    auth = settings.prefect.prefect_api_auth_string.get_secret_value()
    if auth:  # Prefect's own server auth: every client sends it, the embedded server requires it
        env["PREFECT_API_AUTH_STRING"] = auth
        if settings.embedded_prefect:
            env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    if settings.embedded_prefect:
        env.update(
            {
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(settings.prefect.prefect_port),
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url(settings),
                "PREFECT_UI_API_URL": settings.api_url,
                # the server writes a copy of its UI (its base URL filled in) at start; by default into
                # site-packages, which an installed copy (the image: uid 1000) may not write: no UI then
                "PREFECT_UI_STATIC_DIRECTORY": str((settings.prefect_home / "ui").resolve()),
            }
        )
        # run retention with Prefect's own vacuum: terminal runs older than run_retention_days go with their
        # task runs, logs and artifacts, in batches of 200 once an hour
        env.update(TASK_RUN_RECORDER_BATCHING)
        env["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] = VACUUM
        env["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] = str(
            int(settings.unattended.run_retention_days * 86400)
        )
        if not settings.prefect.prefect_events_enabled:
            # automations (triggers) and the stored event feed: ~15 % of the server's CPU per run;
            # run, task-run and log history do not depend on them
            env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] = "true" if triggers else "false"
            env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] = "false"
    return env


def central_environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` (an environment) with the station's Prefect settings, its API the fleet's central one and that
    server's auth, never the station's own (`birdflow relay`, and the worker of a station with central_api_url)."""
    env = {**base, **prefect_environment(settings), "PREFECT_API_URL": settings.prefect.central_api_url}
    env.pop("PREFECT_API_AUTH_STRING", None)
    auth = settings.prefect.central_api_auth_string.get_secret_value()
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def database_url(settings: Settings) -> str:
    if settings.prefect.prefect_database == "sqlite":
        return "sqlite+aiosqlite:///" + str(settings.prefect_database_file.resolve())
    return settings.prefect.prefect_database_url.get_secret_value() or (
        postgres_credentials(settings).url(settings.prefect.postgres_port)
    )


def postgres_cluster(settings: Settings) -> Path:
    return (settings.prefect_home / "postgres").resolve()


def postgres_credentials(settings: Settings) -> PostgresCredentials:
    return credentials(settings.prefect_home / "postgres.secret", postgres_cluster(settings))


def postgres_program(name: str) -> str:
    """initdb/postgres from PATH or from Debian's versioned folder (which is not on PATH)."""
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise RuntimeError(
            f"prefect_database is postgres but `{name}` is not installed (Debian: apt install postgresql)"
        )
    return str(found)


def embedded_postgres(settings: Settings, keep_fds: tuple[int, ...] = ()) -> Child:
    """A Postgres cluster under data_dir for the embedded Prefect server, created on first use.

    Postgres refuses to run as root, so as root it runs as the `postgres` user that the Debian package
    creates. Commits are not flushed one by one (synchronous_commit=off): a power cut can lose the
    last few hundred milliseconds of run history, never a recording, and each state change is cheaper.
    """
    folder = postgres_cluster(settings)
    user = "postgres" if os.geteuid() == 0 else None
    folder.mkdir(parents=True, exist_ok=True)
    if user:  # the Postgres user passes through the folders birdflow keeps to itself (umask 077) to its own
        for own in (settings.data_dir, settings.prefect_home):
            own.chmod(own.stat().st_mode | 0o011)
    if not (folder / "PG_VERSION").exists():
        made = postgres_credentials(settings)
        password_file = folder.parent / "postgres.initdb-password"  # read by initdb (as its user), then gone
        password_file.write_text(made.superuser_password + "\n")
        if user:
            shutil.chown(folder, user, user)
            shutil.chown(password_file, user, user)
        try:
            result = subprocess.run(
                [
                    postgres_program("initdb"),
                    "-D",
                    str(folder),
                    "-U",
                    made.superuser,
                    "--auth=scram-sha-256",
                    f"--pwfile={password_file}",
                    "-E",
                    "UTF8",
                ],
                capture_output=True,
                text=True,
                user=user,
                group=user,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            hint = f" (the {user} user must be able to reach {folder.parent})" if user else ""
            raise RuntimeError(f"initdb failed{hint}: {result.stderr.strip()[-500:]}")
    command = [
        postgres_program("postgres"),
        "-D",
        str(folder),
        "-h",
        "127.0.0.1",
        "-p",
        str(settings.prefect.postgres_port),
        "-k",
        str(folder),
        "-c",
        "synchronous_commit=off",
        "-c",
        "max_connections=60",
        "-c",
        "shared_buffers=64MB",
    ]
    # SIGINT to the postmaster alone is Postgres' "fast" shutdown
    return Child(POSTGRES, command, user=user, stop_signal=signal.SIGINT, signal_group=False, keep_fds=keep_fds)


SERVER_SECRETS = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_DATABASE_CONNECTION_URL")


def without_server_secrets(env: dict[str, str]) -> dict[str, str]:
    """What a client of the Prefect server (ingest, executor, a command) needs: not the server's own secrets."""
    return {name: value for name, value in env.items() if name not in SERVER_SECRETS}


def child_environment(settings: Settings, settings_file: str | None, triggers: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(prefect_environment(settings, triggers))
    env[MULTIPROC_ENV] = str(settings.metrics_dir.resolve())
    env["DATA_DIR"] = str(settings.data_dir.resolve())
    # glibc gives each thread that allocates its own heap arena, up to 8 per core: the executor's run threads
    # held ~16 MB more that way, for no measurable speed (birdflow bench)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which decoded audio
    # comes from the heap and stays resident once the run is over; a fixed threshold gives it back
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 10))
    if settings_file:
        env[SETTINGS_FILE_ENV] = os.path.abspath(settings_file)
    return env


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


def start_prefect(
    settings: Settings,
    env: dict[str, str],
    children: list[Child],
    stop: threading.Event,
    keep_fds: tuple[int, ...] = (),
) -> None:
    """The embedded Prefect server (and its Postgres when asked for), healthy before anything uses it."""
    if settings.prefect.prefect_database == "postgres" and not settings.prefect.prefect_database_url.get_secret_value():
        database = embedded_postgres(settings, keep_fds)
        children.append(database)
        database.start(env)
        try:
            wait_for_port(settings.prefect.postgres_port, 60, alive=database.alive)
        except RuntimeError as exc:
            raise RuntimeError(
                f"Postgres did not start (is port {settings.prefect.postgres_port} in use?): {exc}"
            ) from None
        try:
            provision_now(settings.prefect.postgres_port, postgres_credentials(settings), postgres_cluster(settings))
        except Exception as exc:  # asyncpg's errors: one line
            raise RuntimeError(
                "the embedded Postgres refused birdflow's credentials (prefect/postgres.secret): "
                f"{type(exc).__name__}: {exc}"
            ) from None
    server = Child(
        PREFECT_SERVER,
        [
            sys.executable,
            "-m",
            "birdflow.app.prefect_server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.prefect.prefect_port),
        ],
        keep_fds=keep_fds,
        server_secrets=True,
    )
    children.append(server)
    server.start(env)
    wait_for_prefect(settings.api_url, 120, alive=lambda: server.alive() and not stop.is_set())
    if not server.alive():
        raise RuntimeError(
            f"the Prefect server exited during start-up (is port {settings.prefect.prefect_port} in use?)"
        )


def automations_exist(settings: Settings) -> bool | None:
    """Whether the Prefect server holds an automation (None when it does not answer)."""
    auth = settings.prefect.prefect_api_auth_string.get_secret_value()
    try:
        response = httpx.post(
            f"{settings.api_url}/automations/count",
            json={},
            timeout=5,
            auth=(auth.partition(":")[0], auth.partition(":")[2]) if ":" in auth else None,
        )
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return int(response.json()) > 0


def restart_with_triggers(
    settings: Settings, settings_file: str | None, server: Child, stop: threading.Event
) -> dict[str, str]:
    """The embedded server again, now evaluating automations; returns the environment children start with."""
    log.info("an automation exists: restarting the Prefect server with its triggers on")
    env = child_environment(settings, settings_file, triggers=True)
    stop_all([server])
    server.start(env)
    wait_for_prefect(settings.api_url, 120, alive=lambda: server.alive() and not stop.is_set())
    return env


def stop_all(children: list[Child]) -> None:
    """The Prefect server's clients first (all at once), then the server, then its database, each once the one
    before has stopped: a server stopped under its clients, or a database under its server, fails every call in
    flight with a traceback. Whatever still runs when the grace period is over is killed."""
    deadline = time.monotonic() + STOP_GRACE_S
    serving = {PREFECT_SERVER: 1, POSTGRES: 2}
    for tier in sorted({serving.get(child.name, 0) for child in children}):
        stopping = [child for child in reversed(children) if serving.get(child.name, 0) == tier]
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


def register_blocks_in_a_child(cli: list[str], env: dict[str, str]) -> None:
    """`birdflow blocks register` as a short-lived child: this process, which lives as long as the station,
    never imports Prefect or the AWS libraries (~70 MB it would keep)."""
    try:
        done = subprocess.run(
            cli + ["blocks", "register"], env=without_server_secrets(env), capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError("registering the Prefect blocks did not finish within 180 s") from None
    if done.returncode != 0:
        raise RuntimeError(f"registering the Prefect blocks failed: {done.stderr.strip()[-2000:]}")
    for line in done.stdout.splitlines():
        log.info("%s", line)


def triggers_off(settings: Settings, env: dict[str, str]) -> bool:
    return settings.embedded_prefect and env.get("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED") == "false"


def prefect_server(children: list[Child]) -> Child:
    return next(child for child in children if child.name == PREFECT_SERVER)


def keep_data_private(settings: Settings) -> None:
    """The data folder closed to other users, as an older version may have left it (its files were made
    readable to all, the Prefect database and its key among them); the embedded Postgres, run as its own user
    when `up` runs as root, is then let through to its folder (embedded_postgres)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings.data_dir.chmod(0o700)
        for database in settings.prefect_home.glob("prefect.db*"):
            database.chmod(0o600)
    except OSError as exc:  # not its owner (a volume made by another user): say so, run anyway
        log.warning("could not close %s to other users: %s", settings.data_dir, exc)


def supervise(settings: Settings, settings_file: str | None) -> int:
    """Run the stack until SIGINT/SIGTERM; refuse (1) while another `up` or its children run on the data folder."""
    try:
        lock = (hold_lock(settings.data_dir / UP_LOCK, "birdflow up"),)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    keep_data_private(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    shutil.rmtree(settings.metrics_dir, ignore_errors=True)
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings, settings_file)
    cli = [sys.executable, "-m", "birdflow.app.cli"]
    children: list[Child] = []
    try:
        if settings.embedded_prefect:
            start_prefect(settings, env, children, stop, lock)
        else:
            wait_for_prefect(settings.api_url, 60)
        if not stop.is_set():
            register_blocks_in_a_child(cli, env)
        if triggers_off(settings, env) and automations_exist(settings):
            env = restart_with_triggers(settings, settings_file, prefect_server(children), stop)
    except RuntimeError as exc:
        stop_all(children)
        if stop.is_set():
            return 0  # Ctrl-C during start-up
        log.error("%s", exc)
        return 1
    station = [
        Child("ingest API", cli + ["ingest"], keep_fds=lock),
        Child("executor", cli + ["execute"], keep_fds=lock),
    ]
    if settings.prefect.central_api_url:
        station.append(Child("relay", cli + ["relay"], keep_fds=lock))
    for child in station:
        children.append(child)
        if not stop.is_set():
            child.start(env)
    print(
        f"birdflow is up: ingest API on http://{settings.ingest.ingest_host}:{settings.ingest.ingest_port} "
        f"(metrics at /metrics), Prefect UI at {settings.api_url.removesuffix('/api')}. Ctrl-C stops.",
        flush=True,
    )
    next_automation_check = time.monotonic() + AUTOMATION_CHECK_S
    while not stop.wait(0.5):
        for child in children:
            restart_when_due(child, env, settings)
        if triggers_off(settings, env) and time.monotonic() > next_automation_check:
            next_automation_check = time.monotonic() + AUTOMATION_CHECK_S
            if automations_exist(settings):
                try:
                    env = restart_with_triggers(settings, settings_file, prefect_server(children), stop)
                except RuntimeError as exc:
                    log.error("%s", exc)  # the loop restarts it like any child that exited
    log.info("stopping")
    stop_all(children)
    return 0
