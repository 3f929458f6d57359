"""Exports, each read back by a reader someone else wrote (crowsetta: Raven tables and Audacity labels;
python-dwca-reader: the Darwin Core Archive; Python's csv) and checked against the other system's own rules: eBird's
19 columns in local time with the effort recorded, the Darwin Core text guide's schema and term list, Raven's
Begin Path opening the audio."""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import crowsetta
import numpy as np
import pyarrow as pa
import pytest
import soundfile
import xmlschema
from dwca.read import DwCAReader

from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table
from birdflow.core.exports import CSV_COLUMNS, Evidence, ExportError, Place, Publishing, export
from birdflow.core.ledger import ProcessedLedger, RecordedSpan
from birdflow.core.reviews import ReviewStore, Verdict, detection_ids, id_of
from birdflow.core.sinks import ParquetSink
from tests.builders import HAWK, ROBIN, recording_info, two_listeners_detections

PLACE = Place("station01", 45.5231, -122.6765, "America/Los_Angeles", "US", "OR")
ITHACA = Place("station01", 42.45, -76.47, "America/New_York", "US", "NY")
DARWIN_CORE = Path(__file__).parent / "darwin_core"
DWC, DCTERMS = "http://rs.tdwg.org/dwc/terms/", "http://purl.org/dc/terms/"
MODEL = "BirdNET_GLOBAL_6K_V2.4"
SISKIN = ("Spinus pinus", "Pine Siskin")
GOLDFINCH = ("Spinus tristis", "American Goldfinch")
# BirdNET 2.4 labels that are no bird: sounds (no taxon at all) and another animal
ENGINE, HUMAN_VOCAL, BULLFROG = (
    ("Engine", "Engine"),
    ("Human vocal", "Human vocal"),
    ("Lithobates catesbeianus", "American Bullfrog"),
)


def one_recording(start: datetime, detections: list[Detection], listener: str = "mic1", content: str = "ab"):
    return detections_table(
        recording_info(listener, start_time=start, content_hash=content * 32), detections, MODEL, "a1"
    )


def verdicts_of(tmp_path, table, given: dict[int, Verdict]) -> dict:
    """Verdicts (row number -> Verdict) stored as the station stores them, read back as the exports get them."""
    store = ReviewStore(tmp_path / "reviews.sqlite")
    rows = table.to_pylist()
    for number, verdict in given.items():
        store.record(rows[number], verdict)
    return {row["detection_id"]: row for row in store.table().to_pylist()}


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file, delimiter="\t"))


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


def test_a_raven_tables_begin_path_opens_the_archived_flac_at_the_selections_offset(tmp_path):
    table = two_listeners_detections()
    recording_id = table.column("recording_id")[0].as_py()
    flac = tmp_path / "archive" / f"{recording_id}.flac"
    flac.parent.mkdir()
    soundfile.write(flac, np.zeros(48000 * 10, dtype=np.int16), 48000, format="FLAC")
    evidence = Evidence(audio_paths={recording_id: str(flac)})
    [first, *_] = export(table, "raven", tmp_path / "raven", PLACE, evidence)
    rows = read_tsv(first)
    # BirdNET-Analyzer's columns, in its order, come first
    assert list(rows[0])[:12] == [
        *("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)"),
        *("Common Name", "Species Code", "Confidence", "Begin Path", "File Offset (s)"),
    ]
    assert [row["File Offset (s)"] for row in rows] == ["0.000", "3.000", "6.000"]
    for row in rows:
        info = soundfile.info(row["Begin Path"])  # what Raven opens
        assert info.format == "FLAC" and float(row["File Offset (s)"]) + 3 <= info.duration
        assert row["Begin File"] == flac.name and row["Detection ID"] in detection_ids(table)
    assert rows[0]["Species Code"] == f"{ROBIN[0]}_{ROBIN[1]}" and rows[0]["Confidence"] == "0.9100"


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


