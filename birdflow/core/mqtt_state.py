"""What the station has told the broker and keeps true there: the Home Assistant discovery config of each entity
(queued once, and again whenever Home Assistant or the broker may have lost it), which detection each retained
state topic shows (a late recording never replaces a newer detection), and the detections counted per day. One
SQLite file beside the outbox; no network here."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from birdflow.core.local_db import LocalDatabase
from birdflow.core.outbox import Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (topic TEXT PRIMARY KEY, payload BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shown (topic TEXT PRIMARY KEY, at REAL NOT NULL, detection_id TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counted (day TEXT PRIMARY KEY, detections INTEGER NOT NULL) WITHOUT ROWID;
"""
DAYS_COUNTED = 7  # days whose counts are kept (a late recording adds to its own day)


class MqttState:
    """Safe for the station's processes at once: each change is one transaction."""

    def __init__(self, path: Path):
        self.database = LocalDatabase(path, [SCHEMA])

    def configs_to_send(self, configs: dict[str, bytes]) -> list[Message]:
        """The configs (topic -> payload) that are new or changed, remembered as sent: a config goes out once."""
        execute = self.database.execute
        changed = []
        with self.database.transaction():
            for topic, payload in configs.items():
                known = execute("SELECT payload FROM configs WHERE topic = ?", (topic,)).fetchone()
                if known is None or bytes(known[0]) != payload:
                    execute("INSERT OR REPLACE INTO configs VALUES (?, ?)", (topic, payload))
                    changed.append(Message(topic, payload, retain=True))
        return changed

    def every_config(self) -> list[Message]:
        """All configs sent: what a restarted Home Assistant, or a broker that lost its retained messages, needs."""
        rows = self.database.execute("SELECT topic, payload FROM configs ORDER BY topic").fetchall()
        return [Message(topic, bytes(payload), retain=True) for topic, payload in rows]

    def remove(self, config_topic: str, state_topic: str) -> list[Message]:
        """The entity gone from Home Assistant (an empty retained config) and its retained state cleared."""
        execute = self.database.execute
        if execute("DELETE FROM configs WHERE topic = ?", (config_topic,)).rowcount == 0:
            return []
        execute("DELETE FROM shown WHERE topic = ?", (state_topic,))
        return [Message(config_topic, b"", retain=True), Message(state_topic, b"", retain=True)]

    def newer(self, topic: str, at: datetime, detection_id: str) -> bool:
        """Whether the detection at `at` is the newest the topic has shown (then it is shown from now on)."""
        shown = self.database.execute(
            "INSERT INTO shown VALUES (?, ?, ?) ON CONFLICT (topic) DO UPDATE SET at = excluded.at, "
            "detection_id = excluded.detection_id WHERE excluded.at > shown.at",
            (topic, at.timestamp(), detection_id),
        )
        return shown.rowcount > 0

    def shows(self, topic: str) -> str | None:
        """The id of the detection the topic shows, None when it shows none."""
        found = self.database.execute("SELECT detection_id FROM shown WHERE topic = ?", (topic,)).fetchone()
        return found[0] if found else None

    def count(self, day: str, detections: int) -> int:
        """The day's detections counted so far, these included (days older than DAYS_COUNTED are forgotten)."""
        execute = self.database.execute
        execute(
            "INSERT INTO counted VALUES (?, ?) ON CONFLICT (day) DO UPDATE SET "
            "detections = detections + excluded.detections",
            (day, detections),
        )
        execute(
            "DELETE FROM counted WHERE day NOT IN (SELECT day FROM counted ORDER BY day DESC LIMIT ?)", (DAYS_COUNTED,)
        )
        return execute("SELECT detections FROM counted WHERE day = ?", (day,)).fetchone()[0]
