"""Where detections, hourly species counts and listener health go: local Parquet (the embedded default) and/or
InfluxDB 3.

Writes are idempotent: the same recording analysed with the same parameters lands on the same
Parquet file and the same Influx series and timestamps, so a retry never duplicates rows. The
maintenance run merges the per-recording Parquet files into one file per hour (a station would
otherwise make ~100,000 small files a day); a later rewrite of a recording replaces its rows. An hour of
counts is one file (`YYYY/MM/DD/HH.parquet`) or one Influx series per listener and species, written whole
each time, so writing it again replaces it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from birdflow.core.detections import SCHEMA, TAG_COLUMNS
from birdflow.core.errors import StateFileError
from birdflow.core.rarity import HOURLY_SCHEMA, HOURLY_TAG_COLUMNS
from birdflow.core.reviews import REVIEW_TAG_COLUMNS
from birdflow.core.table_folders import TableFolders

HEALTH_TABLE = "listener_health"
HEALTH_TAG_COLUMNS = ["station_id", "listener_id"]
REVIEWS_TABLE = "reviews"


class DetectionSink(Protocol):
    name: str

    def write(self, table: pa.Table) -> int: ...

    def write_hourly(self, table: pa.Table) -> int:
        """One hour of one station's species counts (rarity.HOURLY_SCHEMA)."""

    def write_health(self, table: pa.Table) -> int:
        """A batch of listener health reports (health.health_schema())."""

    def write_reviews(self, table: pa.Table) -> int:
        """Every verdict on one day's detections (reviews.REVIEWS_SCHEMA)."""


HOUR_FILE_PREFIX = "hour-"
READING_ORDER = [("time", "ascending"), ("listener_id", "ascending")]
KEY_SEPARATOR = "\x1f"


def _write_atomically(table: pa.Table, target: Path) -> None:
    partial = target.with_suffix(".partial")
    pq.write_table(table, partial)
    os.replace(partial, target)


class ParquetSink:
    """Files under YYYY/MM/DD, each written to a temporary name and renamed: one per (recording, analysis) of
    detections, one per hour of species counts, one per batch of listener health, one per day of reviews."""

    name = "parquet"

    def __init__(self, root: Path, hourly_root: Path, health_root: Path, reviews_root: Path):
        self.root = Path(root)
        self.hourly_root = Path(hourly_root)
        self.health_root = Path(health_root)
        self.reviews_root = Path(reviews_root)

    @classmethod
    def in_folders(cls, folders: TableFolders) -> ParquetSink:
        return cls(folders.detections, folders.species_hourly, folders.listener_health, folders.reviews)

    def write(self, table: pa.Table) -> int:
        return _write_by_day(
            self.root, table, lambda first: f"{_first(table, 'recording_id')}__{_first(table, 'analysis_id')}"
        )

    def write_hourly(self, table: pa.Table) -> int:
        return _write_by_day(self.hourly_root, table, lambda hour: f"{hour:%H}")

    def write_health(self, table: pa.Table) -> int:
        """A file per batch, named by its first report's time and a digest of its rows: a retry rewrites the same
        file."""
        rows = (table.column("listener_id").to_pylist(), table.column("time").to_pylist())
        digest = hashlib.sha256(repr(rows).encode()).hexdigest()[:12]
        return _write_by_day(self.health_root, table, lambda first: f"{first:%H%M%S}-{digest}")

    def write_reviews(self, table: pa.Table) -> int:
        return _write_by_day(self.reviews_root, table, lambda first: "reviews")


def _first(table: pa.Table, column: str):
    return table.column(column)[0].as_py()


def _write_by_day(root: Path, table: pa.Table, name: Callable[[datetime], str]) -> int:
    """The table as `root/YYYY/MM/DD/<name>.parquet` (the day and name of its first row's time), written atomically."""
    if table.num_rows == 0:
        return 0
    first = _first(table, "time")
    folder = root / f"{first:%Y/%m/%d}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(table, folder / f"{name(first)}.parquet")
    return table.num_rows


def read_hour(hourly_root: Path, hour_start: datetime) -> pa.Table:
    """The counts of one hour as last written to Parquet (empty when it never was)."""
    path = Path(hourly_root) / f"{hour_start:%Y/%m/%d/%H}.parquet"
    if not path.is_file():
        return HOURLY_SCHEMA.empty_table()
    try:
        return pq.read_table(path, schema=HOURLY_SCHEMA)
    except pa.ArrowException as exc:
        raise StateFileError(f"the hourly counts {path} cannot be read ({exc}): restore or remove it") from exc


class InfluxSink:
    """Writes each table through influxdb3-python: tags identify the detection, fields carry its values."""

    name = "influxdb3"

    def __init__(
        self,
        host: str,
        database: str,
        table: str,
        token: str,
        hourly_table: str = "species_hourly",
        timeout_ms: int = 10_000,
    ):
        from influxdb_client_3 import InfluxDBClient3

        self.table = table
        self.hourly_table = hourly_table
        self.client = InfluxDBClient3(host=host, database=database, token=token or None, write_timeout=timeout_ms)

    def write(self, table: pa.Table) -> int:
        return self._write(table, self.table, TAG_COLUMNS)

    def write_hourly(self, table: pa.Table) -> int:
        return self._write(table, self.hourly_table, HOURLY_TAG_COLUMNS)

    def write_health(self, table: pa.Table) -> int:
        return self._write(table, HEALTH_TABLE, HEALTH_TAG_COLUMNS)

    def write_reviews(self, table: pa.Table) -> int:
        """A point per detection at its time: a later verdict on it replaces the earlier one."""
        return self._write(table, REVIEWS_TABLE, REVIEW_TAG_COLUMNS)

    def _write(self, table: pa.Table, measurement: str, tags: list[str]) -> int:
        if table.num_rows == 0:
            return 0
        self.client.write_dataframe(table.to_pandas(), measurement=measurement, timestamp_column="time", tags=tags)
        return table.num_rows

    def close(self) -> None:
        self.client.close()