def test_the_csv_holds_every_detection_its_id_and_verdict_and_the_same_header_on_an_empty_day(tmp_path):
    table = two_listeners_detections()
    verdicts = verdicts_of(tmp_path, table, {0: Verdict("relabelled", "ada", "cli", *SISKIN)})
    [path] = export(table, "csv", tmp_path / "csv", PLACE, Evidence(verdicts=verdicts))
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == table.num_rows and list(rows[0]) == CSV_COLUMNS
    assert rows[0]["time"] == "2025-06-01T05:30:00Z" and {row["common_name"] for row in rows} == {ROBIN[1], HAWK[1]}
    assert {row["detection_id"] for row in rows} == set(detection_ids(table))
    relabelled = next(row for row in rows if row["verdict"])
    assert relabelled["scientific_name"] == ROBIN[0]  # the model's label stays; the verdict sits beside it
    assert (relabelled["verdict"], relabelled["reviewed_common_name"], relabelled["reviewer"]) == (
        "relabelled",
        SISKIN[1],
        "ada",
    )
    [empty] = export(table.slice(0, 0), "csv", tmp_path / "empty", PLACE)
    assert empty.read_text().splitlines() == [",".join(CSV_COLUMNS)]


def test_ebird_records_are_in_local_time_across_the_date_line_with_the_effort_recorded(tmp_path):
    # 02:30Z on June 2nd is 22:30 on June 1st in Ithaca (EDT); two 20 s recordings and a 50 s one that hour
    evening = datetime(2025, 6, 2, 2, 30, tzinfo=timezone.utc)
    table = pa.concat_tables(
        [
            one_recording(evening, [Detection(0.0, 3.0, *ROBIN, 0.91)], content="a1"),
            one_recording(evening + timedelta(minutes=5), [Detection(3.0, 6.0, *ROBIN, 0.8)], content="a2"),
            one_recording(evening + timedelta(minutes=20), [Detection(0.0, 3.0, *HAWK, 0.76)], content="a3"),
        ]
    )
    ledger = ProcessedLedger(tmp_path / "processed.sqlite")
    lengths = (20.0, 20.0, 50.0)
    for row, length in zip(table.to_pylist(), lengths):
        start = row["time"] - timedelta(seconds=row["start_s"])
        ledger.record(row["recording_id"], "a1", 1, RecordedSpan("mic1", start, length))
    recorded = ledger.recorded_spans(evening - timedelta(hours=1), evening + timedelta(hours=1))
    [path] = export(table, "ebird", tmp_path / "ebird", ITHACA, Evidence(recorded=recorded))
    with open(path, newline="") as file:
        records = list(csv.reader(file))
    assert len(records) == 2 and all(len(record) == 19 for record in records)  # eBird Record Format (Extended)
    robin = next(record for record in records if record[0] == ROBIN[1])
    assert robin[1:4] == ["Turdus", "migratorius", "X"] and robin[4].startswith("BirdNET: 2 detection(s)")
    assert robin[5:10] == ["station01 mic1", "42.450000", "-76.470000", "06/01/2025", "22:30"]
    assert robin[10:16] == ["NY", "US", "Stationary", "1", str(round(sum(lengths) / 60 + 0.5)), "N"]


def test_ebird_hours_are_local_clock_hours_in_a_half_hour_zone(tmp_path):
    # Kolkata is UTC+5:30: 05:20Z and 05:40Z fall in the local hours 10:00 and 11:00
    place = Place("station01", 22.57, 88.36, "Asia/Kolkata", "IN", "WB")
    start = datetime(2025, 6, 1, 5, 20, tzinfo=timezone.utc)
    table = pa.concat_tables(
        [
            one_recording(start, [Detection(0.0, 3.0, *ROBIN, 0.9)], content="b1"),
            one_recording(start + timedelta(minutes=20), [Detection(0.0, 3.0, *ROBIN, 0.9)], content="b2"),
        ]
    )
    [path] = export(table, "ebird", tmp_path / "ebird", place)
    with open(path, newline="") as file:
        assert [(record[8], record[9]) for record in csv.reader(file)] == [
            ("06/01/2025", "10:50"),
            ("06/01/2025", "11:10"),
        ]


