"""`birdflow init` and `birdflow central-setup`, and that settings.example.yaml documents every setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client

from birdflow.app.provisioning import ENV_TEMPLATE, create_influx_database, settings_template
from birdflow.settings import Settings, load_settings


def test_example_settings_name_every_setting_with_its_default(tmp_path):
    template = tmp_path / "settings.yaml"
    template.write_text(settings_template())
    example = yaml.safe_load(template.read_text())
    secrets = {
        "influx_token",
        "aws_secret_access_key",
        "prometheus_remote_write_password",
        "prefect_api_auth_string",
        "central_api_auth_string",
        "metrics_token",
        "mqtt_password",
    }
    assert set(Settings.flat_fields()) - set(example) == secrets  # secrets live in .env
    assert set(example) <= set(Settings.flat_fields())
    assert load_settings(template, environ={}) == Settings()


def test_the_env_template_sets_only_settings():
    names = {line.split("=", 1)[0].lstrip("# ") for line in ENV_TEMPLATE.splitlines() if "=" in line}
    for_compose = {"GRAFANA_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "UI_BIND"}  # read by docker compose, not by birdflow
    assert names - for_compose and names - for_compose <= {name.upper() for name in Settings.flat_fields()}


def test_init_writes_settings_and_env_that_load_back_and_keeps_existing_files(tmp_path, monkeypatch):
    cli = [sys.executable, "-m", "birdflow.app.cli", "init", "--dir", str(tmp_path), "--station", "pi-7"]
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in {name.upper() for name in Settings.flat_fields()}
    }
    first = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0  # secrets file readable by its owner only
    (tmp_path / ".env").write_text(
        (tmp_path / ".env").read_text().replace("INFLUX_TOKEN=", "INFLUX_TOKEN='from-dotenv'")
    )
    monkeypatch.chdir(tmp_path)
    for name in ("STATION_ID", "INFLUX_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.station_id == "pi-7" and settings.sinks.influx_token.get_secret_value() == "from-dotenv"
    # secrets of its own for every station: Prefect's auth string and the metrics token
    user, _, password = settings.prefect.prefect_api_auth_string.get_secret_value().partition(":")
    assert (
        user == "birdflow"
        and len(password) >= 24
        and len(settings.observability.metrics_token.get_secret_value()) >= 24
    )
    assert settings.ingest.ingest_auth == "on"  # a new station takes recordings from its own listeners only
    monkeypatch.setenv("STATION_ID", "from-environment")  # the real environment wins over .env
    assert load_settings().station_id == "from-environment"
    again = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert again.returncode != 0 and "exist already" in again.stderr
    assert "INFLUX_TOKEN='from-dotenv'" in (tmp_path / ".env").read_text()


@pytest.mark.e2e
def test_central_setup_creates_station_pools_with_limits(prefect_server, tmp_path):
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        yaml.safe_dump({"data_dir": str(tmp_path / "data"), "prefect_api_url": prefect_server.api_url})
    )
    command = [
        sys.executable,
        "-m",
        "birdflow.app.cli",
        "--settings",
        str(settings_file),
        "central-setup",
        "--stations",
        "north,south",
        "--pool-limit",
        "3",
    ]
    for limit in ("3", "1"):
        command[-1] = limit
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "InfluxDB is off" in result.stdout
        and "no blocks registered: the S3 archive and InfluxDB are both off" in result.stdout
    )
    with get_client(sync_client=True) as client:
        for station in ("north", "south"):
            pool = client.read_work_pool(f"birdflow-{station}")
            assert pool.type == "birdflow" and pool.concurrency_limit == 1


def test_the_influx_admin_token_reaches_the_influxdb3_cli_through_its_environment_not_its_command_line(
    tmp_path, monkeypatch
):
    """A stand-in `influxdb3` on PATH records what it was given, as the process list would show it."""
    seen = tmp_path / "seen"
    cli = tmp_path / "bin" / "influxdb3"
    cli.parent.mkdir()
    cli.write_text(f'#!/bin/sh\necho "$*" > {seen}.argv\necho "$INFLUXDB3_AUTH_TOKEN" > {seen}.env\n')
    cli.chmod(0o755)
    monkeypatch.setenv("PATH", f"{cli.parent}{os.pathsep}{os.environ['PATH']}")
    settings = Settings(influx_enabled=True, influx_host="http://127.0.0.1:8181", influx_token="writer")
    said: list[str] = []
    create_influx_database(settings, "admin-s3cret", said.append)
    assert (tmp_path / "seen.argv").read_text().split() == [
        "create",
        "database",
        "birdflow",
        "--host",
        "http://127.0.0.1:8181",
    ]
    assert (tmp_path / "seen.env").read_text().strip() == "admin-s3cret"
    assert said == ["InfluxDB database birdflow ready"]
