"""Rare species notified for real: `birdflow up`, a channel added with `birdflow notify add webhook`, a loopback
HTTP receiver as the webhook. A species new to the station notifies once; the same species again does not."""

from __future__ import annotations

import time

import pytest

from birdflow_tools.stack import Stack
from birdflow_tools.testbed import WebhookReceiver
from tests.browser import rendered


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


def test_a_new_species_is_notified_once_through_a_prefect_automation(tmp_path, sample_48k, receiver):
    stack = Stack(tmp_path, station_id="notify")
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

        stack.upload("mic1_20250601T053000Z.wav", sample_48k.read_bytes())
        wait_for(lambda: stack.completed_runs() == 1, 90, "the first run")
        [message] = wait_for(lambda: list(receiver.messages), 60, "the notification")
        assert message["subject"] == "Rare bird at notify: American Goldfinch"
        assert "American Goldfinch (Spinus tristis) heard by listener mic1 at station notify" in message["text"]
        assert f"Run: http://127.0.0.1:{stack.prefect_port}/runs/flow-run/" in message["text"]
        # the same species from another listener a minute later: frequent now, counted but not pushed
        stack.upload("mic2_20250601T053100Z.wav", sample_48k.read_bytes())
        wait_for(lambda: stack.completed_runs() == 2, 90, "the second run")
        time.sleep(8)  # what the automation would take to send a second message
        assert len(receiver.messages) == 1
        # what a person sees: the first run's artifact page in the Prefect UI, rendered by a real browser
        first_run = message["text"].rsplit("/", 1)[1]
        [artifact] = stack.api("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first_run]}}})
        expected = ("American Goldfinch (Spinus tristis)", "1 detection: American Goldfinch")
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
    ],
)
def test_a_webhook_cannot_point_at_the_station_itself_nor_at_link_local_addresses(url):
    from birdflow.app.notify import CHANNELS, ChannelError

    with pytest.raises(ChannelError):
        CHANNELS["webhook"](url, False)
    CHANNELS["webhook"]("https://203.0.113.7/hook", False)  # an address elsewhere: taken