def test_ebird_takes_birds_only_and_reviewed_or_confident_detections(tmp_path):
    table = one_recording(
        datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc),
        [
            Detection(0.0, 3.0, *ENGINE, 0.99),
            Detection(0.0, 3.0, *HUMAN_VOCAL, 0.95),
            Detection(3.0, 6.0, *BULLFROG, 0.9),
            Detection(6.0, 9.0, *ROBIN, 0.5),  # below 0.75, confirmed by a person
            Detection(9.0, 12.0, *HAWK, 0.6),  # below 0.75, not reviewed
            Detection(12.0, 15.0, *SISKIN, 0.97),  # rejected
        ],
    )
    verdicts = verdicts_of(tmp_path, table, {3: Verdict("confirmed", "ada", "ui"), 5: Verdict("rejected", "ada", "ui")})
    [path] = export(table, "ebird", tmp_path / "ebird", ITHACA, Evidence(verdicts=verdicts))
    with open(path, newline="") as file:
        records = list(csv.reader(file))
    assert [record[0] for record in records] == [ROBIN[1]] and "confirmed by ada" in records[0][4]
    lowered = Publishing(ebird_min_confidence=0.55)
    [path] = export(table, "ebird", tmp_path / "lower", ITHACA, Evidence(verdicts=verdicts), lowered)
    assert sorted(line.split(",")[0] for line in path.read_text().splitlines()) == sorted([HAWK[1], ROBIN[1]])


@pytest.mark.parametrize(
    "place, words",
    [
        (Place("station01", None, None, "America/New_York", "US"), "latitude and longitude"),
        (Place("station01", 42.45, -76.47, None, "US"), "set timezone"),
        (Place("station01", 42.45, -76.47, "America/New_York"), "country_code"),
    ],
)
def test_ebird_records_without_a_place_eBird_can_put_them_are_refused(tmp_path, place, words):
    with pytest.raises(ExportError, match=words):
        export(two_listeners_detections(), "ebird", tmp_path / "ebird", place)
    assert not (tmp_path / "ebird").exists()


def test_a_relabelled_record_tells_the_truth_and_keeps_its_id(tmp_path):
    start = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    # the model heard a Pine Siskin (0.7069) and, in another window, a goldfinch beside a siskin
    table = one_recording(
        start,
        [Detection(0.0, 3.0, *SISKIN, 0.7069), Detection(3.0, 6.0, *SISKIN, 0.8), Detection(3.0, 6.0, *GOLDFINCH, 0.3)],
    )
    before = export(table, "dwc", tmp_path / "before.zip", ITHACA)[0]
    relabel = Verdict("relabelled", "ada", "ui", *GOLDFINCH)
    verdicts = verdicts_of(tmp_path, table, {0: relabel, 1: relabel})
    after = export(table, "dwc", tmp_path / "after.zip", ITHACA, Evidence(verdicts=verdicts))[0]
    with DwCAReader(before) as dwca:
        ids_before = {row.id for row in dwca}
    with DwCAReader(after) as dwca:
        rows = {row.data[DWC + "eventDate"].split("/")[0] + row.data[DWC + "identifiedBy"]: row for row in dwca}
        ids_after = {row.id for row in rows.values()}
    assert ids_before == ids_after  # a relabel is no new record for GBIF
    relabelled = [row for row in rows.values() if row.data[DWC + "identifiedBy"] == "ada"]
    assert {row.data[DWC + "scientificName"] for row in relabelled} == {GOLDFINCH[0]}
    assert {row.data[DWC + "identificationVerificationStatus"] for row in relabelled} == {"verified by reviewer"}
    assert all("relabelled by ada from Pine Siskin" in row.data[DWC + "identificationRemarks"] for row in relabelled)
    # in eBird and Raven: no score for a species the model did not give, the model's own where it did
    [tables] = export(table, "raven", tmp_path / "raven", ITHACA, Evidence(verdicts=verdicts))
    scores = [(row["Common Name"], row["Confidence"]) for row in read_tsv(tables)]
    assert scores == [(GOLDFINCH[1], ""), (GOLDFINCH[1], "0.3000"), (GOLDFINCH[1], "0.3000")]
    [ebird] = export(table, "ebird", tmp_path / "ebird", ITHACA, Evidence(verdicts=verdicts))
    text = ebird.read_text()  # the siskin's score is named as the siskin's, never as the goldfinch's
    assert "best confidence 0.30" in text and "best confidence 0.7" not in text and "from Pine Siskin" in text


