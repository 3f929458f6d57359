"""The record of processed recordings: "was this recording already analysed with these parameters and
archived?" answered without its flow run, which run retention deletes after `run_retention_days`.

It is what keeps a re-sent recording from being processed twice and what a backfill skips by. One row
per recording and analysis (~60 bytes) in one SQLite file, with how many detections it had (what the disk
floor, when allowed to, deletes first is audio without any) and which listener recorded it when and how long (the
effort an eBird checklist states).
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from birdflow.core.budget import SHRINK_TO, sqlite_bytes_in_use
from birdflow.core.local_db import LocalDatabase, Migration
from birdflow.core.recordings import TIMESTAMP_FORMAT

FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (recording_id TEXT NOT NULL, analysis_id TEXT NOT NULL,
    processed_at INTEGER NOT NULL, PRIMARY KEY (recording_id, analysis_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backfill_files (location TEXT PRIMARY KEY, size INTEGER NOT NULL,
    modified REAL NOT NULL, recording_id TEXT NOT NULL) WITHOUT ROWID;
"""


def count_detections(connection: sqlite3.Connection) -> None:
    """Version 2: how many detections each analysis had. A record made before versions were kept may have the
    column already."""
    if "detections" not in {row[1] for row in connection.execute("PRAGMA table_info(processed)")}:
        connection.execute("ALTER TABLE processed ADD COLUMN detections INTEGER")


def record_how_long(connection: sqlite3.Connection) -> None:
    """Version 3: each recording's length (its listener and start are in its id); null for older records."""
    connection.execute("ALTER TABLE processed ADD COLUMN duration_s REAL")


MIGRATIONS: list[Migration] = [FIRST_SCHEMA, count_detections, record_how_long]


@dataclass(frozen=True)
class RecordedSpan:
    """A listener recorded from `start` for `duration_s` seconds."""

    listener_id: str
    start: datetime
    duration_s: float

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)


