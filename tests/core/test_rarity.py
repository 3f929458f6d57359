"""Rare or frequent, hourly counts, and the one-line summary of a recording."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table, summary
from birdflow.core.rarity import HOURLY_SCHEMA, SpeciesRecord
from birdflow.core.sinks import ParquetSink, read_hour
from tests.builders import recording_info

JUNCO = ("Junco hyemalis", "Dark-eyed Junco")
SISKIN = ("Spinus pinus", "Pine Siskin")
DAWN = datetime(2025, 6, 1, 5, 10, tzinfo=timezone.utc)


def heard(
    recording_id: str, start: datetime, *found: tuple[tuple[str, str], float], listener: str = "mic1"
) -> pa.Table:
    info = recording_info(listener_id=listener, recording_id=recording_id, start_time=start)
    rows = [
        Detection(3.0 * n, 3.0 * n + 3, species[0], species[1], confidence)
        for n, (species, confidence) in enumerate(found)
    ]
    return detections_table(info, rows, "BirdNET_GLOBAL_6K_V2.4", "a1")


def rare_names(tally) -> list[str]:
    return sorted(sighting.common_name for sighting in tally.rare)


def test_a_species_is_rare_when_new_then_frequent_until_the_window_passes(tmp_path):
    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30)
    first = record.tally(heard("r1", DAWN, (JUNCO, 0.6), (JUNCO, 0.92), (SISKIN, 0.71)))
    assert rare_names(first) == ["Dark-eyed Junco", "Pine Siskin"]
    assert [s.confidence for s in first.rare if s.common_name == "Dark-eyed Junco"] == [0.92]  # its best
    assert first.to_announce
    assert record.tally(heard("r2", DAWN + timedelta(days=29), (JUNCO, 0.8))).rare == []
    # 29 days later it was heard again, so 30 days after the first it is still frequent
    assert record.tally(heard("r3", DAWN + timedelta(days=30), (JUNCO, 0.8))).rare == []
    later = record.tally(heard("r4", DAWN + timedelta(days=61), (JUNCO, 0.5)))
    assert rare_names(later) == ["Dark-eyed Junco"]


def test_watched_species_are_always_rare(tmp_path):
    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30, watch_species=["pine siskin"])
    record.tally(heard("r1", DAWN, (SISKIN, 0.5), (JUNCO, 0.5)))
    again = record.tally(heard("r2", DAWN + timedelta(minutes=1), (SISKIN, 0.5), (JUNCO, 0.5)))
    assert rare_names(again) == ["Pine Siskin"] and again.rare[0].watched


def test_a_recording_counts_once_and_is_announced_until_it_was(tmp_path):
    path = tmp_path / "species.sqlite"
    record = SpeciesRecord(path, rare_window_days=30)
    table = heard("r1", DAWN, (JUNCO, 0.9), (JUNCO, 0.7))
    first = record.tally(table)
    # a retry after the sinks failed: the same sightings, still to announce, nothing counted twice
    retry = SpeciesRecord(path, rare_window_days=30).tally(table)  # a restarted process reads the same file
    assert retry.rare == first.rare and retry.to_announce
    record.announced("r1")
    assert not record.tally(table).to_announce
    [(hour, station, _)] = record.hours_to_write(DAWN.timestamp() + 7200, settle_s=0)
    assert record.hour_table(hour, station).column("detections").to_pylist() == [2]


def test_two_threads_at_once_see_a_new_species_as_rare_exactly_once(tmp_path):
    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30)
    tallies, start = [], threading.Barrier(8)

    def one(number: int) -> None:
        start.wait()
        tallies.append(record.tally(heard(f"r{number}", DAWN + timedelta(seconds=number), (JUNCO, 0.5 + number / 100))))

    threads = [threading.Thread(target=one, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(tallies) == 8
    assert sum(len(tally.rare) for tally in tallies) == 1
    [(hour, station, _)] = record.hours_to_write(DAWN.timestamp() + 7200, settle_s=0)
    assert record.hour_table(hour, station).column("detections").to_pylist() == [8]


def test_hours_are_due_once_closed_and_again_after_a_late_recording(tmp_path):
    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30)
    sink = ParquetSink(tmp_path / "detections", tmp_path / "hourly", tmp_path / "health", tmp_path / "reviews")
    record.tally(heard("r1", DAWN, (JUNCO, 0.6), listener="mic1"))
    record.tally(heard("r2", DAWN, (JUNCO, 0.7), (SISKIN, 0.5), listener="mic2"))
    end_of_hour = DAWN.replace(minute=0).timestamp() + 3600
    assert record.hours_to_write(end_of_hour - 1, settle_s=0) == []  # still open
    assert record.hours_to_write(end_of_hour + 100, settle_s=300) == []  # closed, not yet settled
    [(hour, station, version)] = record.hours_to_write(end_of_hour + 300, settle_s=300)
    table = record.hour_table(hour, station)
    assert table.schema == HOURLY_SCHEMA
    assert list(zip(*(table.column(c).to_pylist() for c in ("listener_id", "common_name", "detections")))) == [
        ("mic1", "Dark-eyed Junco", 1),
        ("mic2", "Dark-eyed Junco", 1),
        ("mic2", "Pine Siskin", 1),
    ]
    sink.write_hourly(table)
    record.written(hour, station, version)
    assert record.hours_to_write(end_of_hour + 300, settle_s=300) == []
    # the hour is forgotten here; a late recording of it adds to what was written, it does not replace it
    assert record.forget(end_of_hour + 40 * 86400, keep_s=2 * 86400) == 1

    def seed(hour, station):
        return read_hour(tmp_path / "hourly", datetime.fromtimestamp(hour, timezone.utc))

    record.tally(heard("r3", DAWN + timedelta(minutes=20), (JUNCO, 0.95), listener="mic1"), seed_hour=seed)
    [(hour, station, _)] = record.hours_to_write(end_of_hour + 300, settle_s=300)
    again = record.hour_table(hour, station)
    assert again.column("detections").to_pylist() == [2, 1, 1]
    assert again.column("best_confidence").to_pylist()[0] == 0.95


def test_the_summary_line_names_each_species_with_its_best_confidence():
    table = heard("r1", DAWN, (JUNCO, 0.8), (SISKIN, 0.71), (JUNCO, 0.92))
    assert summary(table) == "3 detections: Dark-eyed Junco x2 (best 0.92), Pine Siskin (0.71)"
    assert summary(heard("r2", DAWN)) == "no detections"
    assert summary(heard("r3", DAWN, (SISKIN, 0.5))) == "1 detection: Pine Siskin (0.50)"


def test_a_rare_sighting_becomes_an_event_about_its_recording_station_and_listener(tmp_path):
    from birdflow.flows.announce import RARE_EVENT, rare_event_fields

    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30, watch_species=["Junco hyemalis"])
    [sighting] = record.tally(heard("r1", DAWN, (JUNCO, 0.92), (JUNCO, 0.5))).rare
    fields = rare_event_fields(sighting, "station01/mic1/2025/06/01/r1.flac", "http://127.0.0.1:4200/runs/flow-run/x")
    assert fields["event"] == RARE_EVENT == "birdflow.detection.rare"
    assert fields["resource"] == {
        "prefect.resource.id": "birdflow.recording.r1",
        "prefect.resource.name": "r1",
        "birdflow.station": "station01",
        "birdflow.listener": "mic1",
        "birdflow.species": "Junco hyemalis",  # what another station's sighting of it is found by
    }
    assert [related["prefect.resource.role"] for related in fields["related"]] == ["station", "listener"]
    assert fields["payload"] == {
        "scientific_name": "Junco hyemalis",
        "common_name": "Dark-eyed Junco",
        "confidence": 0.92,
        "time": "2025-06-01T05:10:00+00:00",
        "station_id": "station01",
        "listener_id": "mic1",
        "watched": True,
        "archive_key": "station01/mic1/2025/06/01/r1.flac",
        "run_url": "http://127.0.0.1:4200/runs/flow-run/x",
    }


def test_a_maintenance_run_never_makes_a_species_rare_again_in_recordings_dated_years_back(tmp_path):
    record = SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30)
    long_ago = datetime(2022, 5, 1, 5, 0, tzinfo=timezone.utc)
    assert [s.common_name for s in record.tally(heard("card1", long_ago, (JUNCO, 0.9), listener="mic1")).rare] == [
        "Dark-eyed Junco"
    ]
    # maintenance today, years after the recordings were made
    record.forget(datetime.now(timezone.utc).timestamp(), keep_s=14 * 86400)
    again = record.tally(heard("card2", long_ago + timedelta(minutes=1), (JUNCO, 0.8), listener="mic2"))
    assert again.rare == []  # heard a minute earlier in the recordings' time: frequent
    later = record.tally(heard("card3", long_ago + timedelta(days=31), (JUNCO, 0.8), listener="mic2"))
    assert [s.recording_id for s in later.rare] == ["card3"]  # past the window, in the recordings' time
