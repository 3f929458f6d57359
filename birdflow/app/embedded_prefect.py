"""The station's embedded Prefect server: started (on its own Postgres when asked for), healthy before anything uses
it, and restarted with its triggers on once an automation exists (the server evaluates none until then)."""

from __future__ import annotations

import logging
import sys
import threading

import httpx

from birdflow.app.children import Child, stop_all, wait_for_port, wait_for_prefect
from birdflow.app.postgres import embedded_postgres, postgres_cluster, postgres_credentials, provision_now
from birdflow.settings import Settings

log = logging.getLogger("birdflow.up")
PREFECT_SERVER = "prefect server"


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
        serves=1,
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


def triggers_off(settings: Settings, env: dict[str, str]) -> bool:
    return settings.embedded_prefect and env.get("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED") == "false"


def restart_with_triggers(settings: Settings, server: Child, env: dict[str, str], stop: threading.Event) -> None:
    """The embedded server again with `env`, in which it evaluates automations."""
    log.info("an automation exists: restarting the Prefect server with its triggers on")
    stop_all([server])
    server.start(env)
    wait_for_prefect(settings.api_url, 120, alive=lambda: server.alive() and not stop.is_set())


def prefect_server(children: list[Child]) -> Child:
    return next(child for child in children if child.name == PREFECT_SERVER)
