"""Events a person can be notified of: archived audio deleted is announced, about its recording and station."""

from __future__ import annotations

from birdflow.core.retention import Purged
from birdflow.flows.announce import PURGED_EVENT, purged_event_fields


def test_a_deleted_recording_becomes_an_event_about_it_with_why():
    item = Purged("mic1_20250601T050000Z_aaaaaaaa", "/data/archive/st/mic1/2025/06/01/x.flac", 4096, "floor")
    fields = purged_event_fields(item, "st")
    assert fields["event"] == PURGED_EVENT == "birdflow.archive.purged"
    assert fields["resource"]["prefect.resource.id"] == "birdflow.recording.mic1_20250601T050000Z_aaaaaaaa"
    assert fields["resource"]["birdflow.station"] == "st"
    assert fields["payload"] == {"reason": "floor", "path": "/data/archive/st/mic1/2025/06/01/x.flac", "size": 4096}


def test_run_links_open_where_people_reach_the_ui_and_through_its_login_when_it_has_one():
    import logging

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_UI_URL, temporary_settings

    from birdflow.app.prefect_env import prefect_environment
    from birdflow.flows.announce import ui_link
    from birdflow.flows.engine import RunLinkThroughLogin
    from birdflow.settings import Settings

    settings = Settings(public_ui_url="https://prefect.example.org/")
    assert prefect_environment(settings)["PREFECT_UI_URL"] == "https://prefect.example.org"
    with temporary_settings(updates={PREFECT_UI_URL: "https://prefect.example.org"}):
        assert ui_link("/runs/flow-run/abc") == "https://prefect.example.org/runs/flow-run/abc"
        with temporary_settings(updates={PREFECT_API_AUTH_STRING: "birdflow:secret"}):
            login = "https://prefect.example.org/login?redirect=%2Fruns%2Fflow-run%2Fabc"
            assert ui_link("/runs/flow-run/abc") == login
            # the engine's own line about a run, as the station's log shows it
            record = logging.LogRecord("prefect.flow_runs", logging.INFO, "", 0, "", (), None)
            record.msg = "View at https://prefect.example.org/runs/flow-run/abc"
            assert RunLinkThroughLogin().filter(record) and record.msg == f"View at {login}"
