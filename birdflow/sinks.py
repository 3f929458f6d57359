"""Where detection tables go: a local Parquet dataset (the embedded default) and/or InfluxDB 3.

Writes are idempotent: the same recording analysed with the same parameters lands on the same
Parquet file and the same Influx series and timestamps, so a retry never duplicates rows.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from birdflow.detections import SCHEMA, TAG_COLUMNS


class DetectionSink(Protocol):
    name: str

    def write(self, table: pa.Table) -> int: ...


class ParquetSink:
    """One file per (recording, analysis) under YYYY/MM/DD, written to a temporary name and renamed."""

    name = "parquet"

    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, table: pa.Table) -> int:
        if table.num_rows == 0:
            return 0
        first = table.column("time")[0].as_py()
        recording_id = table.column("recording_id")[0].as_py()
        analysis_id = table.column("analysis_id")[0].as_py()
        folder = self.root / f"{first:%Y/%m/%d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{recording_id}__{analysis_id}.parquet"
        partial = target.with_suffix(".partial")
        pq.write_table(table, partial)
        os.replace(partial, target)
        return table.num_rows


class InfluxSink:
    """Writes each table through influxdb3-python: tags identify the detection, fields carry its values."""

    name = "influxdb3"

    def __init__(self, host: str, database: str, table: str, token: str, timeout_ms: int = 10_000):
        from influxdb_client_3 import InfluxDBClient3

        self.table = table
        self.client = InfluxDBClient3(host=host, database=database, token=token or None, write_timeout=timeout_ms)

    def write(self, table: pa.Table) -> int:
        if table.num_rows == 0:
            return 0
        self.client.write_dataframe(
            table.to_pandas(), measurement=self.table, timestamp_column="time", tags=TAG_COLUMNS
        )
        return table.num_rows

    def close(self) -> None:
        self.client.close()


def read_detections(
    root: Path,
    listener: Optional[str] = None,
    species: Optional[str] = None,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
    min_confidence: Optional[float] = None,
) -> pa.Table:
    """Detections from the local dataset, oldest first; species matches scientific or common name."""
    files = sorted(str(path) for path in Path(root).rglob("*.parquet")) if Path(root).is_dir() else []
    if not files:
        return SCHEMA.empty_table()
    dataset = ds.dataset(files, schema=SCHEMA, format="parquet")
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
    return dataset.to_table(filter=expression).sort_by([("time", "ascending"), ("listener_id", "ascending")])


def write_all(
    sinks: Sequence[DetectionSink], table: pa.Table, on_failure: Callable[[str], None] = lambda sink: None
) -> dict[str, int]:
    """Every sink gets the table; a failing sink is reported (then raises, so the task retries)."""
    written = {}
    for sink in sinks:
        try:
            written[sink.name] = sink.write(table)
        except Exception:
            on_failure(sink.name)
            raise
    return written
