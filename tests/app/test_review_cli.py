"""`birdflow review` on a station's local tables: ids listed, verdicts given by id and from a CSV (all or none),
what they change in the reviews table, the `reviewed` SQL view, `review stats` and `export --reviewed-only`."""

from __future__ import annotations

import csv
import json

import pytest

from birdflow.app.cli import main
from birdflow.core.reviews import ReviewStore, detection_ids
from birdflow.core.sinks import ParquetSink
from birdflow.settings import Settings
from birdflow_tools.testbed import free_port
from tests.builders import HAWK, ROBIN, two_listeners_detections


@pytest.fixture
def station(tmp_path, monkeypatch):
    data = tmp_path / "data"
    settings = Settings(station_id="station01", data_dir=data)
    table = two_listeners_detections()
    sink = ParquetSink.in_folders(settings.table_folders)
    for recording_id in sorted(set(table.column("recording_id").to_pylist())):
        sink.write(table.filter([value == recording_id for value in table.column("recording_id").to_pylist()]))
    settings_file = tmp_path / "settings.yaml"
    # its own Prefect API, which is not running (not one this test process may know from the environment)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings_file.write_text(
        f"station_id: station01\ndata_dir: {data}\nlatitude: 45.5\nlongitude: -122.6\nprefect_port: {free_port()}\n"
    )
    return settings, ["--settings", str(settings_file)], table


def listed(capsys, options, *more) -> list[dict]:
    assert main([*options, "review", "list", "--format", "json", *more]) == 0
    return json.loads(capsys.readouterr().out)


def test_verdicts_by_id_change_the_reviews_table_and_what_waits(station, capsys):
    settings, options, table = station
    ids = detection_ids(table)
    rows = table.to_pylist()
    assert listed(capsys, options) == []  # nothing asked for yet
    everything = listed(capsys, options, "--all")
    assert [row["id"] for row in everything] == [ids[rows.index(row)] for row in table.sort_by("time").to_pylist()]
    ReviewStore(settings.reviews_file).request([(rows[0], "rare"), (rows[2], "sample")])
    assert [(row["id"], row["asked as"]) for row in listed(capsys, options)] == [(ids[0], "rare"), (ids[2], "sample")]
    wide = listed(capsys, options, "--wide")  # where to hear it: the recording and the offset in it
    assert [(row["recording"], row["offset (s)"], row["scientific"]) for row in wide] == [
        (rows[number]["recording_id"], rows[number]["start_s"], rows[number]["scientific_name"]) for number in (0, 2)
    ]

    assert main([*options, "review", "confirm", ids[0], "--by", "ada"]) == 0
    assert main([*options, "review", "relabel", ids[2], "--to", "pine siskin", "--by", "bo"]) == 0
    assert main([*options, "review", "reject", ids[1]]) == 0  # not asked for: found among the detections
    said = capsys.readouterr().out.splitlines()
    # no Prefect server here: the verdicts count, the review runs (if any) wait for the next maintenance run
    waits = [line for line in said if line.startswith("the verdicts are stored; the review runs waiting")]
    assert len(waits) == 3 and "does not answer" in waits[0]
    assert [line for line in said if line not in waits] == [
        f"{ids[0]}: confirmed",
        f"{ids[2]}: relabelled as Pine Siskin",
        f"{ids[1]}: rejected",
    ]
    assert listed(capsys, options) == []
    assert len(listed(capsys, options, "--all")) == table.num_rows - 3
    with pytest.raises(SystemExit, match="no detection with id 0123456789ab"):
        main([*options, "review", "confirm", ids[3], "0123456789ab"])
    with pytest.raises(SystemExit, match="'Pine Siskn' is no species of the model"):
        main([*options, "review", "relabel", ids[3], "--to", "Pine Siskn"])
    assert ReviewStore(settings.reviews_file).verdict_given(ids[3]) is None  # an unknown id takes no verdict at all

    assert main([*options, "sql", "--format", "json", "SELECT * FROM reviews ORDER BY reviewer"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert [(row["detection_id"], row["verdict"], row["reviewer"], row["via"]) for row in stored] == [
        (ids[0], "confirmed", "ada", "cli"),
        (ids[2], "relabelled", "bo", "cli"),
        (ids[1], "rejected", stored[2]["reviewer"], "cli"),
    ]
    assert stored[1]["common_name"] == HAWK[1] and stored[1]["reviewed_common_name"] == "Pine Siskin"
    truth = "SELECT reviewed_common_name, count(*) AS n FROM reviewed WHERE verdict IN ('confirmed', 'relabelled') "
    assert main([*options, "sql", "--format", "json", truth + "GROUP BY 1 ORDER BY 1"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"reviewed_common_name": ROBIN[1], "n": 1},
        {"reviewed_common_name": "Pine Siskin", "n": 1},
    ]
    assert main([*options, "sql", "--format", "json", "SELECT count(*) AS n FROM reviewed"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": table.num_rows}]  # every detection, reviewed or not


def test_a_csv_of_verdicts_is_taken_whole_or_not_at_all(station, capsys, tmp_path):
    settings, options, table = station
    ids = detection_ids(table)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,verdict,species\n{ids[0]},confirm,\n{ids[1]},relabel,Robin Hood\n")
    with pytest.raises(SystemExit, match="line 3: 'Robin Hood' is no species of the model"):
        main([*options, "review", "import", str(bad)])
    assert ReviewStore(settings.reviews_file).table().num_rows == 0
    good = tmp_path / "verdicts.csv"
    with good.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "verdict", "species", "reviewer"])
        writer.writerows([[ids[0], "confirm", "", "cy"], [ids[1], "reject", "", ""], [ids[2], "relabel", ROBIN[0], ""]])
    assert main([*options, "review", "import", str(good), "--by", "dee"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"3 verdict(s) taken from {good}"
    reviews = ReviewStore(settings.reviews_file).table()
    assert sorted(zip(reviews.column("reviewer").to_pylist(), reviews.column("via").to_pylist())) == [
        ("cy", "csv"),
        ("dee", "csv"),
        ("dee", "csv"),
    ]

    assert main([*options, "review", "stats", "--format", "json", "--min-reviews", "1"]) == 0
    stats = {row["species"]: row for row in json.loads(capsys.readouterr().out)}
    assert stats[ROBIN[1]] == {
        "species": ROBIN[1],
        "reviewed": 2,
        "confirmed": 1,
        "rejected": 1,
        "relabelled": 0,
        "wrong_share": 0.5,
        "suggested_min_confidence": 0.91,
    }
    assert (stats[HAWK[1]]["relabelled"], stats[HAWK[1]]["suggested_min_confidence"]) == (1, None)

    out = tmp_path / "out"
    assert main([*options, "export", "--format", "csv", "--output", str(out), "--reviewed-only"]) == 0
    assert capsys.readouterr().out.startswith("2 detection(s) exported as csv")
    [exported] = list(out.glob("*.csv"))
    with exported.open() as handle:
        exported_rows = list(csv.DictReader(handle))
    # the confirmed robin, and the hawk that was a robin: the model's label and the verdict side by side
    assert sorted((row["common_name"], row["verdict"], row["reviewed_common_name"]) for row in exported_rows) == [
        (ROBIN[1], "confirmed", ROBIN[1]),
        (HAWK[1], "relabelled", ROBIN[1]),
    ]
