"""Which Prefect API a birdflow process talks to, and with which Prefect settings: decided here, once per process.

The rule: the station's settings decide every Prefect setting birdflow sets (they read the environment themselves:
an exported PREFECT_API_URL is the setting prefect_api_url); any other PREFECT_ variable in the environment passes
through. A process that works for the fleet (the relay; the worker of a station with central_api_url) talks to the
central API, with that server's auth and never the station's own. `up` gives its children the same environment
(supervisor.child_environment), and each command applies it to itself with use_prefect.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from birdflow.app.postgres import postgres_credentials
from birdflow.settings import Settings

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


def process_environment(settings: Settings, base: Mapping[str, str], central: bool = False) -> dict[str, str]:
    """`base` (an environment) with this station's Prefect settings over it: the rule above."""
    return central_environment(settings, base) if central else {**base, **prefect_environment(settings)}


def use_prefect(settings: Settings, central: bool = False) -> dict[str, str]:
    """This process's environment and Prefect's settings made so (`central`: the fleet's API); returns them."""
    from prefect.context import refresh_global_settings_context

    env = process_environment(settings, os.environ, central)
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)
    refresh_global_settings_context()  # Prefect read its settings from the environment when it was imported
    return env


def database_url(settings: Settings) -> str:
    if settings.prefect.prefect_database == "sqlite":
        return "sqlite+aiosqlite:///" + str(settings.prefect_database_file.resolve())
    return settings.prefect.prefect_database_url.get_secret_value() or (
        postgres_credentials(settings).url(settings.prefect.postgres_port)
    )
