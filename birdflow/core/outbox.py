"""Messages waiting for the MQTT broker, in the order they were made: rows of one SQLite file, written by
whichever process made them (the runs) and taken by the one that publishes (the executor). A message leaves
only once the broker acknowledged it (QoS 1), so a broker outage or a restart loses nothing; past
`max_messages` the oldest go first (counted), so a broker gone for good cannot fill the disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from birdflow.core.local_db import LocalDatabase, Migration

log = logging.getLogger("birdflow.mqtt")
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS made (key TEXT PRIMARY KEY, at REAL NOT NULL);
"""
# how long the messages of a recording are remembered as made: a rerun within it publishes nothing again
MADE_KEPT_S = 30 * 86400.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Queued:
    id: int
    message: Message


class Outbox:
    def __init__(self, path: Path, max_messages: int = 100_000, migrations: Sequence[Migration] = (SCHEMA,)):
        """`migrations`: those of the whole file, when the outbox shares it with other tables."""
        self.database = LocalDatabase(path, migrations)
        self.max_messages = max_messages

    def put(self, messages: Iterable[Message], once_for: str | None = None) -> int:
        """Queue them, in order, unless `once_for` (a recording's key) was queued before: a retry or a rerun of
        the same recording publishes nothing twice. Returns how many older ones were dropped to stay within
        max_messages."""
        rows = [(message.topic, message.payload, int(message.retain)) for message in messages]
        if not rows:
            return 0
        execute = self.database.execute
        with self.database.transaction():
            if once_for is not None:
                now = time.time()
                if execute("SELECT 1 FROM made WHERE key = ?", (once_for,)).fetchone():
                    return 0
                execute("INSERT INTO made VALUES (?, ?)", (once_for, now))
                execute("DELETE FROM made WHERE at < ?", (now - MADE_KEPT_S,))
            self.database.executemany("INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)", rows)
            (count,) = execute("SELECT count(*) FROM outbox").fetchone()
            dropped = max(0, count - self.max_messages)
            if dropped:
                execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (dropped,))
        if dropped:
            log.warning("MQTT outbox full (%d messages): the %d oldest dropped", self.max_messages, dropped)
        return dropped

    def made(self, once_for: str) -> bool:
        """Whether the messages of `once_for` (a recording's key) were queued already."""
        return self.database.execute("SELECT 1 FROM made WHERE key = ?", (once_for,)).fetchone() is not None

    def head(self, limit: int) -> list[Queued]:
        """The oldest messages, oldest first."""
        rows = self.database.execute(
            "SELECT id, topic, payload, retain FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [Queued(id, Message(topic, bytes(payload), bool(retain))) for id, topic, payload, retain in rows]

    def remove(self, ids: Iterable[int]) -> None:
        """Sent and acknowledged."""
        self.database.executemany("DELETE FROM outbox WHERE id = ?", [(id,) for id in ids])

    def __len__(self) -> int:
        (count,) = self.database.execute("SELECT count(*) FROM outbox").fetchone()
        return count
