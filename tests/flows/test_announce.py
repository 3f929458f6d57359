"""Events a person can be notified of: archived audio deleted is announced, about its recording and station."""

from __future__ import annotations

from birdflow.core.retention import Purged
from flows.announce import PURGED_EVENT, purged_event_fields


def test_a_deleted_recording_becomes_an_event_about_it_with_why():
    item = Purged("mic1_20250601T050000Z_aaaaaaaa", "/data/archive/st/mic1/2025/06/01/x.flac", 4096, "floor")
    fields = purged_event_fields(item, "st")
    assert fields["event"] == PURGED_EVENT == "birdflow.archive.purged"
    assert fields["resource"]["prefect.resource.id"] == "birdflow.recording.mic1_20250601T050000Z_aaaaaaaa"
    assert fields["resource"]["birdflow.station"] == "st"
    assert fields["payload"] == {"reason": "floor", "path": "/data/archive/st/mic1/2025/06/01/x.flac", "size": 4096}
