"""Exports, each read back by a reader someone else wrote: crowsetta (Raven tables, Audacity labels),
python-dwca-reader (the Darwin Core Archive), Python's csv (the CSV and eBird's record format)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import crowsetta
import pytest
from dwca.read import DwCAReader

from birdflow.core.exports import ExportError, Place, export
from birdflow.core.sinks import ParquetSink
from tests.builders import HAWK, ROBIN, two_listeners_detections

PLACE = Place("station01", 45.5231, -122.6765)


def test_raven_tables_read_back_by_crowsetta_to_the_same_selections(tmp_path):
    table = two_listeners_detections()
    written = export(table, "raven", tmp_path / "raven", PLACE)
    assert len(written) == 3 and all(path.name.endswith(".BirdNET.selection.table.txt") for path in written)
    for path in written:
        recording_id = path.name.split(".")[0]
        expected = sorted(
            (row for row in table.to_pylist() if row["recording_id"] == recording_id), key=lambda row: row["start_s"]
        )
        raven = crowsetta.formats.bbox.Raven.from_file(path, annot_col="Common Name")
        boxes = raven.to_bbox()
        assert [(box.onset, box.offset, box.label) for box in boxes] == [
            (row["start_s"], row["end_s"], row["common_name"]) for row in expected
        ]
        assert all((box.low_freq, box.high_freq) == (0, 15000) for box in boxes)


def test_audacity_labels_read_back_by_crowsetta_to_the_same_times(tmp_path):
    table = two_listeners_detections()
    written = export(table, "audacity", tmp_path / "labels", PLACE)
    assert len(written) == 3
    first = min(written)
    labels = crowsetta.formats.seq.AudSeq.from_file(first)
    rows = sorted(
        (row for row in table.to_pylist() if first.name.startswith(row["recording_id"])), key=lambda r: r["start_s"]
    )
    assert list(labels.start_times) == pytest.approx([row["start_s"] for row in rows])
    assert list(labels.end_times) == pytest.approx([row["end_s"] for row in rows])
    assert list(labels.labels) == [f"{row['common_name']} ({row['confidence']:.2f})" for row in rows]


def test_csv_holds_every_detection_and_column(tmp_path):
    table = two_listeners_detections()
    [path] = export(table, "csv", tmp_path / "csv", PLACE)
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == table.num_rows and list(rows[0]) == table.column_names
    assert rows[0]["time"] == "2025-06-01T05:30:00Z" and {row["common_name"] for row in rows} == {ROBIN[1], HAWK[1]}


def test_ebird_records_are_one_per_listener_hour_and_species(tmp_path):
    [path] = export(two_listeners_detections(), "ebird", tmp_path / "ebird", PLACE)
    with open(path, newline="") as file:
        records = list(csv.reader(file))
    assert all(len(record) == 19 for record in records)  # eBird's record format (extended)
    # mic1 05:00 robin (2) and hawk, mic2 05:00 hawk, mic1 06:00 robin
    assert len(records) == 4
    robin = next(record for record in records if record[0] == ROBIN[1] and record[9] == "05:00")
    assert robin[1:4] == ["Turdus", "migratorius", "X"] and "2 detection(s), best confidence 0.91" in robin[4]
    assert robin[5] == "station01 mic1" and robin[6:9] == ["45.523100", "-122.676500", "06/01/2025"]
    assert robin[12:16] == ["Stationary", "1", "60", "N"]


def test_a_darwin_core_archive_opens_in_dwca_reader_with_every_occurrence(tmp_path):
    table = two_listeners_detections()
    [archive] = export(table, "dwc", tmp_path / "out", PLACE)
    assert archive == tmp_path / "out" / "station01-dwca.zip"
    term = "http://rs.tdwg.org/dwc/terms/"
    with DwCAReader(archive) as dwca:
        rows = list(dwca)
    assert len(rows) == table.num_rows and len({row.id for row in rows}) == table.num_rows
    assert {row.data[term + "basisOfRecord"] for row in rows} == {"MachineObservation"}
    assert {row.data[term + "scientificName"] for row in rows} == {ROBIN[0], HAWK[0]}
    assert {(row.data[term + "decimalLatitude"], row.data[term + "decimalLongitude"]) for row in rows} == {
        ("45.5231", "-122.6765")
    }
    first = min(rows, key=lambda row: row.data[term + "eventDate"])
    assert first.data[term + "eventDate"] == "2025-06-01T05:30:00Z/2025-06-01T05:30:03Z"


def test_an_export_that_cannot_be_made_says_why_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="latitude and longitude"):
        export(two_listeners_detections(), "dwc", tmp_path / "a.zip", Place("station01"))
    with pytest.raises(ExportError, match="unknown export format 'kml'"):
        export(two_listeners_detections(), "kml", tmp_path / "x", PLACE)
    with pytest.raises(ExportError, match="into a folder"):
        export(two_listeners_detections(), "raven", tmp_path / "tables.txt", PLACE)
    assert list(tmp_path.iterdir()) == []


def test_birdflow_export_writes_the_stations_detections(tmp_path):
    station = tmp_path / "station"
    station.mkdir()
    (station / "settings.yaml").write_text("station_id: station01\nlatitude: 45.5231\nlongitude: -122.6765\n")
    data = station / "data"
    ParquetSink(data / "detections", data / "species_hourly", data / "listener_health", data / "reviews").write(
        two_listeners_detections()
    )
    birdflow = [str(Path(sys.executable).parent / "birdflow")]
    result = subprocess.run(
        [*birdflow, "export", "--format", "dwc", "--output", "occurrences.zip", "--listener", "mic1"],
        cwd=station,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "4 detection(s) exported as dwc: 1 file(s), occurrences.zip" in result.stdout
    with DwCAReader(station / "occurrences.zip") as dwca:
        assert len(list(dwca)) == 4
    refused = subprocess.run(
        [*birdflow, "export", "--format", "raven", "--output", "tables.txt"],
        cwd=station,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "raven files go into a folder" in refused.stderr
