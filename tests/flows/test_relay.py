"""Stations that keep their own run history, in a fleet: their recordings' runs stay on their embedded Prefect
servers; the central Prefect gets each one's rare-species events and, once the hour closed, one summary run with its
artifact; two stations' sightings of a rare species become one confirmed event there."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from birdflow.settings import Settings, SettingsError, load_settings
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import WebhookReceiver, prefect_post, wait_until
from tests.servers import PrefectServer


def test_the_central_server_is_not_the_stations_own(tmp_path):
    both = tmp_path / "settings.yaml"
    both.write_text("prefect_api_url: http://127.0.0.1:1/api\ncentral_api_url: http://127.0.0.1:1/api/\n")
    with pytest.raises(SettingsError, match="'central_api_url' names the station's own Prefect API"):
        load_settings(both, {})


def test_the_relay_and_worker_talk_to_the_central_server_with_its_auth_never_the_stations(tmp_path):
    from birdflow.app.prefect_env import central_environment

    def settings(**values) -> Settings:
        base = {"data_dir": tmp_path, "prefect_api_auth_string": "station:secret"}
        return Settings.model_validate({**base, "central_api_url": "http://127.0.0.1:9/api", **values})

    base = {"PREFECT_API_AUTH_STRING": "station:secret", "PATH": "/bin"}
    env = central_environment(settings(), base)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:9/api" and "PREFECT_API_AUTH_STRING" not in env
    assert env["PATH"] == "/bin"
    with_auth = central_environment(settings(central_api_auth_string="fleet:other"), base)
    assert with_auth["PREFECT_API_AUTH_STRING"] == "fleet:other"


def test_two_stations_on_one_central_server_send_their_hours_and_rare_events_and_confirm_each_other(
    tmp_path, sample_48k
):
    """Two stations keeping their own history hear the same rare goldfinch: each one's run stays on its own server;
    the central server gets each one's hour summary and rare event, and one confirmed event naming both, which the
    first station's notification channel on the central server sends on."""
    tag = f"relay{time.monotonic_ns()}"
    names = [f"{tag}a", f"{tag}b"]
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    # a central server of their own: on the server the other tests share, their goldfinches of today would take part
    server = PrefectServer(tmp_path / "central").start(tmp_path / "central.log")
    central = server.api_url
    stacks = []
    for station in names:
        pool = f"birdflow-{station}"  # the station's work pool is on the central server only
        prefect_post(central, "work_pools/", {"name": pool, "type": "process"})
        settings = {"central_api_url": central, "hourly_settle_s": 0, "work_pool": pool}
        (tmp_path / station).mkdir()
        stacks.append(Stack(tmp_path / station, station_id=station, settings=settings))
    receiver = WebhookReceiver()
    try:
        with ThreadPoolExecutor(2) as starting:
            list(starting.map(Stack.start, stacks))
        added = stacks[0].cli("notify", "--central", "add", "webhook", receiver.url, "--allow-loopback")
        assert added.returncode == 0, added.stderr
        for number, stack in enumerate(stacks):
            name = f"mic1_{hour + timedelta(minutes=20 + number):%Y%m%dT%H%M%S}Z.wav"
            stack.upload(name, sample_48k.read_bytes())
        for stack in stacks:
            wait_until(
                lambda stack=stack: stack.completed_runs() == 1, 120, "the recording's run on the station's own server"
            )

        def summary_runs(station: str) -> list[dict]:
            runs = prefect_post(central, "flow_runs/filter", {"flows": {"name": {"any_": ["station-hour"]}}})
            return [
                run
                for run in runs
                if station in run["tags"]
                and run["state_type"] == "COMPLETED"
                and run["name"] == f"{station} {hour:%Y-%m-%d %H}:00"
            ]

        for stack in stacks:
            station = stack.station_id
            wait_until(
                lambda station=station: summary_runs(station),
                60,
                f"the hour's summary on the central server\n{stack.log_tail()}",
            )
            [run] = summary_runs(station)
            pool = prefect_post(
                central, "deployments/filter", {"deployments": {"id": {"any_": [run["deployment_id"]]}}}
            )[0]["work_pool_name"]
            assert pool == f"birdflow-{station}"
            [artifact] = prefect_post(
                central, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
            )
            assert f"### Station {station}, {hour:%Y-%m-%d %H}:00-{hour:%H}:59 UTC" in artifact["data"]
            assert "| American Goldfinch | 1 | 0.36 | mic1 |" in artifact["data"]
            assert "- **rare**: American Goldfinch (Spinus tristis) 0.36, listener mic1" in artifact["data"]
            assert f"[its run](http://127.0.0.1:{stack.prefect_port}/runs/flow-run/" in artifact["data"]
            assert "1 listener(s) sent recordings." in artifact["data"]
            assert stack.completed_runs() == 1  # on the station's server, with its task runs

        recordings_here = prefect_post(
            central, "flow_runs/filter", {"flows": {"name": {"any_": ["process-recording"]}}, "limit": 200}
        )
        assert not [item for item in recordings_here if tag in item["name"] or any(tag in t for t in item["tags"])]

        def events(name: str) -> list[dict]:
            found = prefect_post(central, "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})
            return found["events"]

        def rare_events() -> list[dict]:
            return [
                event for event in events("birdflow.detection.rare") if event["resource"]["birdflow.station"] in names
            ]

        wait_until(lambda: len(rare_events()) == 2, 30, "both rare-species events on the central server")
        assert {event["payload"]["station_id"] for event in rare_events()} == set(names)
        assert {event["payload"]["common_name"] for event in rare_events()} == {"American Goldfinch"}

        def confirmed() -> list[dict]:
            return [event for event in events("birdflow.detection.confirmed") if event["payload"]["stations"] == names]

        # matched 10 s after sending, and again after 30 s should the server have been slow to store the other one
        wait_until(confirmed, 90, "the confirmed event on the central server\n" + stacks[1].log_tail())
        [event] = confirmed()  # the same event from both relays: stored once
        assert event["resource"]["birdflow.species"] == "Spinus tristis"
        assert [item["station_id"] for item in event["payload"]["sightings"]] == names
        assert all("/runs/flow-run/" in item["run_url"] for item in event["payload"]["sightings"])

        # the first station's channel: its own rare sighting and the confirmation, not the second station's sighting
        wait_until(lambda: len(receiver.messages) >= 2, 60, "the central server's notifications")
        time.sleep(3)
        subjects = sorted(message["subject"] for message in receiver.messages)
        assert subjects == [
            f"Confirmed: American Goldfinch at {names[0]}, {names[1]}",
            f"Rare bird at {names[0]}: American Goldfinch",
        ]
        [confirmed_text] = [item["text"] for item in receiver.messages if item["subject"].startswith("Confirmed")]
        assert f"heard by stations {names[0]}, {names[1]} within 3600 s" in confirmed_text
        # a webhook gets the fields too
        [confirmed_message] = [item for item in receiver.messages if item["subject"].startswith("Confirmed")]
        assert confirmed_message["stations"] == names and len(confirmed_message["sightings"]) == 2
    finally:
        receiver.close()
        for stack in stacks:
            stack.stop()
        server.stop()


def test_with_every_run_on_one_server_a_run_matches_its_rare_sighting_there(prefect_server):
    """Every run central (or a station's own server storing its event feed): the second station's run finds the
    first one's sighting on the server and sends the confirmed event itself."""
    from birdflow.core.rarity import RareSighting
    from birdflow.flows.announce import announce_rare
    from birdflow.settings.sections import DetectionSettings

    tag = f"shared{time.monotonic_ns()}"
    rules = DetectionSettings(rare_confirm_window_s=1800)

    def sighting(station: str, minute: int) -> RareSighting:
        heard = f"2025-06-01T05:{minute:02d}:00+00:00"
        return RareSighting(
            station, "mic1", f"mic1_{station}_{minute}", "Bubo bubo", "Eurasian Eagle-Owl", 0.9, heard, False
        )

    def events(name: str) -> list[dict]:
        found = prefect_post(
            prefect_server.api_url, "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50}
        )
        return [event for event in found["events"] if tag in json.dumps(event)]

    announce_rare([sighting(f"{tag}a", 10)], "a.flac", rules)
    wait_until(lambda: events("birdflow.detection.rare"), 30, "the first station's sighting stored")
    announce_rare([sighting(f"{tag}b", 59)], "b.flac", rules)  # 49 minutes later: outside the window
    announce_rare([sighting(f"{tag}c", 25)], "c.flac", rules)  # 15 minutes after the first: confirmed
    wait_until(lambda: events("birdflow.detection.confirmed"), 30, "the confirmed event")
    [confirmed] = events("birdflow.detection.confirmed")
    assert confirmed["payload"]["stations"] == [f"{tag}a", f"{tag}c"]


def test_a_rare_sighting_is_acknowledged_by_the_server_or_its_run_fails_and_the_retry_sends_it_once(prefect_server):
    """While the Prefect server is away (killed, restarting) a rare sighting is not dropped as emit_event's
    background worker would drop it: the run fails and is retried, and the retry's events are the same events."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from birdflow.core.rarity import RareSighting
    from birdflow.flows.announce import announce_rare
    from birdflow_tools.testbed import free_port

    tag = f"outage{time.monotonic_ns()}"
    sighting = RareSighting(
        tag, "mic1", f"mic1_{tag}", "Bubo bubo", "Eurasian Eagle-Owl", 0.9, "2025-06-01T05:10:00+00:00", False
    )
    away = {PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    with temporary_settings(updates=away), pytest.raises(httpx.ConnectError):
        announce_rare([sighting], "a.flac")

    def events(name: str) -> list[dict]:
        found = prefect_post(
            prefect_server.api_url, "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50}
        )
        return [event for event in found["events"] if tag in json.dumps(event)]

    announce_rare([sighting], "a.flac")  # the retry, once the server is back
    announce_rare([sighting], "a.flac")  # and a second retry that had reached it too
    wait_until(lambda: events("birdflow.recording.rare") and events("birdflow.detection.rare"), 30, "the events")
    time.sleep(2)  # a second copy would be stored by now
    assert len(events("birdflow.recording.rare")) == 1 and len(events("birdflow.detection.rare")) == 1