class ProcessedLedger:
    def __init__(self, path: Path, detections_root: Path | None = None, inbox: Path | None = None):
        """`detections_root` and `inbox`: the station's per-recording detection files and its recordings folder,
        from which a damaged record is rebuilt (local_db.py)."""
        self.detections_root, self.inbox = detections_root, inbox
        self.database = LocalDatabase(path, MIGRATIONS, rebuild=self._rebuild if detections_root else None)

    def _rebuild(self, connection: sqlite3.Connection) -> None:
        """A record for each recording whose detections file the station holds (`<recording>__<analysis>.parquet`,
        sinks.ParquetSink), with its count of detections, unless its audio is still in the recordings folder: its
        run has written detections but may not have archived it yet, and a record would make the executor drop it.
        A recording without detections has no file, so it is not recorded."""
        import pyarrow.parquet as pq  # only a damaged record needs the Parquet reader

        assert self.detections_root is not None
        in_progress = {file.stem for file in self.inbox.iterdir()} if self.inbox and self.inbox.is_dir() else set()
        rows = []
        for file in self.detections_root.rglob("*__*.parquet"):
            recording_id, _, analysis_id = file.stem.rpartition("__")
            if recording_id in in_progress:
                continue
            try:
                count = pq.ParquetFile(file).metadata.num_rows
            except (OSError, ValueError):  # ArrowInvalid is a ValueError: a damaged file of its own
                count = None
            rows.append((recording_id, analysis_id, int(file.stat().st_mtime), count, None))
        connection.executemany("INSERT OR IGNORE INTO processed VALUES (?, ?, ?, ?, ?)", rows)

    def record(
        self, recording_id: str, analysis_id: str, detections: int | None = None, recorded: RecordedSpan | None = None
    ) -> None:
        """`recorded`: what the recording covers; its listener and start must be those its id names."""
        self.database.execute(
            "INSERT OR REPLACE INTO processed VALUES (?, ?, ?, ?, ?)",
            (recording_id, analysis_id, int(time.time()), detections, recorded.duration_s if recorded else None),
        )

    def recorded_spans(self, since: datetime, until: datetime) -> dict[str, RecordedSpan]:
        """What was recorded, by recording id, of the recordings that started in [since, until) and whose records
        say (those made since version 3)."""
        spans = {}
        for recording_id, duration_s in self.database.each(
            "SELECT recording_id, duration_s FROM processed WHERE duration_s IS NOT NULL"
        ):
            try:  # listener_start_hash: recordings.recording_id_for
                listener_id, stamp, _ = recording_id.rsplit("_", 2)
                start = datetime.strptime(stamp, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            if since <= start < until:
                spans[recording_id] = RecordedSpan(listener_id, start, duration_s)
        return spans

    def detections(self, recording_id: str) -> int:
        """The most detections any analysis of the recording found; 1 when unknown (recorded before they were
        counted, or never processed): what the disk floor deletes last is what is worth the most."""
        row = self.database.execute(
            "SELECT max(coalesce(detections, 1)) FROM processed WHERE recording_id = ?", (recording_id,)
        ).fetchone()
        return 1 if row is None or row[0] is None else row[0]

    def holds(self, recording_id: str) -> bool:
        """Whether any analysis of the recording was recorded (a listener sending it again is told so); without a
        record yet, nothing was (and none is made: the ingest asks, the executor writes)."""
        if not self.database.path.exists():
            return False
        query = "SELECT 1 FROM processed WHERE recording_id = ? LIMIT 1"
        return self.database.execute(query, (recording_id,)).fetchone() is not None

    def contains(self, recording_id: str, analysis_id: str) -> bool:
        query = "SELECT 1 FROM processed WHERE recording_id = ? AND analysis_id = ?"
        return self.database.execute(query, (recording_id, analysis_id)).fetchone() is not None

    def remember_file(self, location: str, size: int, modified: float, recording_id: str) -> None:
        """A backfilled file and the recording it holds: a resumed backfill skips it without reading it again."""
        self.database.execute(
            "INSERT OR REPLACE INTO backfill_files VALUES (?, ?, ?, ?)", (location, size, modified, recording_id)
        )

    def recording_of_file(self, location: str, size: int, modified: float) -> str | None:
        row = self.database.execute(
            "SELECT recording_id FROM backfill_files WHERE location = ? AND size = ? AND modified = ?",
            (location, size, modified),
        ).fetchone()
        return row[0] if row else None

    def keep_within(self, limit_bytes: int) -> int:
        """Forget the oldest records while the record outgrows `limit_bytes` (its share of the disk budget): a
        recording sent again after that is processed again. Returns the records forgotten."""
        used = sqlite_bytes_in_use(self.database.path)
        if used <= limit_bytes:
            return 0
        rows = self.database.execute("SELECT count(*) FROM processed").fetchone()[0]
        surplus = math.ceil(rows * (1 - SHRINK_TO * limit_bytes / used))
        return self.database.execute(
            "DELETE FROM processed WHERE (recording_id, analysis_id) IN "
            "(SELECT recording_id, analysis_id FROM processed ORDER BY processed_at LIMIT ?)",
            (surplus,),
        ).rowcount

    def listener_ids(self) -> set[str]:
        """Listeners with a processed recording (a recording id starts with its listener id and '_')."""
        rows = self.database.execute(
            "SELECT DISTINCT substr(recording_id, 1, instr(recording_id, '_') - 1) FROM processed"
        )
        return {row[0] for row in rows if row[0]}

    def listeners_heard(self, hour: int) -> set[str]:
        """Listeners with a processed recording that started in the hour (epoch seconds of its start)."""
        stamp = datetime.fromtimestamp(hour, timezone.utc).strftime("%Y%m%dT%H")
        rows = self.database.execute(
            "SELECT DISTINCT substr(recording_id, 1, instr(recording_id, '_') - 1) FROM processed"
            " WHERE recording_id GLOB ?",
            (f"*_{stamp}[0-5][0-9][0-5][0-9]Z_*",),
        )
        return {row[0] for row in rows if row[0]}

    def recording_ids(self) -> set[str]:
        return {row[0] for row in self.database.each("SELECT recording_id FROM processed")}