def test_a_darwin_core_archive_passes_the_text_guides_schema_and_term_list_and_opens_in_dwca_reader(tmp_path):
    start = datetime(2025, 6, 1, 5, 30, tzinfo=timezone.utc)
    table = one_recording(
        start,
        [
            Detection(0.0, 3.0, *ROBIN, 0.91),
            Detection(3.0, 6.0, *HUMAN_VOCAL, 0.9),
            Detection(6.0, 9.0, *BULLFROG, 0.8),
            Detection(9.0, 12.0, *HAWK, 0.7),
        ],
    )
    clip_key = "clips/station01/Turdus_migratorius/x"
    table = table.set_column(
        table.schema.get_field_index("clip_key"), "clip_key", pa.array([clip_key, None, None, None], pa.string())
    )
    link = "https://pi.example.org/clips/station01/Turdus_migratorius/x.flac?expires=1&signature=ab"
    publishing = Publishing('Birds of "the" garden', "CC0-1.0", "Ada Lovelace\tLab", "Ada Lovelace", "ada@example.org")
    verdicts = verdicts_of(tmp_path, table, {3: Verdict("rejected", "bo", "ui")})
    [archive] = export(
        table, "dwc", tmp_path / "out", ITHACA, Evidence(verdicts=verdicts, clip_links={clip_key: link}), publishing
    )
    assert archive == tmp_path / "out" / "station01-dwca.zip"
    with zipfile.ZipFile(archive) as zipped:
        meta = zipped.read("meta.xml").decode()
    xmlschema.XMLSchema(DARWIN_CORE / "tdwg_dwc_text.xsd").validate(meta)
    known = (DARWIN_CORE / "dwc_occurrence_core_terms.txt").read_text().split()
    dublin_core = set(known[:8])
    with DwCAReader(archive) as dwca:
        terms = dwca.descriptor.core.terms
        rows = list(dwca)
        metadata = dwca.metadata
    for term in terms:
        namespace, name = term.rsplit("/", 1)
        assert name in known and namespace + "/" == (DCTERMS if name in dublin_core else DWC), term
    # the robin only: neither the human voice (no taxon), the frog (no bird) nor the rejected hawk
    assert [row.data[DWC + "scientificName"] for row in rows] == [ROBIN[0]]
    robin = next(row for row in rows if row.data[DWC + "scientificName"] == ROBIN[0])
    values = {term.rsplit("/", 1)[-1]: value for term, value in robin.data.items()}
    assert (
        values.items()
        >= {
            "basisOfRecord": "MachineObservation",
            "countryCode": "US",
            "coordinateUncertaintyInMeters": "100",
            "kingdom": "Animalia",
            "class": "Aves",
            "taxonRank": "species",
            "license": "http://creativecommons.org/publicdomain/zero/1.0/legalcode",
            "rightsHolder": "Ada Lovelace Lab",  # a tab would break the unquoted file: made a space
            "associatedMedia": link,
            "identifiedBy": MODEL,
            "identificationVerificationStatus": "unverified",
        }.items()
    )
    assert metadata.find("dataset/title").text == 'Birds of "the" garden'
    assert metadata.find("dataset/contact/electronicMailAddress").text == "ada@example.org"
    assert metadata.find("dataset/intellectualRights/para/ulink").get("url").endswith("zero/1.0/legalcode")


