"""The station's link to its fleet's central Prefect on its own: rare events queued once, the hours to summarise,
and the summary a person reads on the central server."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pyarrow as pa

from birdflow.core.central_link import LOOK_BACK_S, CentralLink, hour_summary
from birdflow.core.rarity import HOURLY_SCHEMA

HOUR = int(datetime(2025, 6, 1, 5, tzinfo=timezone.utc).timestamp())


def rare_event(recording_id: str, minute: int) -> dict:
    payload = {
        "scientific_name": "Spinus tristis",
        "common_name": "American Goldfinch",
        "confidence": 0.91,
        "time": f"2025-06-01T05:{minute:02d}:03+00:00",
        "station_id": "s1",
        "listener_id": "mic1",
        "archive_key": "s1/mic1/x.flac",
        "run_url": "http://127.0.0.1:4200/runs/flow-run/abc",
    }
    return {
        "event": "birdflow.detection.rare",
        "resource": {
            "prefect.resource.id": f"birdflow.recording.{recording_id}",
            "prefect.resource.name": recording_id,
        },
        "payload": payload,
    }


def test_a_rare_event_is_queued_once_and_kept_for_its_hour(tmp_path):
    link = CentralLink(tmp_path / "link.sqlite")
    link.rare(rare_event("r1", 10), once_for="r1:Spinus tristis")
    link.rare(rare_event("r1", 10), once_for="r1:Spinus tristis")  # a rerun of the same recording
    [queued] = link.events.head(10)
    sent = json.loads(queued.message.payload)
    assert queued.message.topic == "birdflow.detection.rare" and sent["event"] == "birdflow.detection.rare"
    assert sent["id"] and datetime.fromisoformat(sent["occurred"]).tzinfo is not None  # what POST /events takes
    assert [sighting["listener_id"] for sighting in link.sightings(HOUR, "s1")] == ["mic1"]
    assert link.sightings(HOUR + 3600, "s1") == [] and link.sightings(HOUR, "s2") == []


def test_hours_are_summarised_once_per_version_from_a_day_before_the_first_start(tmp_path):
    link = CentralLink(tmp_path / "link.sqlite")
    now = time.time()
    recent, old = int(now // 3600 * 3600) - 3600, int(now - LOOK_BACK_S - 7200) // 3600 * 3600
    assert link.to_summarize([(old, "s1", 1), (recent, "s1", 3)]) == [(recent, "s1", 3)]
    link.summarized(recent, "s1", 3)
    assert link.to_summarize([(recent, "s1", 3)]) == []
    assert link.to_summarize([(recent, "s1", 4)]) == [(recent, "s1", 4)]  # a late recording changed the hour


def test_the_hour_summary_lists_species_rare_sightings_and_the_station():
    counts = pa.Table.from_pylist(
        [
            {
                "time": datetime.fromtimestamp(HOUR, timezone.utc),
                "station_id": "s1",
                "listener_id": listener,
                "scientific_name": name,
                "common_name": common,
                "detections": n,
                "best_confidence": best,
            }
            for listener, name, common, n, best in [
                ("mic1", "Turdus migratorius", "American Robin", 4, 0.8),
                ("mic2", "Turdus migratorius", "American Robin", 3, 0.9),
                ("mic1", "Spinus tristis", "American Goldfinch", 1, 0.91),
            ]
        ],
        schema=HOURLY_SCHEMA,
    )
    text = hour_summary("s1", HOUR, counts, [rare_event("r1", 10)["payload"]], backlog=2, disk_free=0.5)
    assert text.startswith("### Station s1, 2025-06-01 05:00-05:59 UTC")
    assert "8 detection(s) of 2 species; 1 rare." in text
    assert text.index("| American Robin | 7 | 0.90 | mic1, mic2 |") < text.index(
        "| American Goldfinch | 1 | 0.91 | mic1 |"
    )
    assert "- **rare**: American Goldfinch (Spinus tristis) 0.91, listener mic1 at 2025-06-01T05:10:03+00:00; " in text
    assert "[its run](http://127.0.0.1:4200/runs/flow-run/abc)" in text
    assert text.endswith("Station: 2 recording(s) waiting, 50% of its disk free.")
