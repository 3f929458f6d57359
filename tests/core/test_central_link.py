"""The station's link to its fleet's central Prefect on its own: rare events queued once, the hours to summarise,
and the summary a person reads on the central server."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pyarrow as pa

from birdflow.core.central_link import CONFIRMED_EVENT, LOOK_BACK_S, CentralLink, confirmation, hour_summary
from birdflow.core.rarity import HOURLY_SCHEMA

HOUR = int(datetime(2025, 6, 1, 5, tzinfo=timezone.utc).timestamp())


def rare_event(recording_id: str, minute: int, station: str = "s1", listener: str = "mic1") -> dict:
    payload = {
        "scientific_name": "Spinus tristis",
        "common_name": "American Goldfinch",
        "confidence": 0.91,
        "time": f"2025-06-01T05:{minute:02d}:03+00:00",
        "station_id": station,
        "listener_id": listener,
        "archive_key": "s1/mic1/x.flac",
        "run_url": "http://127.0.0.1:4200/runs/flow-run/abc",
    }
    return {
        "id": f"event-{recording_id}",
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
    this_hour = int(now // 3600 * 3600)
    recent, old = this_hour - 3600, int(now - LOOK_BACK_S - 7200) // 3600 * 3600
    assert link.to_summarize([(old, "s1", 1), (recent, "s1", 3)], "s1", now, 0) == [(recent, "s1", 3)]
    link.summarized(recent, "s1", 3)
    assert link.to_summarize([(recent, "s1", 3)], "s1", now, 0) == []
    assert link.to_summarize([(recent, "s1", 4)], "s1", now, 0) == [(recent, "s1", 4)]  # a late recording


def test_an_hour_waits_for_its_recordings_still_to_be_analysed(tmp_path):
    """Its detections are counted before the recording is recorded as processed: summarised then, the hour would
    name no listener (as once on a busy machine: "0 listener(s) sent recordings" beside the hour's detection)."""
    link = CentralLink(tmp_path / "link.sqlite")
    now = time.time()
    hour = int(now // 3600 * 3600) - 3600
    waiting = f"mic1_{datetime.fromtimestamp(hour + 1200, timezone.utc):%Y%m%dT%H%M%S}Z_0123abcd.flac"
    other_hour = f"mic2_{datetime.fromtimestamp(hour - 3600, timezone.utc):%Y%m%dT%H%M%S}Z_0123abcd.wav"
    closed = [(hour, "s1", 2)]
    assert link.to_summarize(closed, "s1", now, 0, [waiting, other_hour, "dropped-in.wav"]) == []
    assert link.to_summarize(closed, "s1", now, 0, [other_hour]) == [(hour, "s1", 2)]  # analysed: summarised


def test_quiet_hours_are_summarised_too_from_the_first_start_once_they_settled(tmp_path):
    link = CentralLink(tmp_path / "link.sqlite")
    started = link.first_started()
    first = int(started // 3600 * 3600)
    assert link.to_summarize([], "s1", started, 300) == []  # the hour it started in has not closed
    later = first + 3 * 3600 + 200  # three hours closed; the last one not settled for 300 s
    assert link.to_summarize([(first + 3600, "s1", 2)], "s1", later, 300) == [
        (first, "s1", 0),
        (first + 3600, "s1", 2),
    ]
    assert [hour for hour, _, _ in link.to_summarize([], "s1", later + 100, 300)] == [first, first + 3600, first + 7200]
    link.summarized(first, "s1", 0)
    assert (first, "s1", 0) not in link.to_summarize([], "s1", later + 100, 300)
    assert (first, "s1", 1) in link.to_summarize([(first, "s1", 1)], "s1", later + 100, 300)  # heard after all
    a_week_on = later + 7 * 86400
    assert len(link.to_summarize([], "s1", a_week_on, 300)) <= LOOK_BACK_S // 3600  # a day of quiet hours at most


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
    listeners = ({"mic1", "mic2", "mic3", "mic4"}, {"mic1", "mic2"})
    text = hour_summary("s1", HOUR, counts, [rare_event("r1", 10)["payload"]], listeners, backlog=2, disk_free=0.5)
    assert text.startswith("### Station s1, 2025-06-01 05:00-05:59 UTC")
    assert "8 detection(s) of 2 species; 1 rare." in text
    assert text.index("| American Robin | 7 | 0.90 | mic1, mic2 |") < text.index(
        "| American Goldfinch | 1 | 0.91 | mic1 |"
    )
    assert "- **rare**: American Goldfinch (Spinus tristis) 0.91, listener mic1 at 2025-06-01T05:10:03+00:00; " in text
    assert "[its run](http://127.0.0.1:4200/runs/flow-run/abc)" in text
    assert text.endswith(
        "Station: 2 recording(s) waiting, 50% of its disk free; 2 listener(s) sent recordings, 2 silent: mic3, mic4."
    )
    quiet = hour_summary("s1", HOUR, HOURLY_SCHEMA.empty_table(), [], ({"mic1"}, {"mic1"}), backlog=0, disk_free=1)
    assert "0 detection(s) of 0 species; 0 rare." in quiet and quiet.endswith("1 listener(s) sent recordings.")


def test_two_stations_rare_sightings_of_a_species_within_the_window_confirm_each_other():
    first, second = rare_event("r1", 10, station="s1"), rare_event("r2", 40, station="s2")
    assert confirmation(second, [], 3600, "stations") is None  # nobody else heard it
    confirmed = confirmation(second, [first], 3600, "stations")
    assert confirmed is not None and confirmed["event"] == CONFIRMED_EVENT
    assert confirmed["payload"]["stations"] == ["s1", "s2"] and confirmed["payload"]["first_time"].startswith(
        "2025-06-01T05:10"
    )
    assert [item["station_id"] for item in confirmed["payload"]["sightings"]] == ["s1", "s2"]
    assert confirmed["resource"]["birdflow.species"] == "Spinus tristis"
    assert {item["prefect.resource.id"] for item in confirmed["related"]} == {
        "birdflow.station.s1",
        "birdflow.station.s2",
    }
    # whichever station finds the pair (and one that finds a third sighting) sends the same event: the server keeps one
    third = rare_event("r3", 50, station="s3")
    assert confirmation(first, [second], 3600, "stations")["id"] == confirmed["id"]
    assert confirmation(third, [first, second], 3600, "stations")["id"] == confirmed["id"]
    assert confirmation(second, [first], 1200, "stations") is None  # 30 minutes apart, a 20 minute window


def test_two_listeners_confirm_only_when_listeners_are_asked_for():
    one, other = rare_event("r1", 10, listener="mic1"), rare_event("r2", 12, listener="mic2")
    assert confirmation(other, [one], 3600, "stations") is None  # one station
    assert confirmation(other, [one], 3600, "listeners")["payload"]["stations"] == ["s1"]
    assert confirmation(one, [rare_event("r1", 10)], 3600, "listeners") is None  # the same sighting, sent twice
    elsewhere = {
        **rare_event("r9", 11, station="s2"),
        "payload": {**rare_event("r9", 11)["payload"], "station_id": "s2"},
    }
    elsewhere["payload"]["scientific_name"] = "Pinus siskin"
    assert confirmation(one, [elsewhere], 3600, "stations") is None  # another species


def test_the_listeners_heard_in_an_hour_are_those_whose_recordings_started_in_it(tmp_path):
    from birdflow.core.ledger import ProcessedLedger

    ledger = ProcessedLedger(tmp_path / "processed.sqlite")
    for recording_id in ("mic1_20250601T050000Z_aa", "mic2_20250601T055959Z_bb", "mic3_20250601T060000Z_cc"):
        ledger.record(recording_id, "a1")
    assert ledger.listeners_heard(HOUR) == {"mic1", "mic2"}
    assert ledger.listeners_heard(HOUR + 3600) == {"mic3"} and ledger.listeners_heard(HOUR - 3600) == set()
