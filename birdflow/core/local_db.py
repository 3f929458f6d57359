"""birdflow's own small SQLite files (the processed-recordings record, cached task results).

WAL, so readers never wait for the writer; one connection per thread, since sqlite3 connections are not
shared between threads; several processes of a station may use the same file at once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# the write-ahead log is checkpointed at this many pages (1 MB) and cut back to that size afterwards
WAL_PAGES = 256


class LocalDatabase:
    def __init__(self, path: Path, schema: str):
        self.path = Path(path)
        self.schema = schema
        self._local = threading.local()

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
            connection.executescript(self.schema)
            self._local.connection = connection
        return connection
