"""SQL over the station's own tables (seed 001): DuckDB in-process, read-only, over the local Parquet files.

Each table is a view over its folder; `reviewed` is every detection with its verdict (null while unreviewed).
The engine may read those folders and nothing else (DuckDB's allowed_directories, external access off,
configuration locked), and only a single SELECT is run, so a statement can neither write nor read what is not
a table here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from birdflow.core.detections import SCHEMA as DETECTIONS_SCHEMA
from birdflow.core.errors import Refused
from birdflow.core.health import health_schema
from birdflow.core.rarity import HOURLY_SCHEMA
from birdflow.core.reviews import REVIEWS_SCHEMA
from birdflow.core.sinks import dataset_files
from birdflow.core.table_folders import TableFolders


class SqlError(Refused):
    """The statement was refused or failed; the message is one line."""


@dataclass(frozen=True)
class LocalTable:
    name: str
    folder: Path
    schema: pa.Schema


def station_tables(folders: TableFolders) -> list[LocalTable]:
    return [
        LocalTable("detections", folders.detections, DETECTIONS_SCHEMA),
        LocalTable("species_hourly", folders.species_hourly, HOURLY_SCHEMA),
        LocalTable("listener_health", folders.listener_health, health_schema()),
        LocalTable("reviews", folders.reviews, REVIEWS_SCHEMA),
    ]


# the detections as the model labelled them, each with the verdict on it: the reviewed truth is
# `WHERE verdict IN ('confirmed', 'relabelled')` under reviewed_scientific_name / reviewed_common_name
REVIEWED_VIEW = """CREATE VIEW reviewed AS SELECT detections.*, reviews.detection_id, reviews.verdict,
    reviews.reviewed_scientific_name, reviews.reviewed_common_name, reviews.reviewer, reviews.reviewed_at
    FROM detections LEFT JOIN reviews USING (recording_id, analysis_id, start_s, scientific_name)"""


def query(statement: str, tables: list[LocalTable]) -> pa.Table:
    """The result of one SELECT over the tables, as Arrow."""
    import duckdb

    check_read_only(statement)
    spill = tempfile.TemporaryDirectory(prefix="birdflow-sql-")  # private (0700), gone after the query
    connection = duckdb.connect(":memory:", config={"temp_directory": spill.name})
    try:
        folders = [str(table.folder.resolve()) + "/" for table in tables]
        connection.execute("SET allowed_directories = ?", [folders])
        for table in tables:
            _create_view(connection, table)
        if {"detections", "reviews"} <= {table.name for table in tables}:
            connection.execute(REVIEWED_VIEW)
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        try:
            return connection.sql(statement).to_arrow_table()
        except duckdb.Error as exc:
            raise SqlError(one_line(exc)) from None
    finally:
        connection.close()
        spill.cleanup()


def check_read_only(statement: str) -> None:
    import duckdb

    try:
        statements = duckdb.extract_statements(statement)
    except duckdb.Error as exc:
        raise SqlError(one_line(exc)) from None
    if len(statements) != 1:
        raise SqlError(f"give exactly one statement (got {len(statements)})")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SqlError(f"only SELECT statements are run here (this one is {statements[0].type.name})")


def _create_view(connection, table: LocalTable) -> None:
    """A view over the table's files; for detections, a recording's newer per-recording file replaces its rows in
    the hour file it was merged into (as sinks.read_detections reads them)."""
    hourly, loose = dataset_files(table.folder)
    if table.name != "detections":
        loose, hourly = hourly + loose, []
    columns = ", ".join(f'"{name}"' for name in table.schema.names)
    reader = lambda files: f"SELECT {columns} FROM read_parquet({_literal_list(files)}, union_by_name = true)"  # noqa: E731
    if loose and hourly:
        body = (
            f"WITH loose AS ({reader(loose)}), merged AS ({reader(hourly)}) SELECT * FROM loose UNION ALL "
            "SELECT merged.* FROM merged ANTI JOIN loose USING (recording_id, analysis_id)"
        )
    elif loose or hourly:
        body = reader(loose or hourly)
    else:
        connection.register(f"empty_{table.name}", table.schema.empty_table())
        body = f"SELECT * FROM empty_{table.name}"
    connection.execute(f'CREATE VIEW "{table.name}" AS {body}')


def _literal_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + name.replace("'", "''") + "'" for name in files) + "]"


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
