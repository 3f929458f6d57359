"""Prometheus agent configuration generated from the settings: scrape this station, remote-write centrally."""

from __future__ import annotations

from typing import Any

from birdflow.settings import Settings


def prometheus_config(settings: Settings, target: str = "") -> dict[str, Any]:
    """A prometheus.yml for `prometheus --enable-feature=agent`: scrape birdflow, remote-write centrally.

    Secrets go into the file only as references to files next to it (`secret_files`), so the config can be
    shown and committed; the secrets themselves come from the settings."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": f"{settings.observability.prometheus_scrape_interval_s}s",
            "external_labels": {"station": settings.station_id},
        },
        "scrape_configs": [
            {
                "job_name": "birdflow",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [target or settings.local_ingest_address], "labels": {"station": settings.station_id}}
                ],
            }
        ],
    }
    if settings.observability.metrics_token.get_secret_value():
        config["scrape_configs"][0]["authorization"] = {"type": "Bearer", "credentials_file": "metrics_token"}
    if settings.observability.prometheus_remote_write_url:
        remote: dict[str, Any] = {"url": settings.observability.prometheus_remote_write_url}
        if settings.observability.prometheus_remote_write_user:
            remote["basic_auth"] = {
                "username": settings.observability.prometheus_remote_write_user,
                "password_file": "remote_write_password",
            }
        config["remote_write"] = [remote]
    return config


def secret_files(settings: Settings) -> dict[str, str]:
    """The files `prometheus_config` refers to: name -> content."""
    files = {}
    if settings.observability.prometheus_remote_write_user:
        files["remote_write_password"] = settings.observability.prometheus_remote_write_password.get_secret_value()
    if settings.observability.metrics_token.get_secret_value():
        files["metrics_token"] = settings.observability.metrics_token.get_secret_value()
    return files
