"""`birdflow up`: the embedded Prefect server, the ingest API and the executor, each supervised (the processes:
children.py; the embedded server: embedded_prefect.py; their Prefect settings: prefect_env.py).

A child that exits is restarted with back-off (1, 2, 4 ... 60 s), each on its own clock, so one that
keeps failing never holds the others down; Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL
after a grace period).
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

from birdflow.app.children import Child, restart_when_due, stop_all, wait_for_prefect, without_server_secrets
from birdflow.app.embedded_prefect import (
    automations_exist,
    prefect_server,
    restart_with_triggers,
    start_prefect,
    triggers_off,
)
from birdflow.app.prefect_env import prefect_environment
from birdflow.app.single import AlreadyRunning, hold_lock
from birdflow.runtime.metrics import MULTIPROC_ENV
from birdflow.settings import SETTINGS_FILE_ENV, Settings

log = logging.getLogger("birdflow.up")
UP_LOCK = "up.lock"  # under data_dir, held by `up` and its children (birdflow.app.single)
# how often `up` looks for a first automation (the embedded server then needs its triggers on)
AUTOMATION_CHECK_S = 30.0


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
            env = child_environment(settings, settings_file, triggers=True)
            restart_with_triggers(settings, prefect_server(children), env, stop)
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
                env = child_environment(settings, settings_file, triggers=True)
                try:
                    restart_with_triggers(settings, prefect_server(children), env, stop)
                except RuntimeError as exc:
                    log.error("%s", exc)  # the loop restarts it like any child that exited
    log.info("stopping")
    stop_all(children)
    return 0
