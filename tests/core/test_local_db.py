"""State files upgraded in place: a station's SQLite files carry their schema version, and a file made by an older
birdflow (before versions were kept, too) opens with its rows and the columns the code now expects."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing

import pytest

from birdflow.core.central_link import CentralLink
from birdflow.core.clips import ClipIndex
from birdflow.core.errors import StateFileError
from birdflow.core.ledger import MIGRATIONS, ProcessedLedger
from birdflow.core.listener_tokens import ListenerTokens
from birdflow.core.local_db import LocalDatabase
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
