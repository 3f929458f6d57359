"""`birdflow sql`: one read-only SELECT over the station's Parquet tables, and one clear line for anything else."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from birdflow.app.cli import main
from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table
from birdflow.core.rarity import SpeciesRecord
from birdflow.core.sinks import ParquetSink, compact_detections
from birdflow.core.sql import SqlError, query, station_tables
from birdflow.core.table_folders import TableFolders
from tests.builders import recording_info

JUNCO = ("Junco hyemalis", "Dark-eyed Junco")
SISKIN = ("Spinus pinus", "Pine Siskin")
DAWN = datetime(2025, 6, 1, 5, 0, tzinfo=timezone.utc)


@pytest.fixture
def station(tmp_path):
    data = tmp_path / "data"
    sink = ParquetSink.in_folders(folders(data))
    record = SpeciesRecord(data / "state" / "species.sqlite", rare_window_days=30)
    for number, (listener, species, confidence) in enumerate(
        [("mic1", JUNCO, 0.5), ("mic2", SISKIN, 0.6), ("mic1", JUNCO, 0.7)]
    ):
        info = recording_info(
            listener_id=listener, recording_id=f"r{number}", start_time=DAWN + timedelta(minutes=number)
        )
        table = detections_table(info, [Detection(0.0, 3.0, *species, confidence)], "BirdNET_GLOBAL_6K_V2.4", "a1")
        sink.write(table)
        record.tally(table)
    for hour, station_id, _version in record.hours_to_write(DAWN.timestamp() + 7200, settle_s=0):
        sink.write_hourly(record.hour_table(hour, station_id))
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(f"station_id: sqltest\ndata_dir: {data}\n")
    return data, sink, settings_file


def folders(data: Path) -> TableFolders:
    return TableFolders(data / "detections", data / "species_hourly", data / "listener_health", data / "reviews")


def tables(data):
    return station_tables(folders(data))


COUNT_BY_SPECIES = "SELECT common_name, count(*) AS n FROM detections GROUP BY 1 ORDER BY 2 DESC"


def test_a_select_over_detections_and_hourly_counts(station):
    data, sink, _ = station
    assert query(COUNT_BY_SPECIES, tables(data)).to_pylist() == [
        {"common_name": "Dark-eyed Junco", "n": 2},
        {"common_name": "Pine Siskin", "n": 1},
    ]
    hourly = query("SELECT listener_id, common_name, detections FROM species_hourly ORDER BY 1, 2", tables(data))
    assert hourly.to_pylist() == [
        {"listener_id": "mic1", "common_name": "Dark-eyed Junco", "detections": 2},
        {"listener_id": "mic2", "common_name": "Pine Siskin", "detections": 1},
    ]
    # after compaction, and after a recording is written again, every row is there once
    compact_detections(data / "detections", settled_s=0)
    info = recording_info(listener_id="mic1", recording_id="r0", start_time=DAWN)
    sink.write(detections_table(info, [Detection(0.0, 3.0, *JUNCO, 0.55)], "BirdNET_GLOBAL_6K_V2.4", "a1"))
    rows = query("SELECT recording_id, confidence FROM detections ORDER BY 1", tables(data)).to_pylist()
    assert rows == [
        {"recording_id": "r0", "confidence": 0.55},
        {"recording_id": "r1", "confidence": 0.6},
        {"recording_id": "r2", "confidence": 0.7},
    ]


def test_an_empty_station_has_empty_tables(tmp_path):
    assert query("SELECT count(*) AS n FROM detections", tables(tmp_path)).to_pylist() == [{"n": 0}]


@pytest.mark.parametrize(
    "statement, says",
    [
        ("DELETE FROM detections", "only SELECT statements"),
        ("COPY (SELECT 1) TO 'x.csv'", "only SELECT statements"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
        ("SELECT * FROM read_parquet('{data}/../elsewhere.parquet')", "Permission Error"),
        ("SET enable_external_access = true", "only SELECT statements"),
        ("SELEC 1", "syntax error"),
        ("SELECT nonsense FROM detections", "nonsense"),
    ],
)
def test_writes_reads_outside_the_tables_and_bad_statements_are_refused_in_one_line(station, statement, says):
    data, _, _ = station
    with pytest.raises(SqlError) as refused:
        query(statement.format(data=data), tables(data))
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_the_command_prints_json_csv_and_one_line_errors(station, capsys):
    _, _, settings_file = station
    assert main(["--settings", str(settings_file), "sql", "--format", "json", COUNT_BY_SPECIES]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {"common_name": "Dark-eyed Junco", "n": 2}
    assert main(["--settings", str(settings_file), "sql", "--format", "csv", COUNT_BY_SPECIES]) == 0
    assert capsys.readouterr().out.splitlines() == ['"common_name","n"', '"Dark-eyed Junco",2', '"Pine Siskin",1']
    with pytest.raises(SystemExit) as failed:
        main(["--settings", str(settings_file), "sql", "DROP TABLE detections"])
    assert str(failed.value) == "birdflow sql: only SELECT statements are run here (this one is DROP)"


def test_detections_wide_fold_no_column_in_an_80_column_terminal(station, capsys, monkeypatch):
    _, _, settings_file = station
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--settings", str(settings_file), "detections", "--wide"]) == 0
    title, header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["time", "(UTC)", "listener", "species", "scientific", "confidence", "recording_id"]
    assert len(rows) == 3 and max(len(line) for line in rows) > 80  # a line a row, however long
    assert any("Pine Siskin" in line and "Spinus pinus" in line for line in rows), rows


def test_a_table_printed_for_people_ends_with_its_row_count(station, capsys, monkeypatch):
    _, _, settings_file = station
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--settings", str(settings_file), "sql", COUNT_BY_SPECIES]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 rows"
    assert main(["--settings", str(settings_file), "sql", "SELECT * FROM detections WHERE confidence > 2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 rows"


def test_influx_without_a_host_is_one_line(station):
    _, _, settings_file = station
    with pytest.raises(SystemExit) as failed:
        main(["--settings", str(settings_file), "sql", "--influx", COUNT_BY_SPECIES])
    assert str(failed.value) == "birdflow sql: --influx needs setting 'influx_host' (and INFLUX_TOKEN)"


def test_read_only_commands_run_with_influx_enabled_and_no_token_while_the_station_refuses_to_start(
    station, capsys, monkeypatch
):
    _, _, settings_file = station
    monkeypatch.setenv("INFLUX_ENABLED", "true")
    monkeypatch.setenv("INFLUX_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("INFLUX_TOKEN", raising=False)
    assert main(["--settings", str(settings_file), "detections"]) == 0
    assert "Pine Siskin" in capsys.readouterr().out
    assert main(["--settings", str(settings_file), "sql", COUNT_BY_SPECIES]) == 0
    with pytest.raises(SystemExit) as failed:
        main(["--settings", str(settings_file), "sql", "--influx", COUNT_BY_SPECIES])
    assert "--influx needs INFLUX_TOKEN" in str(failed.value)
    with pytest.raises(SystemExit) as failed:  # what writes to InfluxDB still refuses, naming the setting
        main(["--settings", str(settings_file), "up"])
    assert "setting 'influx_token' (env INFLUX_TOKEN) is required" in str(failed.value)


def test_detections_fit_an_80_column_terminal(station, capsys, monkeypatch):
    _, _, settings_file = station
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--settings", str(settings_file), "detections"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines)
    assert any("2025-06-01 05:01:00" in line and "Pine Siskin" in line and "0.600" in line for line in lines), lines


def test_lists_bytes_and_times_print_as_json_and_csv(station, capsys):
    _, _, settings_file = station
    statement = (
        "SELECT list(common_name ORDER BY common_name) AS names, '\\xAA\\x01'::BLOB AS raw, "
        "min(time) > TIMESTAMP '2000-01-01' AS recent FROM detections"
    )
    assert main(["--settings", str(settings_file), "sql", "--format", "json", statement]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row == {"names": ["Dark-eyed Junco", "Dark-eyed Junco", "Pine Siskin"], "raw": "aa01", "recent": True}
    assert main(["--settings", str(settings_file), "sql", "--format", "csv", statement]) == 0
    assert capsys.readouterr().out.splitlines() == [
        '"names","raw","recent"',
        '"[""Dark-eyed Junco"", ""Dark-eyed Junco"", ""Pine Siskin""]","aa01",true',
    ]


def test_duckdb_spills_into_a_private_folder_of_its_own_that_goes_with_the_query(station, tmp_path, monkeypatch):
    data, _, _ = station
    monkeypatch.chdir(tmp_path)
    [folder] = query("SELECT current_setting('temp_directory') AS folder", tables(data)).column("folder").to_pylist()
    assert Path(folder).name.startswith("birdflow-sql-") and not Path(folder).exists()
    assert not (tmp_path / ".tmp").exists()


def test_a_table_wider_than_the_terminal_is_printed_a_row_at_a_time(station, capsys, monkeypatch):
    _, _, settings_file = station
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--settings", str(settings_file), "sql", "SELECT * FROM detections ORDER BY time"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("-[ row ") for line in lines) == 3
    assert max(len(line) for line in lines) <= 80 and lines[-1] == "3 rows"
    assert any(line.split() == ["common_name", "Dark-eyed", "Junco"] for line in lines)
    assert main(["--settings", str(settings_file), "sql", "--wide", "SELECT * FROM detections"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[:4]
    assert header.split()[:3] == ["time", "station_id", "listener_id"] and max(len(line) for line in rows) > 80
