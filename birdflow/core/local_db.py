"""birdflow's own small SQLite files (the processed-recordings record, cached task results).

WAL, so readers never wait for the writer; one connection per thread, since sqlite3 connections are not
shared between threads; several processes of a station may use the same file at once.

Each file keeps its schema version in `PRAGMA user_version`: a database is given its migrations in order, the
first makes the schema, each later one changes it, and opening a file applies those it has not had (in one
transaction, so two processes opening an old file at once migrate it once). A file made before versions were kept
is version 0, so a first migration must accept the tables already there (CREATE ... IF NOT EXISTS). A file from a
newer birdflow is refused by name rather than written with an older idea of its tables.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from birdflow.core.errors import StateFileError

# SQL statements, or a function given the connection inside the migration's transaction (for a change that
# depends on what the file holds); neither may commit
Migration = str | Callable[[sqlite3.Connection], None]

# the write-ahead log is checkpointed at this many pages (1 MB) and cut back to that size afterwards
WAL_PAGES = 256


class LocalDatabase:
    def __init__(self, path: Path, migrations: Sequence[Migration]):
        self.path = Path(path)
        self.migrations = tuple(migrations)
        self._local = threading.local()

    @property
    def version(self) -> int:
        """The schema version this code writes: the number of its migrations."""
        return len(self.migrations)

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._connection().execute(sql, parameters)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._connection().executemany(sql, rows)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema made) on its first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            connection.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            self._migrate(connection)
            self._local.connection = connection
        return connection

    def _file_version(self, connection: sqlite3.Connection) -> int:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > self.version:
            raise StateFileError(
                f"{self.path} has schema version {version}, written by a newer birdflow (this one knows up to "
                f"{self.version}): upgrade birdflow, or move the file away to start it afresh"
            )
        return version

    def _migrate(self, connection: sqlite3.Connection) -> None:
        if self._file_version(connection) == self.version:
            return
        connection.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then find it done
        try:
            for migration in self.migrations[self._file_version(connection) :]:
                if callable(migration):
                    migration(connection)
                else:
                    for statement in statements(migration):
                        connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {self.version}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def statements(script: str) -> list[str]:
    """The statements of a migration, one at a time (executescript would commit the migration's transaction)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if pending.strip():
        found.append(pending.strip())
    return found
