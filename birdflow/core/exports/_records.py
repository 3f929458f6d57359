"""The records every export is made of: a detection with its id and the verdict a person gave it, and what
the station knows beside them (where it is, what each listener recorded, where the audio is)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from birdflow.core.detections import SCHEMA
from birdflow.core.errors import Refused
from birdflow.core.ledger import RecordedSpan
from birdflow.core.reviews import id_of

Record = dict[str, Any]
REVIEWED = ("confirmed", "relabelled")  # a person says what was heard
VERDICT_COLUMNS = ["verdict", "reviewed_scientific_name", "reviewed_common_name", "reviewer", "reviewed_at"]
# the CSV's header, the same every day (an empty day's too)
CSV_COLUMNS = [*SCHEMA.names, "detection_id", *VERDICT_COLUMNS]


class ExportError(Refused):
    """An export that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Place:
    """Where the detections were made: the station, its coordinates and time zone (IANA name), its country and
    state codes (ISO 3166), and how far from the coordinates a listener may be."""

    station_id: str
    latitude: float | None = None
    longitude: float | None = None
    timezone: str | None = None
    country_code: str = ""
    state_code: str = ""
    uncertainty_m: float = 100.0

    def require_coordinates(self, what: str) -> tuple[float, float]:
        if self.latitude is None or self.longitude is None:
            raise ExportError(f"{what} needs the station's coordinates: set latitude and longitude")
        return self.latitude, self.longitude


@dataclass(frozen=True)
class Publishing:
    """How records are published: the dataset's title, licence (an SPDX id GBIF accepts), rights holder and
    contact (Darwin Core's eml.xml), and the confidence from which eBird takes an unreviewed detection."""

    title: str = ""
    license: str = "CC-BY-4.0"
    rights_holder: str = ""
    contact_name: str = ""
    contact_email: str = ""
    ebird_min_confidence: float = 0.75


@dataclass(frozen=True)
class Evidence:
    """What the station knows beside the detections: verdicts by detection id (reviews.REVIEWS_SCHEMA rows), what
    was recorded by recording id (eBird's effort), each recording's archived audio (Raven's Begin Path) and a
    link a browser opens to each clip (Darwin Core's associatedMedia)."""

    verdicts: Mapping[str, Record] = field(default_factory=dict)
    recorded: Mapping[str, RecordedSpan] = field(default_factory=dict)
    audio_paths: Mapping[str, str] = field(default_factory=dict)
    clip_links: Mapping[str, str] = field(default_factory=dict)


def exported_records(table: pa.Table, verdicts: Mapping[str, Record], reviewed_only: bool = False) -> list[Record]:
    """The detections in time order, each with its `detection_id` (which a relabel never changes), its verdict
    columns, and the label it is exported under: `label_scientific_name`, `label_common_name` (what a person said
    it was, else the model's) and `label_confidence` (the model's score for that label in that window; None where
    the model gave the new label none)."""
    rows = sorted(table.to_pylist(), key=lambda row: (row["time"], row["listener_id"], row["scientific_name"]))
    scores = {_window(row) + (row["scientific_name"],): row["confidence"] for row in rows}
    records = []
    for row in rows:
        detection_id = id_of(row)
        verdict = verdicts.get(detection_id)
        if reviewed_only and (verdict is None or verdict["verdict"] not in REVIEWED):
            continue
        record = {**row, "detection_id": detection_id, **dict.fromkeys(VERDICT_COLUMNS)}
        record.update(
            label_scientific_name=row["scientific_name"],
            label_common_name=row["common_name"],
            label_confidence=row["confidence"],
        )
        if verdict is not None:
            record.update({column: verdict[column] for column in VERDICT_COLUMNS})
            if verdict["verdict"] == "relabelled":
                scientific = verdict["reviewed_scientific_name"]
                record.update(
                    label_scientific_name=scientific,
                    label_common_name=verdict["reviewed_common_name"],
                    label_confidence=scores.get(_window(row) + (scientific,)),
                )
        records.append(record)
    return records


def _window(row: Record) -> tuple[str, str, float]:
    return row["recording_id"], row["analysis_id"], row["start_s"]


def is_reviewed(record: Record) -> bool:
    return record["verdict"] in REVIEWED


def identified_by(record: Record) -> str:
    """The reviewer of a reviewed record, else the model."""
    return record["reviewer"] if is_reviewed(record) else record["model_version"]


def review_note(record: Record) -> str:
    """What a person said of the record, in words ('' when nobody did)."""
    if record["verdict"] == "confirmed":
        return f"confirmed by {record['reviewer']}"
    if record["verdict"] == "relabelled":
        return (
            f"relabelled by {record['reviewer']} from {record['common_name']} (BirdNET confidence "
            f"{record['confidence']:.4f})"
        )
    if record["verdict"] == "rejected":
        return f"rejected by {record['reviewer']}"
    return ""
