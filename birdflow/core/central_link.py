"""What a station that keeps its own run history owes its fleet's central Prefect: the rare-species events (queued
until the central server took them) and, once an hour has closed, a summary of it. One SQLite file, written by
the runs (events) and read by the relay (flows/relay.py), which sends them. And the match that makes two stations'
rare sightings of a species one confirmed sighting. No network here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from birdflow.core.local_db import LocalDatabase
from birdflow.core.outbox import SCHEMA as OUTBOX_SCHEMA
from birdflow.core.outbox import Message, Outbox
from birdflow.core.recordings import name_parts_or_none

SCHEMA = """
CREATE TABLE IF NOT EXISTS sightings (hour INTEGER, station_id TEXT, recording_id TEXT, scientific_name TEXT,
    payload TEXT NOT NULL, PRIMARY KEY (hour, station_id, recording_id, scientific_name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS summarized (hour INTEGER, station_id TEXT, version INTEGER NOT NULL,
    PRIMARY KEY (hour, station_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS started (at REAL NOT NULL);
"""
# the file holds the relay's outbox too: one schema version, and one list of migrations, for both
MIGRATIONS = [OUTBOX_SCHEMA + SCHEMA]
HOUR_S = 3600
CONFIRMED_EVENT = "birdflow.detection.confirmed"
# hours before the relay first started that it still summarises (a station joining a fleet: its last day)
LOOK_BACK_S = 86400


class CentralLink:
    def __init__(self, path: Path, max_events: int = 100_000):
        self.database = LocalDatabase(path, MIGRATIONS)
        self.events = Outbox(path, max_events, MIGRATIONS)  # rows of the same file

    def rare(self, event: dict[str, Any], once_for: str) -> None:
        """A rare sighting's Prefect event (its fields), queued once per `once_for` and kept for its hour's summary."""
        payload = event["payload"]
        sighted = datetime.fromisoformat(payload["time"])
        hour = int(sighted.timestamp()) // HOUR_S * HOUR_S
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
        self.event(event, once_for)

    def event(self, event: dict[str, Any], once_for: str) -> None:
        """A Prefect event (its fields) for the central server, queued once per `once_for`."""
        stamped = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), **event}
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

    def to_summarize(
        self,
        closed: list[tuple[int, str, int]],
        station_id: str,
        now: float,
        settle_s: float,
        waiting: Iterable[str] = (),
    ) -> list[tuple[int, str, int]]:
        """Of (hour, station, version) closed hours with counts (from a day before the relay first ran on) and the
        quiet hours of `station_id` since it first ran (version 0; of the last day only), those not summarised at
        that version, oldest first; not an hour of a recording still `waiting` to be analysed (its file name):
        its detections are counted as they are written, before it is recorded as processed, so a summary made
        then would miss its listener."""
        held_back = _hours_of(waiting)
        started = self.first_started()
        done = dict(
            ((hour, station), version)
            for hour, station, version in self.database.execute("SELECT hour, station_id, version FROM summarized")
        )
        counted = {(hour, station) for hour, station, _ in closed}
        first_quiet = max(int(started) // HOUR_S, int(now - LOOK_BACK_S) // HOUR_S) * HOUR_S
        quiet = [
            (hour, station_id, 0)
            for hour in range(first_quiet, int(now - settle_s) - HOUR_S + 1, HOUR_S)
            if (hour, station_id) not in counted
        ]
        due = [item for item in closed if item[0] >= started - LOOK_BACK_S] + quiet
        return sorted(item for item in due if done.get(item[:2], -1) < item[2] and item[0] not in held_back)

    def summarized(self, hour: int, station_id: str, version: int) -> None:
        self.database.execute("INSERT OR REPLACE INTO summarized VALUES (?, ?, ?)", (hour, station_id, version))


def _hours_of(file_names: Iterable[str]) -> set[int]:
    """The hours (epoch seconds of their start) of recordings, from their file names."""
    starts = (name_parts_or_none(name)[1] for name in file_names)
    return {int(start.timestamp()) // HOUR_S * HOUR_S for start in starts if start is not None}


def hour_summary(
    station_id: str,
    hour: int,
    counts: pa.Table,
    rare: list[dict[str, Any]],
    listeners: tuple[set[str], set[str]],
    backlog: int,
    disk_free: float,
) -> str:
    """The markdown of a station's hour on the central server: what was heard (species, detections, best
    confidence, listeners), the rare sightings with links to the station's runs, and how the station is (its
    known listeners that sent no recording in the hour, `listeners`: (known, heard))."""
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
    known, heard = listeners
    silent = sorted(known - heard)
    lines += [
        "",
        f"Station: {backlog} recording(s) waiting, {disk_free:.0%} of its disk free; "
        f"{len(heard)} listener(s) sent recordings"
        + (f", {len(silent)} silent: {', '.join(silent)}." if silent else "."),
    ]
    return "\n".join(lines)


def confirmation(sighting: dict[str, Any], seen: Iterable[dict[str, Any]], window_s: float, by: str) -> dict | None:
    """The `birdflow.detection.confirmed` event when the rare-species event `sighting` and those `seen` on the server
    hold sightings of its species by two stations (`by`: or two listeners) within `window_s` of it; else None.

    The event's id comes from the group's earliest sighting: every station that finds the same group sends the
    same event, and the server keeps one."""
    species = sighting["payload"]["scientific_name"]
    at = datetime.fromisoformat(sighting["payload"]["time"])
    group = {
        event["id"]: event
        for event in [*seen, sighting]
        if event["payload"]["scientific_name"] == species
        and abs((datetime.fromisoformat(event["payload"]["time"]) - at).total_seconds()) <= window_s
    }
    sightings = sorted(group.values(), key=lambda event: (event["payload"]["time"], event["id"]))

    def who(event: dict[str, Any]) -> tuple[str, ...]:
        payload = event["payload"]
        return (payload["station_id"],) if by == "stations" else (payload["station_id"], payload["listener_id"])

    if len({who(event) for event in sightings}) < 2:
        return None
    payloads = [event["payload"] for event in sightings]
    first = payloads[0]
    keys = ("station_id", "listener_id", "time", "confidence", "run_url", "archive_key")
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"birdflow.confirmed/{species}/{sightings[0]['id']}")),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": CONFIRMED_EVENT,
        "resource": {
            "prefect.resource.id": f"birdflow.species.{species.lower().replace(' ', '-')}",
            "prefect.resource.name": first["common_name"],
            "birdflow.species": species,
        },
        "related": [
            {"prefect.resource.id": f"birdflow.station.{station}", "prefect.resource.role": "station"}
            for station in sorted({payload["station_id"] for payload in payloads})
        ],
        "payload": {
            "scientific_name": species,
            "common_name": first["common_name"],
            "stations": sorted({payload["station_id"] for payload in payloads}),
            "first_time": first["time"],
            "window_s": window_s,
            "sightings": [{key: payload.get(key, "") for key in keys} for payload in payloads],
        },
    }
