"""Detections as the files other tools read: Raven selection tables and Audacity label tracks (one per
recording, times within it), one CSV, eBird's record format (a checklist row per species, listener and hour)
and a Darwin Core Archive of occurrences (basisOfRecord MachineObservation). No Prefect here."""

from __future__ import annotations

import csv
import io
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from birdflow.core.errors import Refused

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("raven", "audacity", "csv", "ebird", "dwc")
# BirdNET's band: what a selection covers in frequency (BirdNET-Analyzer's tables say the same)
LOW_HZ, HIGH_HZ = 0, 15000
RAVEN_COLUMNS = [
    "Selection",
    "View",
    "Channel",
    "Begin Time (s)",
    "End Time (s)",
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Common Name",
    "Scientific Name",
    "Confidence",
    "Recording",
]
DWC = "http://rs.tdwg.org/dwc/terms/"
OCCURRENCE_TERMS = [
    "occurrenceID",
    "basisOfRecord",
    "eventID",
    "eventDate",
    "scientificName",
    "vernacularName",
    "decimalLatitude",
    "decimalLongitude",
    "geodeticDatum",
    "recordedBy",
    "identifiedBy",
    "identificationRemarks",
    "samplingProtocol",
    "occurrenceStatus",
]


class ExportError(Refused):
    """An export that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Place:
    """Where the detections were made: the station, and its coordinates when they are set."""

    station_id: str
    latitude: float | None = None
    longitude: float | None = None


def export(table: pa.Table, format: str, output: Path, place: Place) -> list[Path]:
    """Write `table` (detections, birdflow.core.detections.SCHEMA) in `format` under `output`: a folder, or
    for dwc a .zip file (a folder gets `<station>-dwca.zip`). Returns the files written."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    rows = sorted(table.to_pylist(), key=lambda row: (row["time"], row["listener_id"], row["scientific_name"]))
    if format == "dwc":
        archive = output if output.suffix == ".zip" else output / f"{place.station_id}-dwca.zip"
        if place.latitude is None or place.longitude is None:
            raise ExportError("a Darwin Core Archive needs the station's coordinates: set latitude and longitude")
        archive.parent.mkdir(parents=True, exist_ok=True)
        write_dwca(rows, archive, place)
        return [archive]
    if output.suffix:
        raise ExportError(f"{format} files go into a folder, not {output.name!r}")
    output.mkdir(parents=True, exist_ok=True)
    if format == "raven":
        return _per_recording(rows, output, ".BirdNET.selection.table.txt", raven_table)
    if format == "audacity":
        return _per_recording(rows, output, ".txt", audacity_labels)
    if format == "csv":
        return [_write(output / "detections.csv", detections_csv(rows))]
    return [_write(output / "ebird.csv", ebird_records(rows, place))]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _per_recording(
    rows: list[dict[str, Any]], folder: Path, suffix: str, render: Callable[[list[dict[str, Any]]], str]
) -> list[Path]:
    by_recording: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_recording[row["recording_id"]].append(row)
    return [
        _write(folder / f"{recording_id}{suffix}", render(sorted(found, key=lambda row: row["start_s"])))
        for recording_id, found in sorted(by_recording.items())
    ]


def _tsv(header: list[str] | None, lines: Iterable[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    if header:
        writer.writerow(header)
    writer.writerows(lines)
    return out.getvalue()


def raven_table(rows: list[dict[str, Any]]) -> str:
    """One recording's selection table, as Raven exports one (tab-separated, a selection per detection)."""
    return _tsv(
        RAVEN_COLUMNS,
        (
            [
                number,
                "Spectrogram 1",
                1,
                f"{row['start_s']:.3f}",
                f"{row['end_s']:.3f}",
                f"{LOW_HZ:.1f}",
                f"{HIGH_HZ:.1f}",
                row["common_name"],
                row["scientific_name"],
                f"{row['confidence']:.4f}",
                row["recording_id"],
            ]
            for number, row in enumerate(rows, start=1)
        ),
    )


def audacity_labels(rows: list[dict[str, Any]]) -> str:
    """One recording's label track: start, end and label (the common name and the confidence), tab-separated."""
    return _tsv(
        None,
        (
            [f"{row['start_s']:.6f}", f"{row['end_s']:.6f}", f"{row['common_name']} ({row['confidence']:.2f})"]
            for row in rows
        ),
    )


def detections_csv(rows: list[dict[str, Any]]) -> str:
    """Every column of the detections table, times in ISO 8601 UTC."""
    out = io.StringIO()
    columns = list(rows[0]) if rows else ["time"]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _text(value) for key, value in row.items()})
    return out.getvalue()


def _text(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def ebird_records(rows: list[dict[str, Any]], place: Place) -> str:
    """eBird's record format (extended), no header: per listener, hour and species one record with the count
    unknown ("X", presence), a stationary hour of effort, and BirdNET's detections in the species comments."""
    groups: dict[tuple[str, datetime, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        hour = row["time"].replace(minute=0, second=0, microsecond=0)
        groups[(row["listener_id"], hour, row["scientific_name"])].append(row)
    lines = []
    for (listener, hour, scientific), found in sorted(groups.items()):
        genus, _, species = scientific.partition(" ")
        lines.append(
            [
                found[0]["common_name"],
                genus,
                species,
                "X",
                f"BirdNET: {len(found)} detection(s), best confidence {max(row['confidence'] for row in found):.2f}",
                f"{place.station_id} {listener}",
                "" if place.latitude is None else f"{place.latitude:.6f}",
                "" if place.longitude is None else f"{place.longitude:.6f}",
                f"{hour:%m/%d/%Y}",
                f"{hour:%H:%M}",
                "",
                "",
                "Stationary",
                1,
                60,
                "N",
                "",
                "",
                f"Recorded by birdflow station {place.station_id}, identified by {found[0]['model_version']}",
            ]
        )
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(lines)
    return out.getvalue()


def occurrences(rows: list[dict[str, Any]], place: Place) -> list[list[Any]]:
    """A Darwin Core occurrence per detection, in OCCURRENCE_TERMS order."""
    return [
        [
            f"{row['recording_id']}:{row['start_s']:g}:{row['scientific_name'].replace(' ', '_')}:{row['analysis_id']}",
            "MachineObservation",
            row["recording_id"],
            f"{_text(row['time'])}/{_text(row['time'] + timedelta(seconds=row['end_s'] - row['start_s']))}",
            row["scientific_name"],
            row["common_name"],
            place.latitude,
            place.longitude,
            "WGS84",
            f"{place.station_id}/{row['listener_id']}",
            row["model_version"],
            f"confidence {row['confidence']:.4f}",
            "passive acoustic monitoring, BirdNET on 3 s windows",
            "present",
        ]
        for row in rows
    ]


def write_dwca(rows: list[dict[str, Any]], archive: Path, place: Place) -> None:
    """A Darwin Core Archive: meta.xml describing occurrence.txt (tab-separated, a header line)."""
    fields = "\n".join(
        f'    <field index="{index}" term="{DWC}{term}"/>' for index, term in enumerate(OCCURRENCE_TERMS)
    )
    meta = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<archive xmlns="http://rs.tdwg.org/dwc/text/">\n'
        '  <core encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy=""'
        f' ignoreHeaderLines="1" rowType="{DWC}Occurrence">\n'
        "    <files><location>occurrence.txt</location></files>\n"
        '    <id index="0"/>\n'
        f"{fields}\n"
        "  </core>\n"
        "</archive>\n"
    )
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("meta.xml", meta)
        zipped.writestr("occurrence.txt", _tsv(OCCURRENCE_TERMS, occurrences(rows, place)))
