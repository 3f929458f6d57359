"""Rare or frequent (seed 001): what is pushed at once and what is only counted.

A detection is rare when its species was not heard at this station within `rare_window_days` before it,
or when the species is watched; rare ones are pushed (one event per species and recording), and every
detection counts in the hourly table (station, listener, species, hour). The state is one SQLite file:
when each species was last heard, the hourly counts, which recordings were counted. A recording is
counted once in one transaction, so reruns, retries and two runs at once never count twice or miss a
species' first time. Hours are written to the sinks once they close; a late recording marks its hour
to be written again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from birdflow.core.local_db import LocalDatabase

HOURLY_SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),  # the hour's start
        pa.field("station_id", pa.string(), nullable=False),
        pa.field("listener_id", pa.string(), nullable=False),
        pa.field("scientific_name", pa.string(), nullable=False),
        pa.field("common_name", pa.string(), nullable=False),
        pa.field("detections", pa.int64(), nullable=False),
        pa.field("best_confidence", pa.float64(), nullable=False),
    ]
)
HOURLY_TAG_COLUMNS = ["station_id", "listener_id", "scientific_name", "common_name"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS last_heard (station_id TEXT, scientific_name TEXT, heard_at REAL NOT NULL,
    PRIMARY KEY (station_id, scientific_name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly (hour INTEGER, station_id TEXT, listener_id TEXT, scientific_name TEXT,
    common_name TEXT NOT NULL, detections INTEGER NOT NULL, best_confidence REAL NOT NULL,
    PRIMARY KEY (hour, station_id, listener_id, scientific_name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hours (hour INTEGER, station_id TEXT, version INTEGER NOT NULL,
    written_version INTEGER NOT NULL, PRIMARY KEY (hour, station_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counted (recording_id TEXT PRIMARY KEY, counted_at REAL NOT NULL, rare TEXT NOT NULL,
    announced INTEGER NOT NULL) WITHOUT ROWID;
"""
HOUR_S = 3600
RARE_EVENT = "birdflow.detection.rare"  # the Prefect event of a rare sighting
# one Prefect event per recording with rare sightings, listing them: what notifications are sent from
RARE_IN_RECORDING_EVENT = "birdflow.recording.rare"


@dataclass(frozen=True)
class RareSighting:
    """A species heard for the first time in the window (or watched), at its best in one recording."""

    station_id: str
    listener_id: str
    recording_id: str
    scientific_name: str
    common_name: str
    confidence: float
    time: str  # ISO 8601, UTC
    watched: bool


@dataclass(frozen=True)
class Tally:
    rare: list[RareSighting]
    to_announce: bool  # False once the rare sightings of this recording were announced