def test_an_export_that_cannot_be_made_says_why_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="latitude and longitude"):
        export(two_listeners_detections(), "dwc", tmp_path / "a.zip", Place("station01"))
    with pytest.raises(ExportError, match="unknown export format 'kml'"):
        export(two_listeners_detections(), "kml", tmp_path / "x", PLACE)
    with pytest.raises(ExportError, match="into a folder"):
        export(two_listeners_detections(), "raven", tmp_path / "tables.txt", PLACE)
    assert list(tmp_path.iterdir()) == []


def test_an_export_replaces_a_link_planted_in_its_folder_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "detections.csv").symlink_to(outside)
    with pytest.raises(ExportError, match="is a link"):
        export(two_listeners_detections(), "csv", folder, PLACE)
    assert outside.read_text() == "keep"


def test_birdflow_export_finds_the_time_zone_the_ledger_the_verdicts_and_the_archived_audio(tmp_path):
    station = tmp_path / "station"
    station.mkdir()
    (station / "settings.yaml").write_text(
        "station_id: station01\nlatitude: 42.45\nlongitude: -76.47\ncountry_code: us\nstate_code: US-NY\n"
    )
    data = station / "data"
    table = two_listeners_detections()
    ParquetSink(data / "detections", data / "species_hourly", data / "listener_health", data / "reviews").write(table)
    rows = table.to_pylist()
    ReviewStore(data / "state" / "reviews.sqlite").record(rows[2], Verdict("rejected", "ada", "cli"))
    ledger = ProcessedLedger(data / "state" / "processed.sqlite")
    ledger.record(rows[0]["recording_id"], "a1", 3, RecordedSpan("mic1", rows[0]["time"], 600.0))
    day = data / "archive" / "station01" / "mic1" / "2025" / "06" / "01"
    day.mkdir(parents=True)
    soundfile.write(day / f"{rows[0]['recording_id']}.flac", np.zeros(4800, np.int16), 48000, format="FLAC")
    birdflow = [str(Path(sys.executable).parent / "birdflow")]

    def run(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*birdflow, "export", *arguments], cwd=station, capture_output=True, text=True, timeout=120
        )

    result = run("--format", "ebird", "--output", "ebird", "--listener", "mic1")
    assert result.returncode == 0, result.stderr
    with open(station / "ebird" / "ebird.csv", newline="") as file:
        records = list(csv.reader(file))
    # 05:30Z is 01:30 in Ithaca (time zone from the coordinates); the 600 s recording is 10 minutes of effort
    first = next(record for record in records if record[0] == ROBIN[1] and record[9] == "01:30")
    assert first[8:15] == ["06/01/2025", "01:30", "NY", "US", "Stationary", "1", "10"]
    assert HAWK[1] not in {record[0] for record in records}  # 0.40, and rejected
    assert run("--format", "raven", "--output", "raven").returncode == 0
    [table_file] = (station / "raven").glob(f"{rows[0]['recording_id']}.*")
    begin_paths = {row["Begin Path"] for row in read_tsv(table_file)}
    assert begin_paths == {str((day / f"{rows[0]['recording_id']}.flac").resolve())}
    assert {row["Verdict"] for row in read_tsv(table_file)} == {"", "rejected"}
    result = run("--format", "dwc", "--output", "occurrences.zip", "--listener", "mic1")
    assert result.returncode == 0 and "4 detection(s) exported as dwc" in result.stdout
    with DwCAReader(station / "occurrences.zip") as dwca:
        assert len(list(dwca)) == 3  # the rejected hawk is no occurrence
    refused = run("--format", "raven", "--output", "tables.txt")
    assert refused.returncode == 1 and "raven files go into a folder" in refused.stderr
    assert id_of(rows[0]) in (station / "raven" / table_file.name).read_text()
