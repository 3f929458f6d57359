"""eBird's Record Format (Extended), as eBird's import reads it: no header, 19 columns, one record per
listener, local hour and species; a stationary count whose start and duration are what that listener recorded in
that hour; birds only."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from birdflow.core.exports._records import (
    ExportError,
    Place,
    Publishing,
    Record,
    is_reviewed,
    review_note,
)
from birdflow.core.ledger import RecordedSpan
from birdflow.core.taxa import is_bird

HOUR = timedelta(hours=1)


def ebird_chosen(records: list[Record], min_confidence: float) -> list[Record]:
    """What eBird takes: birds, never a rejected detection; reviewed ones, and unreviewed ones from
    `min_confidence`."""
    return [
        record
        for record in records
        if is_bird(record["label_scientific_name"], record["label_common_name"])
        and record["verdict"] != "rejected"
        and (is_reviewed(record) or record["confidence"] >= min_confidence)
    ]


def ebird_records(
    records: list[Record], place: Place, recorded: Mapping[str, RecordedSpan], publishing: Publishing
) -> str:
    """The records (exported_records) as eBird's import reads them. Refused without coordinates, time zone or
    country code: eBird places each checklist by them."""
    latitude, longitude = place.require_coordinates("eBird's record format")
    if not place.timezone:
        raise ExportError("eBird records are in local time: set timezone (or latitude and longitude to find it)")
    if not place.country_code:
        raise ExportError("eBird records need the station's country: set country_code (and state_code)")
    zone = ZoneInfo(place.timezone)
    chosen = ebird_chosen(records, publishing.ebird_min_confidence)
    effort = recorded_per_hour(spans_of(chosen, recorded), zone)
    groups: dict[tuple[str, datetime, str], list[Record]] = defaultdict(list)
    for record in chosen:
        groups[(record["listener_id"], local_hour(record["time"], zone), record["label_scientific_name"])].append(
            record
        )
    lines = []
    for (listener, hour, scientific), found in sorted(groups.items()):
        began, seconds = effort.get((listener, hour), (hour, 0.0))
        local_start = began.astimezone(zone)
        genus, _, species = scientific.partition(" ")
        lines.append(
            [
                found[0]["label_common_name"],
                genus,
                species,
                "X",
                _species_comments(found),
                f"{place.station_id} {listener}",
                f"{latitude:.6f}",
                f"{longitude:.6f}",
                f"{local_start:%m/%d/%Y}",
                f"{local_start:%H:%M}",
                place.state_code,
                place.country_code,
                "Stationary",
                1,
                min(60, max(1, math.ceil(seconds / 60))),
                "N",
                "",
                "",
                f"Automated recording: birdflow station {place.station_id}, listener {listener}; duration is the time "
                f"it recorded in this hour; identified by {found[0]['model_version']}, reviewed detections marked",
            ]
        )
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(lines)
    return out.getvalue()


def _species_comments(found: list[Record]) -> str:
    scored = [record["label_confidence"] for record in found if record["label_confidence"] is not None]
    best = f", best confidence {max(scored):.2f}" if scored else ""
    notes = sorted({review_note(record) for record in found if is_reviewed(record)})
    return f"BirdNET: {len(found)} detection(s){best}" + "".join(f"; {note}" for note in notes)


def local_hour(moment: datetime, zone: ZoneInfo) -> datetime:
    """The start (in UTC) of the local clock hour holding `moment`: a half-hour zone's hours start at :30 UTC,
    and the hour a clock change repeats is two hours."""
    local = moment.astimezone(zone)
    return local.replace(minute=0, second=0, microsecond=0).astimezone(timezone.utc)


def spans_of(records: list[Record], recorded: Mapping[str, RecordedSpan]) -> list[RecordedSpan]:
    """What was recorded, of the recordings the records come from: the ledger's word where it has one, else the
    recording from its start up to the end of its last detection (records older than the ledger's durations)."""
    spans = {}
    for record in records:
        recording_id = record["recording_id"]
        if recording_id in recorded:
            spans[recording_id] = recorded[recording_id]
            continue
        start = record["time"] - timedelta(seconds=record["start_s"])
        known = spans.get(recording_id)
        duration = max(record["end_s"], known.duration_s if known else 0.0)
        spans[recording_id] = RecordedSpan(record["listener_id"], start, duration)
    return list(spans.values())


def recorded_per_hour(spans: list[RecordedSpan], zone: ZoneInfo) -> dict[tuple[str, datetime], tuple[datetime, float]]:
    """(listener, local hour start in UTC) -> (when it first recorded in that hour, seconds it recorded in it);
    overlapping recordings of one listener count once."""
    by_listener: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for span in spans:
        by_listener[span.listener_id].append((span.start, span.end))
    effort: dict[tuple[str, datetime], tuple[datetime, float]] = {}
    for listener, intervals in by_listener.items():
        for start, end in _merged(intervals):
            hour = local_hour(start, zone)
            while hour < end:
                began, finished = max(start, hour), min(end, hour + HOUR)
                if began < finished:
                    first, seconds = effort.get((listener, hour), (began, 0.0))
                    effort[(listener, hour)] = (min(first, began), seconds + (finished - began).total_seconds())
                hour = local_hour(hour + HOUR, zone)
    return effort


def _merged(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
