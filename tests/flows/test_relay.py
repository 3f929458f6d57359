"""A station that keeps its own run history, in a fleet: its recordings' runs stay on its embedded Prefect server;
the central Prefect gets the rare-species event and, once the hour closed, one summary run with its artifact."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from birdflow.settings import Settings, SettingsError, load_settings
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import prefect_post, wait_until


def test_the_central_server_is_not_the_stations_own(tmp_path):
    both = tmp_path / "settings.yaml"
    both.write_text("prefect_api_url: http://127.0.0.1:1/api\ncentral_api_url: http://127.0.0.1:1/api/\n")
    with pytest.raises(SettingsError, match="'central_api_url' names the station's own Prefect API"):
        load_settings(both, {})


def test_the_relay_and_worker_talk_to_the_central_server_with_its_auth_never_the_stations(tmp_path):
    from birdflow.app.supervisor import central_environment

    def settings(**values) -> Settings:
        base = {"data_dir": tmp_path, "prefect_api_auth_string": "station:secret"}
        return Settings.model_validate({**base, "central_api_url": "http://127.0.0.1:9/api", **values})

    base = {"PREFECT_API_AUTH_STRING": "station:secret", "PATH": "/bin"}
    env = central_environment(settings(), base)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:9/api" and "PREFECT_API_AUTH_STRING" not in env
    assert env["PATH"] == "/bin"
    with_auth = central_environment(settings(central_api_auth_string="fleet:other"), base)
    assert with_auth["PREFECT_API_AUTH_STRING"] == "fleet:other"


def test_the_central_server_gets_the_hour_and_the_rare_event_not_the_recordings_runs(
    prefect_server, tmp_path, sample_48k
):
    station = f"relay{time.monotonic_ns()}"
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    central = prefect_server.api_url
    pool = f"birdflow-{station}"  # the station's work pool is on the central server only
    prefect_post(central, "work_pools/", {"name": pool, "type": "process"})
    settings = {"central_api_url": central, "hourly_settle_s": 0, "work_pool": pool}
    stack = Stack(tmp_path, station_id=station, settings=settings)
    try:
        stack.start()
        stack.upload(f"mic1_{hour + timedelta(minutes=20):%Y%m%dT%H%M%S}Z.wav", sample_48k.read_bytes())
        wait_until(lambda: stack.completed_runs() == 1, 120, "the recording's run on the station's own server")

        def summary_runs() -> list[dict]:
            runs = prefect_post(central, "flow_runs/filter", {"flows": {"name": {"any_": ["station-hour"]}}})
            return [run for run in runs if station in run["tags"] and run["state_type"] == "COMPLETED"]

        wait_until(summary_runs, 60, f"the hour's summary run on the central server\n{stack.log_tail()}")
        [run] = summary_runs()
        assert run["name"] == f"{station} {hour:%Y-%m-%d %H}:00"
        assert (
            prefect_post(central, "deployments/filter", {"deployments": {"id": {"any_": [run["deployment_id"]]}}})[0][
                "work_pool_name"
            ]
            == pool
        )
        [artifact] = prefect_post(central, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        assert f"### Station {station}, {hour:%Y-%m-%d %H}:00-{hour:%H}:59 UTC" in artifact["data"]
        assert "| American Goldfinch | 1 | 0.36 | mic1 |" in artifact["data"]
        assert "- **rare**: American Goldfinch (Spinus tristis) 0.36, listener mic1" in artifact["data"]
        assert f"[its run](http://127.0.0.1:{stack.prefect_port}/runs/flow-run/" in artifact["data"]

        recordings_here = prefect_post(
            central, "flow_runs/filter", {"flows": {"name": {"any_": ["process-recording"]}}, "limit": 200}
        )
        assert not [item for item in recordings_here if station in item["tags"] or station in item["name"]]
        assert stack.completed_runs() == 1  # on the station's server, with its task runs

        def rare_events() -> list[dict]:
            found = prefect_post(
                central, "events/filter", {"filter": {"event": {"name": ["birdflow.detection.rare"]}}, "limit": 50}
            )
            return [event for event in found["events"] if event["resource"].get("birdflow.station") == station]

        wait_until(rare_events, 30, "the rare-species event on the central server")
        [event] = rare_events()
        assert event["payload"]["common_name"] == "American Goldfinch" and event["payload"]["listener_id"] == "mic1"
    finally:
        stack.stop()