def hour_of(epoch_s: float) -> int:
    return int(epoch_s // HOUR_S) * HOUR_S


class SpeciesRecord:
    def __init__(self, path: Path, rare_window_days: float, watch_species: Iterable[str] = ()):
        self.database = LocalDatabase(path, [SCHEMA])
        self.window_s = rare_window_days * 86400
        self.watched = {name.lower() for name in watch_species}

    def tally(self, detections: pa.Table, seed_hour: Callable[[int, str], pa.Table] | None = None) -> Tally:
        """Count a recording's detections (once) and say which were rare. `seed_hour` reads an hour already
        written and no longer held here (a late recording of an old hour adds to it, not replaces it)."""
        if detections.num_rows == 0:
            return Tally([], False)
        rows = detections.select(
            ["time", "station_id", "listener_id", "recording_id", "scientific_name", "common_name", "confidence"]
        ).to_pylist()
        recording_id = rows[0]["recording_id"]
        execute = self.database.execute
        with self.database.transaction():
            done = execute("SELECT rare, announced FROM counted WHERE recording_id = ?", (recording_id,)).fetchone()
            if done:
                return Tally([RareSighting(**item) for item in json.loads(done[0])], not done[1])
            rare = self._rare_sightings(rows)
            for row in rows:
                self._count(row, seed_hour)
            execute(
                "INSERT INTO counted VALUES (?, ?, ?, ?)",
                (recording_id, time.time(), json.dumps([asdict(item) for item in rare]), 0 if rare else 1),
            )
        return Tally(rare, bool(rare))

    def _rare_sightings(self, rows: list[dict]) -> list[RareSighting]:
        best: dict[str, dict] = {}
        for row in rows:
            if row["scientific_name"] not in best or row["confidence"] > best[row["scientific_name"]]["confidence"]:
                best[row["scientific_name"]] = row
        rare = []
        for species, row in best.items():
            heard = row["time"].timestamp()
            watched = species.lower() in self.watched or row["common_name"].lower() in self.watched
            last = self.database.execute(
                "SELECT heard_at FROM last_heard WHERE station_id = ? AND scientific_name = ?",
                (row["station_id"], species),
            ).fetchone()
            if watched or last is None or heard - last[0] > self.window_s:
                rare.append(
                    RareSighting(
                        row["station_id"],
                        row["listener_id"],
                        row["recording_id"],
                        species,
                        row["common_name"],
                        round(row["confidence"], 4),
                        row["time"].astimezone(timezone.utc).isoformat(),
                        watched,
                    )
                )
            self.database.execute(
                "INSERT INTO last_heard VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET heard_at = max(heard_at, "
                "excluded.heard_at)",
                (row["station_id"], species, heard),
            )
        return rare

    def _count(self, row: dict, seed_hour: Callable[[int, str], pa.Table] | None) -> None:
        hour, station = hour_of(row["time"].timestamp()), row["station_id"]
        known = self.database.execute(
            "UPDATE hours SET version = version + 1 WHERE hour = ? AND station_id = ?", (hour, station)
        ).rowcount
        if not known:
            self.database.execute("INSERT INTO hours VALUES (?, ?, 1, 0)", (hour, station))
            for held in (seed_hour(hour, station) if seed_hour else HOURLY_SCHEMA.empty_table()).to_pylist():
                self._add(
                    hour,
                    held["station_id"],
                    held["listener_id"],
                    held["scientific_name"],
                    held["common_name"],
                    held["detections"],
                    held["best_confidence"],
                )
        self._add(hour, station, row["listener_id"], row["scientific_name"], row["common_name"], 1, row["confidence"])

    def _add(self, hour: int, station: str, listener: str, species: str, common: str, count: int, best: float) -> None:
        self.database.execute(
            "INSERT INTO hourly VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " detections = detections + excluded.detections, best_confidence = max(best_confidence, "
            "excluded.best_confidence)",
            (hour, station, listener, species, common, count, round(best, 6)),
        )

    def announced(self, recording_id: str) -> None:
        self.database.execute("UPDATE counted SET announced = 1 WHERE recording_id = ?", (recording_id,))

    def hours_to_write(self, now: float, settle_s: float) -> list[tuple[int, str, int]]:
        """(hour, station, version) of closed hours whose counts changed since they were last written."""
        return self._closed(now, settle_s, "AND version > written_version")

    def closed_hours(self, now: float, settle_s: float) -> list[tuple[int, str, int]]:
        """(hour, station, version) of every hour with counts that closed `settle_s` ago or longer."""
        return self._closed(now, settle_s, "")

    def _closed(self, now: float, settle_s: float, condition: str) -> list[tuple[int, str, int]]:
        return self.database.execute(
            f"SELECT hour, station_id, version FROM hours WHERE hour + ? + ? <= ? {condition} ORDER BY hour",
            (HOUR_S, settle_s, now),
        ).fetchall()

    def hour_table(self, hour: int, station: str) -> pa.Table:
        rows = self.database.execute(
            "SELECT listener_id, scientific_name, common_name, detections, best_confidence FROM hourly"
            " WHERE hour = ? AND station_id = ? ORDER BY listener_id, scientific_name",
            (hour, station),
        ).fetchall()
        start = datetime.fromtimestamp(hour, timezone.utc)
        columns: list[Any] = list(zip(*rows)) if rows else [[]] * 5
        return pa.table(
            {
                "time": [start] * len(rows),
                "station_id": [station] * len(rows),
                "listener_id": columns[0],
                "scientific_name": columns[1],
                "common_name": columns[2],
                "detections": columns[3],
                "best_confidence": columns[4],
            },
            schema=HOURLY_SCHEMA,
        )

    def written(self, hour: int, station: str, version: int) -> None:
        """The hour as of `version` is in every sink (a count added meanwhile keeps it to be written)."""
        self.database.execute(
            "UPDATE hours SET written_version = max(written_version, ?) WHERE hour = ? AND station_id = ?",
            (version, hour, station),
        )

    def forget(self, now: float, keep_s: float) -> int:
        """Drop what no longer matters: written hours and counted recordings older than `keep_s`. When each
        species was last heard is kept: it is measured in the recordings' own time (a card dump from years
        back, a listener with a wrong clock), which the wall clock says nothing about, and it is one row per
        species the model knows. Returns the hours dropped."""
        execute = self.database.execute
        with self.database.transaction():
            old = execute(
                "SELECT hour, station_id FROM hours WHERE hour < ? AND version = written_version",
                (hour_of(now - keep_s),),
            ).fetchall()
            for hour, station in old:
                execute("DELETE FROM hourly WHERE hour = ? AND station_id = ?", (hour, station))
                execute("DELETE FROM hours WHERE hour = ? AND station_id = ?", (hour, station))
            execute("DELETE FROM counted WHERE counted_at < ?", (now - keep_s,))
        return len(old)
