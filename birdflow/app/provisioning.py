"""Setting a station up (`birdflow init`) and the central server (`birdflow central-setup`)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from birdflow.settings import Settings


def settings_template() -> str:
    """settings.example.yaml, every setting with its default and what it does (shipped in the package)."""
    return resources.files("birdflow.settings").joinpath("settings.example.yaml").read_text()


ENV_TEMPLATE = """\
# Secrets and per-device values for birdflow (upper-case names override settings.yaml).
# `birdflow` reads this file from its working directory; docker compose reads it too (env_file), and
# balena/env-to-fleet.sh copies it into balena fleet variables.
STATION_ID={station_id}
# Prefect's own server auth (user:password): the UI asks for it, every birdflow process sends it
PREFECT_API_AUTH_STRING=birdflow:{prefect_password}
# token Prometheus sends for the ingest API's /metrics
METRICS_TOKEN={metrics_token}
# Grafana's admin password and the Postgres password of Prefect's database (docker compose)
GRAFANA_ADMIN_PASSWORD={grafana_password}
POSTGRES_PASSWORD={postgres_password}
# where docker compose publishes the Prefect UI and Grafana (plain HTTP): this box only; 0.0.0.0 for the network
UI_BIND=127.0.0.1
# on: each listener needs its token (`birdflow listeners add ID` prints it); off only for old firmware that
# sends none (docs/security.md): without tokens anyone on the network can send recordings
INGEST_AUTH=on
# InfluxDB 3 token of the detections database (when influx_enabled is true)
INFLUX_TOKEN=
# S3 keys of the archive (when archive_backend is s3; docker compose gives its SeaweedFS these): replace
# them with your S3's when you use another
AWS_ACCESS_KEY_ID=birdflow
AWS_SECRET_ACCESS_KEY={s3_secret}
# password of the central Prometheus' remote-write endpoint (basic auth)
PROMETHEUS_REMOTE_WRITE_PASSWORD=
# password of the MQTT broker (when mqtt_host is set)
MQTT_PASSWORD=
# the central Prefect server's auth (user:password), for a station that keeps its own run history (central_api_url)
CENTRAL_API_AUTH_STRING=
# an existing Postgres for the embedded Prefect server: postgresql+asyncpg://user:password@host/db
# PREFECT_DATABASE_URL=
# the central Prefect server, in a fleet, behind TLS: https://prefect.example.org/api (docs/fleet.md, "TLS")
# PREFECT_API_URL=
"""


def init_station(folder: Path, station_id: str, force: bool = False) -> list[Path]:
    """Write a commented settings.yaml and a .env template; existing files are kept unless forced."""
    targets = {
        folder / "settings.yaml": settings_template().replace("station_id: station01", f"station_id: {station_id}", 1),
        folder / ".env": ENV_TEMPLATE.format(
            station_id=station_id,
            prefect_password=secrets.token_urlsafe(24),
            metrics_token=secrets.token_urlsafe(24),
            grafana_password=secrets.token_urlsafe(18),
            postgres_password=secrets.token_urlsafe(18),
            s3_secret=secrets.token_urlsafe(24),
        ),
    }
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist already (--force overwrites)")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in targets.items():
        path.write_text(text)
    (folder / ".env").chmod(0o600)
    return list(targets)


def influx_commands(settings: Settings) -> list[list[str]]:
    """The `influxdb3` CLI calls that create the detections database (InfluxDB 3 Core/Enterprise). The admin token
    goes in their environment (INFLUXDB3_AUTH_TOKEN), never on a command line that every user of the machine can
    read in the process list."""
    sinks = settings.sinks
    return [["influxdb3", "create", "database", sinks.influx_database, "--host", sinks.influx_host]]


def central_setup(
    settings: Settings, stations: list[str], pool_limit: int, admin_token: str, say: Callable[[str], None]
) -> None:
    """Work pools (one per station, with a concurrency limit), the Prefect blocks, the Influx database."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    from birdflow.blocks import register_blocks
    from birdflow.flows.worker import BirdflowWorker

    template = BirdflowWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for station in stations:
            name = f"birdflow-{station}"
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type=BirdflowWorker.type, base_job_template=template, concurrency_limit=pool_limit
                    )
                )
                say(f"work pool {name} created (at most {pool_limit} runs at once)")
            except ObjectAlreadyExists:
                client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=pool_limit))
                say(f"work pool {name} exists; concurrency limit set to {pool_limit}")
    registered = register_blocks(settings)
    for slug in registered:
        say(f"block {slug} registered")
    if not registered:
        say("no blocks registered: the S3 archive and InfluxDB are both off in the settings")
    create_influx_database(settings, admin_token, say)


def create_influx_database(settings: Settings, admin_token: str, say: Callable[[str], None]) -> None:
    """The detections database, with the admin token given only through the CLI's environment."""
    if not settings.sinks.influx_enabled:
        say("InfluxDB is off in the settings: no database created")
    elif not shutil.which("influxdb3"):
        say(
            "the influxdb3 CLI is not installed here; create the database with:\n  "
            + "\n  ".join(
                f"INFLUXDB3_AUTH_TOKEN=<admin token> {' '.join(command)}" for command in influx_commands(settings)
            )
        )
    elif not admin_token:
        say("set INFLUX_ADMIN_TOKEN (influxdb3 create token --admin) to create the database")
    else:
        environment = {**os.environ, "INFLUXDB3_AUTH_TOKEN": admin_token}
        for command in influx_commands(settings):
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            output = (result.stdout + result.stderr).strip()
            if result.returncode != 0 and "already exists" not in output:
                raise RuntimeError(f"{' '.join(command[:4])} failed: {output}")
            say(f"InfluxDB database {settings.sinks.influx_database} ready")