def read_detections(
    root: Path,
    listener: str | None = None,
    species: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    min_confidence: float | None = None,
) -> pa.Table:
    """Detections from the local dataset, oldest first; species matches scientific or common name."""
    import pyarrow.dataset as ds  # imports pandas (~50 MB): only readers load it, not the executor

    conditions = []
    if listener:
        conditions.append(ds.field("listener_id") == listener)
    if species:
        wanted = species.lower()
        conditions.append(
            (pc.utf8_lower(ds.field("scientific_name")) == wanted) | (pc.utf8_lower(ds.field("common_name")) == wanted)
        )
    if since:
        conditions.append(ds.field("time") >= pa.scalar(since, pa.timestamp("ms", tz="UTC")))
    if until:
        conditions.append(ds.field("time") < pa.scalar(until, pa.timestamp("ms", tz="UTC")))
    if min_confidence is not None:
        conditions.append(ds.field("confidence") >= min_confidence)
    expression = None
    for condition in conditions:
        expression = condition if expression is None else expression & condition
    for attempt in range(3):
        hourly, loose = dataset_files(Path(root))
        try:
            loose_rows = _read(loose, expression)
            # a recording rewritten after its hour was compacted: its newer file replaces its compacted rows
            hourly_rows = _without_keys(_read(hourly, expression), _keys(_read(loose, None)))
            break
        except FileNotFoundError:  # a compaction merged files while they were read: list them again
            if attempt == 2:
                raise
    return pa.concat_tables([hourly_rows, loose_rows]).sort_by(READING_ORDER)


def dataset_files(root: Path) -> tuple[list[str], list[str]]:
    """(hour files, per-recording files) of the dataset."""
    hourly: list[str] = []
    loose: list[str] = []
    if root.is_dir():
        for path in sorted(root.rglob("*.parquet")):
            (hourly if path.name.startswith(HOUR_FILE_PREFIX) else loose).append(str(path))
    return hourly, loose


def _read(files: list[str], expression) -> pa.Table:
    if not files:
        return SCHEMA.empty_table()
    import pyarrow.dataset as ds

    return ds.dataset(files, schema=SCHEMA, format="parquet").to_table(filter=expression)


def _keys(table: pa.Table) -> pa.Array:
    """recording_id + analysis_id of each row: what one per-recording file holds."""
    return pc.binary_join_element_wise(table.column("recording_id"), table.column("analysis_id"), KEY_SEPARATOR)


def _without_keys(table: pa.Table, keys: pa.Array) -> pa.Table:
    if len(keys) == 0 or table.num_rows == 0:
        return table
    return table.filter(pc.invert(pc.is_in(_keys(table), value_set=pc.unique(keys))))


@dataclass
class Compaction:
    files_merged: int = 0
    hour_files_written: int = 0


def compact_detections(root: Path, settled_s: float = 300.0, now: float | None = None) -> Compaction:
    """Merge per-recording files not written for `settled_s` into `YYYY/MM/DD/hour-HH.parquet` (the hour
    of each recording's first detection); their rows replace that recording's earlier rows there."""
    root = Path(root)
    outcome = Compaction()
    if not root.is_dir():
        return outcome
    now = time.time() if now is None else now
    with open(root / ".compaction.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one compaction at a time, whichever process runs it
        groups: dict[Path, list[tuple[Path, os.stat_result, pa.Table]]] = {}
        for name in dataset_files(root)[1]:
            path = Path(name)
            stat = path.stat()
            if now - stat.st_mtime < settled_s:
                continue
            table = pq.read_table(path, schema=SCHEMA)
            if table.num_rows == 0:
                path.unlink(missing_ok=True)
                continue
            hour = table.column("time")[0].as_py().hour
            groups.setdefault(path.parent / f"{HOUR_FILE_PREFIX}{hour:02d}.parquet", []).append((path, stat, table))
        for hour_file, members in groups.items():
            added = pa.concat_tables([table for _, _, table in members])
            earlier = pq.read_table(hour_file, schema=SCHEMA) if hour_file.exists() else SCHEMA.empty_table()
            merged = pa.concat_tables([_without_keys(earlier, _keys(added)), added])
            _write_atomically(merged.sort_by(READING_ORDER), hour_file)
            outcome.hour_files_written += 1
            for path, stat, _ in members:
                # a file rewritten while this ran waits for the next compaction
                if _unchanged(path, stat):
                    path.unlink(missing_ok=True)
                    outcome.files_merged += 1
    return outcome


def _unchanged(path: Path, stat: os.stat_result) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_mtime_ns, now.st_size, now.st_ino) == (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def write_all(
    sinks: Sequence[DetectionSink],
    table: pa.Table,
    on_failure: Callable[[str], None] = lambda sink: None,
    kind: str = "detections",
) -> dict[str, int]:
    """Every sink gets the table (`kind`: detections, hourly, health or reviews); a failing sink is reported (then
    raises, so the task retries)."""
    written = {}
    for sink in sinks:
        try:
            write = {
                "detections": sink.write,
                "hourly": sink.write_hourly,
                "health": sink.write_health,
                "reviews": sink.write_reviews,
            }[kind]
            written[sink.name] = write(table)
        except Exception:
            on_failure(sink.name)
            raise
    return written
