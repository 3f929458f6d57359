"""State files upgraded in place: a station's SQLite files carry their schema version, and a file made by an older
birdflow (before versions were kept, too) opens with its rows and the columns the code now expects."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from contextlib import closing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from birdflow.core.central_link import CentralLink
from birdflow.core.clips import ClipIndex
from birdflow.core.errors import StateFileDamaged, StateFileError
from birdflow.core.ledger import MIGRATIONS, ProcessedLedger
from birdflow.core.listener_tokens import ListenerTokens
from birdflow.core.local_db import DAMAGED_MARK, LocalDatabase, is_sound, moved_aside_if_damaged
from birdflow.core.outbox import Outbox
from birdflow.core.rarity import SpeciesRecord
from birdflow.core.results import ResultsDatabase
from birdflow.core.reviews import ReviewStore

# the record of processed recordings as birdflow wrote it before it counted detections, without a version
PREVIOUS_LEDGER = """
CREATE TABLE processed (recording_id TEXT NOT NULL, analysis_id TEXT NOT NULL,
    processed_at INTEGER NOT NULL, PRIMARY KEY (recording_id, analysis_id)) WITHOUT ROWID;
CREATE TABLE backfill_files (location TEXT PRIMARY KEY, size INTEGER NOT NULL,
    modified REAL NOT NULL, recording_id TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO processed VALUES ('r-old', 'a1', 1700000000);
INSERT INTO backfill_files VALUES ('s3://archive/x.wav', 480044, 1700000000.5, 'r-old');
"""


def file_made_by(path, script: str) -> None:
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(script)


def user_version(path) -> int:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA user_version").fetchone()[0]


def test_a_ledger_of_the_previous_schema_opens_with_its_rows(tmp_path):
    path = tmp_path / "processed.sqlite"
    file_made_by(path, PREVIOUS_LEDGER)
    assert user_version(path) == 0
    ledger = ProcessedLedger(path)
    assert ledger.contains("r-old", "a1")
    assert ledger.detections("r-old") == 1  # unknown for a row recorded before detections were counted
    assert ledger.recording_of_file("s3://archive/x.wav", 480044, 1700000000.5) == "r-old"
    ledger.record("r-new", "a1", detections=4)
    assert ledger.detections("r-new") == 4
    assert user_version(path) == len(MIGRATIONS)
    assert ProcessedLedger(path).detections("r-new") == 4  # reopened: nothing to migrate, nothing lost


def test_an_unversioned_file_that_already_had_the_change_is_accepted(tmp_path):
    path = tmp_path / "processed.sqlite"
    file_made_by(
        path,
        PREVIOUS_LEDGER.replace(
            "processed_at INTEGER NOT NULL,", "processed_at INTEGER NOT NULL, detections INTEGER,"
        ).replace("1700000000);", "1700000000, 3);"),
    )
    assert ProcessedLedger(path).detections("r-old") == 3
    assert user_version(path) == len(MIGRATIONS)


def test_processes_opening_an_old_file_at_once_migrate_it_once(tmp_path):
    path = tmp_path / "processed.sqlite"
    file_made_by(path, PREVIOUS_LEDGER)
    start, errors = threading.Barrier(8), []

    def open_and_read() -> None:
        start.wait()
        try:
            ProcessedLedger(path).detections("r-old")  # each a connection of its own, as another process has
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and user_version(path) == len(MIGRATIONS)


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "state.sqlite"
    first = "CREATE TABLE IF NOT EXISTS kept (name TEXT PRIMARY KEY);"
    LocalDatabase(path, [first]).execute("INSERT INTO kept VALUES ('a')")
    broken = "CREATE TABLE added (name TEXT);\nINSERT INTO missing_table VALUES (1);"
    with pytest.raises(sqlite3.OperationalError, match="missing_table"):
        LocalDatabase(path, [first, broken]).execute("SELECT 1")
    assert user_version(path) == 1
    with closing(sqlite3.connect(path)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"kept"}


def test_a_file_of_a_newer_birdflow_is_refused_by_name_and_left_alone(tmp_path):
    path = tmp_path / "state.sqlite"
    LocalDatabase(
        path, ["CREATE TABLE IF NOT EXISTS kept (name TEXT);", "ALTER TABLE kept ADD COLUMN n INTEGER;"]
    ).execute("INSERT INTO kept VALUES ('a', 1)")
    with pytest.raises(StateFileError, match=r"state\.sqlite has schema version 2.*knows up to 1"):
        LocalDatabase(path, ["CREATE TABLE IF NOT EXISTS kept (name TEXT);"]).execute("SELECT * FROM kept")
    assert user_version(path) == 2


def test_every_state_file_carries_its_version(tmp_path):
    """Each of a station's SQLite files, made afresh, is at the version its code writes; the relay's link and its
    outbox share a file and one version."""
    opened = {
        "processed": ProcessedLedger(tmp_path / "processed.sqlite").database,
        "species": SpeciesRecord(tmp_path / "species.sqlite", rare_window_days=30).database,
        "reviews": ReviewStore(tmp_path / "reviews.sqlite").database,
        "results": ResultsDatabase(tmp_path / "results.sqlite").database,
        "listeners": ListenerTokens(tmp_path / "listeners.sqlite").database,
        "clips": ClipIndex(tmp_path / "clips.sqlite", per_day=3).database,
        "mqtt_outbox": Outbox(tmp_path / "mqtt_outbox.sqlite").database,
        "central_link": CentralLink(tmp_path / "central_link.sqlite").events.database,
    }
    for name, database in opened.items():
        database.execute("SELECT 1")
        assert user_version(tmp_path / f"{name}.sqlite") == database.version >= 1, name
    link = CentralLink(tmp_path / "central_link.sqlite")
    assert link.database.version == link.events.database.version


PAGE = 4096


def damage(path, page: int) -> None:
    """One page overwritten, as a failing SD card does."""
    with open(path, "r+b") as file:
        file.seek(page * PAGE)
        file.write(bytes([0xA5]) * PAGE)


def ledger_of(path, recordings: int) -> None:
    """A record of `recordings` processed recordings, made by another process (a file this one never opened)."""
    made = path.with_name("made-elsewhere.sqlite")
    ledger = ProcessedLedger(made)
    for number in range(recordings):
        ledger.record(f"mic{number % 7}_20250601T{number % 24:02d}0000Z_{number:06x}", "a1", detections=number % 3)
    ledger.database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copyfile(made, path)


def detections_file(root, recording_id: str, analysis_id: str, rows: int) -> None:
    folder = root / "2025/06/01"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"recording_id": [recording_id] * rows}), folder / f"{recording_id}__{analysis_id}.parquet")


def test_a_damaged_file_is_moved_aside_when_opened_and_rebuilt_from_what_can_be_read_and_the_detections(
    tmp_path, caplog
):
    path, detections = tmp_path / "processed.sqlite", tmp_path / "detections"
    ledger_of(path, 3000)
    pages = path.stat().st_size // PAGE
    damage(path, pages - 2)  # a leaf near the end: the rows before it can still be read
    detections_file(detections, "mic1_20250601T050000Z_beef", "a1", rows=4)
    detections_file(detections, "mic2_20250601T050000Z_cafe", "a1", rows=2)  # its run has not archived it yet:
    (tmp_path / "recordings").mkdir()
    (tmp_path / "recordings" / "mic2_20250601T050000Z_cafe.wav").write_bytes(b"RIFF")  # still in the folder
    assert not is_sound(path)
    with caplog.at_level(logging.ERROR, logger="birdflow.core.local_db"):
        # another process, opening the file for the first time
        rebuilt = ProcessedLedger(path, detections, tmp_path / "recordings")
        assert rebuilt.detections("mic1_20250601T050000Z_beef") == 4  # from its detections file
    assert not rebuilt.contains("mic2_20250601T050000Z_cafe", "a1")
    [kept] = tmp_path.glob(f"processed.sqlite{DAMAGED_MARK}*")
    assert is_sound(path) and not is_sound(kept)
    salvaged = rebuilt.recording_ids() - {"mic1_20250601T050000Z_beef"}
    assert 0 < len(salvaged) < 3000 and rebuilt.contains("mic0_20250601T000000Z_000000", "a1")
    [line] = [record.getMessage() for record in caplog.records]
    assert "processed.sqlite was damaged" in line and kept.name in line and f"{len(salvaged)} rows" in line


def test_a_page_damaged_under_a_running_process_is_met_once_then_the_file_works_for_every_connection(tmp_path):
    path = tmp_path / "processed.sqlite"
    writer = ProcessedLedger(path)
    for number in range(3000):
        writer.record(f"mic1_20250601T000000Z_{number:06x}", "a1")
    writer.database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damage(path, 10)  # a leaf of the record
    reader = ProcessedLedger(path)  # a connection of its own, opened after the file was checked
    with pytest.raises(StateFileDamaged, match=r"processed\.sqlite was damaged: moved aside as processed\.sqlite\.dam"):
        reader.recording_ids()
    assert is_sound(path) and 0 < len(reader.recording_ids()) < 3000  # the retry finds it whole
    writer.record("mic1_20250601T010000Z_after", "a1")  # the first connection, open on the old file, follows
    assert reader.contains("mic1_20250601T010000Z_after", "a1")


def test_a_file_whose_header_is_damaged_is_not_a_database_and_is_moved_aside(tmp_path):
    path = tmp_path / "prefect.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY)")
        connection.commit()
    assert moved_aside_if_damaged(path) is None and path.exists()  # sound: left alone
    damage(path, 0)
    kept = moved_aside_if_damaged(path)
    assert kept is not None and kept.exists() and not path.exists()


def test_a_transaction_that_fails_leaves_nothing_and_one_that_meets_damage_says_so(tmp_path):
    path = tmp_path / "processed.sqlite"
    ledger = ProcessedLedger(path)
    with pytest.raises(RuntimeError), ledger.database.transaction():
        ledger.record("mic1_20250601T000000Z_0000000a", "a1")
        raise RuntimeError("a failure inside")
    assert not ledger.holds("mic1_20250601T000000Z_0000000a")
    for number in range(3000):
        ledger.record(f"mic1_20250601T000000Z_{number:08x}", "a1")
    ledger.database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damage(path, 10)
    reader = ProcessedLedger(path)  # a connection of its own: the damage is met inside its transaction
    with pytest.raises(StateFileDamaged), reader.database.transaction():
        reader.recording_ids()
    with ledger.database.transaction():  # the file whole again, for every connection
        ledger.record("mic1_20250601T010000Z_00000001", "a1")
    assert reader.holds("mic1_20250601T010000Z_00000001")
