"""One Arrow table per analyzed recording: the unit every sink writes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta

import pyarrow as pa

from birdflow.core.birdnet import Detection
from birdflow.core.recordings import RecordingInfo

SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("station_id", pa.string(), nullable=False),
        pa.field("listener_id", pa.string(), nullable=False),
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("scientific_name", pa.string(), nullable=False),
        pa.field("common_name", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("analysis_id", pa.string(), nullable=False),
        # archive key of the detection's clip without extension (.flac, .png); null when it has none
        pa.field("clip_key", pa.string(), nullable=True),
    ]
)
# Columns that identify a series in InfluxDB (tags); the rest are fields.
TAG_COLUMNS = [
    "station_id",
    "listener_id",
    "recording_id",
    "scientific_name",
    "common_name",
    "model_version",
    "analysis_id",
]


def detections_table(
    recording: RecordingInfo,
    detections: Iterable[Detection],
    model_version: str,
    analysis_id: str,
    clips: Mapping[tuple[float, str], str] | None = None,
) -> pa.Table:
    """Detection time is the recording's start plus the window's offset; `clips` maps (start_s, scientific
    name) to the clip's key."""
    rows = list(detections)
    clips = clips or {}
    return pa.table(
        {
            "time": [recording.start_time + timedelta(seconds=d.start_s) for d in rows],
            "station_id": [recording.station_id] * len(rows),
            "listener_id": [recording.listener_id] * len(rows),
            "recording_id": [recording.recording_id] * len(rows),
            "scientific_name": [d.scientific_name for d in rows],
            "common_name": [d.common_name for d in rows],
            "confidence": [round(d.confidence, 6) for d in rows],
            "start_s": [d.start_s for d in rows],
            "end_s": [d.end_s for d in rows],
            "model_version": [model_version] * len(rows),
            "analysis_id": [analysis_id] * len(rows),
            "clip_key": [clips.get((d.start_s, d.scientific_name)) for d in rows],
        },
        schema=SCHEMA,
    )


def summary(table: pa.Table) -> str:
    """One line of what a recording held: "3 detections: Dark-eyed Junco x2 (best 0.92), Pine Siskin (0.71)"."""
    if table.num_rows == 0:
        return "no detections"
    best: dict[str, list[float]] = {}
    for name, confidence in zip(table.column("common_name").to_pylist(), table.column("confidence").to_pylist()):
        best.setdefault(name, []).append(confidence)
    ordered = sorted(best.items(), key=lambda item: (-len(item[1]), -max(item[1]), item[0]))
    parts = [
        f"{name} x{len(scores)} (best {max(scores):.2f})" if len(scores) > 1 else f"{name} ({scores[0]:.2f})"
        for name, scores in ordered
    ]
    noun = "detection" if table.num_rows == 1 else "detections"
    return f"{table.num_rows} {noun}: " + ", ".join(parts)


def artifact_rows(table: pa.Table, rare_species: set[str], link=lambda key: key) -> list[dict]:
    """The run's table artifact: one row per detection, time of day first, rare ones marked, with where its clip
    and spectrogram are (`link` turns an archive key into an address)."""
    rows = []
    for row in table.to_pylist():
        clip = row.get("clip_key")
        rows.append(
            {
                "time": row["time"].strftime("%Y-%m-%d %H:%M:%S UTC"),
                "species": f"{row['common_name']} ({row['scientific_name']})",
                "confidence": round(row["confidence"], 3),
                "offset_s": f"{row['start_s']:g}-{row['end_s']:g}",
                "listener": row["listener_id"],
                "rare": "rare" if row["scientific_name"] in rare_species else "",
                "clip": link(clip + ".flac") if clip else "",
                "spectrogram": link(clip + ".png") if clip else "",
            }
        )
    return rows
