"""Rare species notified for real: `birdflow up`, a channel added with `birdflow notify add webhook`, a loopback
HTTP receiver as the webhook. A recording with species new to the station sends one message naming them all, with
its fields as JSON and links a phone opens (from public_url and public_ui_url); the same species again send none."""

from __future__ import annotations

import json
import time

import pytest

from birdflow_tools.stack import Stack
from birdflow_tools.testbed import WebhookReceiver
from tests.browser import rendered
from tests.conftest import SHARED_AUDIO, require_sample


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.5)
    return result


@pytest.fixture
def receiver():
    hook = WebhookReceiver()
    yield hook
    hook.close()


def test_a_recordings_new_species_are_notified_in_one_message_through_a_prefect_automation(tmp_path, receiver):
    soundscape = require_sample(SHARED_AUDIO / "soundscape_xc563936.mp3")
    public = {"public_url": "https://birds.example.org", "public_ui_url": "https://prefect.example.org"}
    stack = Stack(tmp_path, station_id="notify", settings=public)
    try:
        stack.start()
        refused = stack.cli("notify", "add", "webhook", receiver.url)  # this machine: only when asked for
        assert refused.returncode != 0 and "--allow-loopback" in refused.stderr and "Traceback" not in refused.stderr
        added = stack.cli("notify", "add", "webhook", receiver.url, "--allow-loopback")
        assert added.returncode == 0, added.stderr
        assert "birdflow-notify-notify-webhook" in added.stdout
        listed = stack.cli("notify", "list")
        header, row = listed.stdout.splitlines()
        assert header.split("\t") == ["channel", "enabled", "automation"]
        assert row.split("\t")[:2] == ["birdflow-notify-notify-webhook", "yes"]
        bad = stack.cli("notify", "add", "webhook", "not-a-url")
        assert bad.returncode != 0 and bad.stderr.strip().startswith("birdflow: expected a webhook URL")
        # `up` finds the automation when it starts and turns the embedded server's triggers on
        stack.stop()
        stack.start()
        assert "restarting the Prefect server with its triggers on" in stack.log_tail(200)

        stack.upload("mic1_20250601T053000Z.mp3", soundscape.read_bytes())
        wait_for(lambda: stack.completed_runs() == 1, 120, "the first run")
        wait_for(lambda: list(receiver.messages), 60, "the notification")
        time.sleep(8)  # what the automation would take to send a message per species
        [message] = receiver.messages  # one for the recording
        species = message["species"]
        names = [item["common_name"] for item in species]
        assert len(species) >= 3 and message["subject"] == f"Rare birds at notify: {', '.join(names)}"
        assert (message["station_id"], message["listener_id"]) == ("notify", "mic1")
        assert message["recording_id"].startswith("mic1_20250601T053000Z_")
        assert all(f"{item['common_name']} ({item['scientific_name']})" in message["text"] for item in species)
        # links a phone opens: the UI and the station as people reach them, never this machine's loopback
        assert message["run_url"].startswith("https://prefect.example.org/runs/flow-run/")
        clips = [item["clip_url"] for item in species if item["clip_url"]]
        assert clips and all(link.startswith("https://birds.example.org/clips/") for link in clips)
        assert "127.0.0.1" not in str(message)
        # the same species from another listener two minutes later: frequent now, counted but not pushed
        stack.upload("mic2_20250601T053200Z.mp3", soundscape.read_bytes())
        wait_for(lambda: stack.completed_runs() == 2, 120, "the second run")
        time.sleep(8)  # what the automation would take to send a second message
        assert len(receiver.messages) == 1
        # what a person sees: the first run's artifact page in the Prefect UI, rendered by a real browser
        first_run = message["run_url"].rsplit("/", 1)[1]
        [artifact] = stack.api("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first_run]}}})
        rows = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
        expected = (
            rows[0]["species"],
            artifact["description"].split(":")[0],
        )  # "Dark-eyed Junco (...)", "9 detections"
        page = rendered(
            f"http://127.0.0.1:{stack.prefect_port}/artifacts/artifact/{artifact['id']}",
            tmp_path / "browser",
            showing=expected,
        )
        assert all(text in page for text in expected)
        removed = stack.cli("notify", "remove", "birdflow-notify-notify-webhook")
        assert removed.returncode == 0 and removed.stdout.startswith("removed channel birdflow-notify-notify-webhook")
        assert stack.cli("notify", "list").stdout == ""
    finally:
        stack.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:4200/api/flow_runs",
        "http://localhost:8000/metrics",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/x",
        "http://0.0.0.0:4200/",
        "https://hooks.example/{{ event }}",
        "ftp://hooks.example/x",
        # IPv4 addresses written as IPv6, private networks, the cloud's metadata service, a name that does not resolve
        "http://[::ffff:127.0.0.1]:4200/",
        "http://[::ffff:7f00:1]/x",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/x",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[fd00:ec2::254]/latest",
        "http://10.1.2.3/hook",
        "http://192.168.1.20:8123/api/webhook/x",
        "http://no-such-host.invalid/hook",
    ],
)
def test_a_webhook_cannot_point_at_the_station_itself_its_network_nor_at_link_local_addresses(url):
    from birdflow.app.notify import CHANNELS, ChannelError

    with pytest.raises(ChannelError):
        CHANNELS["webhook"](url, "public")
    block = CHANNELS["webhook"]("https://203.0.113.7/hook", "public")  # an address elsewhere: taken
    assert block.allow_private_urls is False  # and checked again by Prefect when it sends


def test_a_receiver_on_the_lan_or_this_machine_is_taken_only_when_allowed():
    from birdflow.app.notify import CHANNELS, ChannelError

    lan = "http://192.168.1.20:8123/api/webhook/birds"
    assert CHANNELS["webhook"](lan, "private").allow_private_urls is True
    with pytest.raises(ChannelError, match="--allow-loopback"):
        CHANNELS["webhook"]("http://[::ffff:127.0.0.1]:8000/", "private")
    CHANNELS["webhook"]("http://127.0.0.1:8000/hook", "loopback")
    with pytest.raises(ChannelError, match="link-local"):
        CHANNELS["webhook"]("http://[::ffff:169.254.169.254]/", "loopback")


def test_a_webhook_message_is_one_json_document_whatever_the_names_hold():
    from prefect.server.utilities.user_templates import render_user_template_sync

    from birdflow.app.notify import WEBHOOK_BODY

    species = [
        {"scientific_name": "Spinus tristis", "common_name": 'Gold "finch" <b>', "confidence": 0.912},
        {"scientific_name": "Spinus pinus", "common_name": "Pine Siskin\nnext", "confidence": 0.5},
    ]
    for item in species:
        item |= {"time": "2025-06-01T05:30:03+00:00", "watched": False, "clip_url": ""}
    payload = {
        "station_id": "st",
        "listener_id": "mic1",
        "recording_id": "mic1_x",
        "time": "2025-06-01T05:30:03+00:00",
        "latitude": None,
        "longitude": None,
        "run_url": "",
        "species": species,
        "common_names": ", ".join(item["common_name"] for item in species),
    }
    message = json.loads(render_user_template_sync(WEBHOOK_BODY, {"event": {"payload": payload}}))
    assert message["species"] == species and message["latitude"] is None
    assert message["subject"] == f"Rare birds at st: {payload['common_names']}"
    assert (
        message["text"].splitlines()[0]
        == 'Gold "finch" <b> (Spinus tristis), confidence 0.91, at 2025-06-01T05:30:03+00:00'
    )
    assert "Run:" not in message["text"]  # no link rather than one nobody can open
