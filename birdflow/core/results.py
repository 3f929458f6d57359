"""Cached task results in one SQLite file, instead of one file per result.

A station caches an analysis per recording: at 30 listeners that is ~130,000 results a day, which as
files would exhaust an SD card's inodes within days. Rows older than the run retention go in one
statement.
"""

from __future__ import annotations

import time
from pathlib import Path

from birdflow.core.local_db import LocalDatabase

SCHEMA = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, content BLOB NOT NULL, written_at INTEGER NOT NULL)"


class ResultsDatabase:
    def __init__(self, path: Path):
        self.database = LocalDatabase(path, [SCHEMA])

    def read(self, key: str) -> bytes:
        row = self.database.execute("SELECT content FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def write(self, key: str, content: bytes) -> None:
        self.database.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (key, content, int(time.time())))

    def prune(self, older_than_s: float) -> int:
        """Delete results written more than `older_than_s` ago; returns how many."""
        cutoff = int(time.time() - older_than_s)
        return self.database.execute("DELETE FROM results WHERE written_at < ?", (cutoff,)).rowcount

    def count(self) -> int:
        return self.database.execute("SELECT count(*) FROM results").fetchone()[0]
