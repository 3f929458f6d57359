"""What a station that keeps its own run history owes its fleet's central Prefect: the rare-species events (queued
until the central server took them) and, once an hour has closed, a summary of it. One SQLite file, written by
the runs (events) and read by the relay (flows/relay.py), which sends them. No network here.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from birdflow.core.local_db import LocalDatabase
from birdflow.core.outbox import Message, Outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS sightings (hour INTEGER, station_id TEXT, recording_id TEXT, scientific_name TEXT,
    payload TEXT NOT NULL, PRIMARY KEY (hour, station_id, recording_id, scientific_name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS summarized (hour INTEGER, station_id TEXT, version INTEGER NOT NULL,
    PRIMARY KEY (hour, station_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS started (at REAL NOT NULL);
"""
HOUR_S = 3600
# hours before the relay first started that it still summarises (a station joining a fleet: its last day)
LOOK_BACK_S = 86400


class CentralLink:
    def __init__(self, path: Path, max_events: int = 100_000):
        self.database = LocalDatabase(path, SCHEMA)
        self.events = Outbox(path, max_events)  # rows of the same file

    def rare(self, event: dict[str, Any], once_for: str) -> None:
        """A rare sighting's Prefect event (its fields), queued once per `once_for` and kept for its hour's summary."""
        payload = event["payload"]
        sighted = datetime.fromisoformat(payload["time"])
        hour = int(sighted.timestamp()) // HOUR_S * HOUR_S
        stamped = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), **event}
        self.database.execute(
            "INSERT OR IGNORE INTO sightings VALUES (?, ?, ?, ?, ?)",
            (
                hour,
                payload["station_id"],
                event["resource"]["prefect.resource.name"],
                payload["scientific_name"],
                json.dumps(payload),
            ),
        )
        self.events.put([Message(event["event"], json.dumps(stamped).encode())], once_for=once_for)

    def sightings(self, hour: int, station_id: str) -> list[dict[str, Any]]:
        rows = self.database.execute(
            "SELECT payload FROM sightings WHERE hour = ? AND station_id = ? ORDER BY scientific_name",
            (hour, station_id),
        ).fetchall()
        return [json.loads(text) for (text,) in rows]

    def first_started(self) -> float:
        """When the relay first ran here (recorded the first time this is asked)."""
        found = self.database.execute("SELECT min(at) FROM started").fetchone()[0]
        if found is None:
            found = time.time()
            self.database.execute("INSERT INTO started VALUES (?)", (found,))
        return found

    def to_summarize(self, hours: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
        """Of (hour, station, version) closed hours, those not summarised at that version, from a day before the
        relay first ran on."""
        since = self.first_started() - LOOK_BACK_S
        done = dict(
            ((hour, station), version)
            for hour, station, version in self.database.execute("SELECT hour, station_id, version FROM summarized")
        )
        return [item for item in hours if item[0] >= since and done.get(item[:2], -1) < item[2]]

    def summarized(self, hour: int, station_id: str, version: int) -> None:
        self.database.execute("INSERT OR REPLACE INTO summarized VALUES (?, ?, ?)", (hour, station_id, version))


def hour_summary(
    station_id: str, hour: int, counts: pa.Table, rare: list[dict[str, Any]], backlog: int, disk_free: float
) -> str:
    """The markdown of a station's hour on the central server: what was heard (species, detections, best
    confidence, listeners), the rare sightings with links to the station's runs, and how the station is."""
    start = datetime.fromtimestamp(hour, timezone.utc)
    species: dict[str, dict[str, Any]] = {}
    for row in counts.to_pylist():
        seen = species.setdefault(row["common_name"], {"detections": 0, "best": 0.0, "listeners": set()})
        seen["detections"] += row["detections"]
        seen["best"] = max(seen["best"], row["best_confidence"])
        seen["listeners"].add(row["listener_id"])
    lines = [f"### Station {station_id}, {start:%Y-%m-%d %H}:00-{start:%H}:59 UTC", ""]
    total = sum(item["detections"] for item in species.values())
    lines += [f"{total} detection(s) of {len(species)} species; {len(rare)} rare.", ""]
    if species:
        lines += ["| species | detections | best confidence | listeners |", "|---|---|---|---|"]
        for name, seen in sorted(species.items(), key=lambda item: (-item[1]["detections"], item[0])):
            heard_by = ", ".join(sorted(seen["listeners"]))
            lines.append(f"| {name} | {seen['detections']} | {seen['best']:.2f} | {heard_by} |")
        lines.append("")
    for sighting in rare:
        where = f"[its run]({sighting['run_url']})" if sighting.get("run_url") else sighting.get("archive_key", "")
        lines.append(
            f"- **rare**: {sighting['common_name']} ({sighting['scientific_name']}) {sighting['confidence']:.2f}, "
            f"listener {sighting['listener_id']} at {sighting['time']}; {where}"
        )
    lines += ["", f"Station: {backlog} recording(s) waiting, {disk_free:.0%} of its disk free."]
    return "\n".join(lines)
