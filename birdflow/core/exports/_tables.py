"""Tables of detections: Raven selection tables as BirdNET-Analyzer writes them (so Raven Pro can follow each
selection to the sound), Audacity label tracks, and one CSV with every column and the verdicts."""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from birdflow.core.exports._records import CSV_COLUMNS, Evidence, ExportError, Record

# BirdNET's band: what a selection covers in frequency (BirdNET-Analyzer's tables say the same)
LOW_HZ, HIGH_HZ = 0, 15000
# BirdNET-Analyzer's columns, then what Raven and a reviewer want beside them
RAVEN_COLUMNS = [
    *("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)"),
    *("Common Name", "Species Code", "Confidence", "Begin Path", "File Offset (s)"),
    *("Begin File", "Scientific Name", "Recording", "Detection ID", "Verdict", "Reviewer"),
]


def write_text(path: Path, text: str) -> Path:
    """The file, written fresh: a link planted in the output folder is replaced, never followed."""
    if path.is_symlink():
        raise ExportError(f"{path.name} in the output folder is a link: remove it, exports do not follow links")
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
        file.write(text)
    os.replace(partial, path)
    return path


def per_recording(
    records: list[Record], folder: Path, suffix: str, render: Callable[[list[Record]], str]
) -> list[Path]:
    by_recording: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_recording[record["recording_id"]].append(record)
    return [
        write_text(folder / f"{recording_id}{suffix}", render(sorted(found, key=lambda record: record["start_s"])))
        for recording_id, found in sorted(by_recording.items())
    ]


def _tsv(header: list[str] | None, lines: Iterable[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    if header:
        writer.writerow(header)
    writer.writerows(lines)
    return out.getvalue()


def _confidence(record: Record, digits: int = 4) -> str:
    return "" if record["label_confidence"] is None else f"{record['label_confidence']:.{digits}f}"


def raven_table(records: list[Record], evidence: Evidence) -> str:
    """One recording's selection table: BirdNET-Analyzer's columns (Species Code is the model's label, as it
    writes one it has no eBird code for), Begin Path and File Offset (s) naming the archived audio."""
    lines = []
    for number, record in enumerate(records, start=1):
        path = evidence.audio_paths.get(record["recording_id"], "")
        lines.append(
            [
                number,
                "Spectrogram 1",
                1,
                f"{record['start_s']:.3f}",
                f"{record['end_s']:.3f}",
                f"{LOW_HZ:.1f}",
                f"{HIGH_HZ:.1f}",
                record["label_common_name"],
                f"{record['label_scientific_name']}_{record['label_common_name']}",
                _confidence(record),
                path,
                f"{record['start_s']:.3f}",
                path.rsplit("/", 1)[-1],
                record["label_scientific_name"],
                record["recording_id"],
                record["detection_id"],
                record["verdict"] or "",
                record["reviewer"] or "",
            ]
        )
    return _tsv(RAVEN_COLUMNS, lines)


def audacity_labels(records: list[Record]) -> str:
    """One recording's label track: start, end and label (the common name and the confidence), tab-separated."""
    return _tsv(
        None,
        (
            [
                f"{record['start_s']:.6f}",
                f"{record['end_s']:.6f}",
                f"{record['label_common_name']} ({_confidence(record, 2) or record['verdict']})",
            ]
            for record in records
        ),
    )


def detections_csv(records: list[Record]) -> str:
    """Every column of the detections table as the model gave it, the detection's id (what `birdflow review
    import` takes) and its verdict; times in ISO 8601 UTC. The header is the same on a day without detections."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({column: _text(record[column]) for column in CSV_COLUMNS})
    return out.getvalue()


def _text(value: Any) -> Any:
    return iso_utc(value) if isinstance(value, datetime) else value


def iso_utc(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
