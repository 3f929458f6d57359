"""Detections as the files other tools read, each as that tool expects it: Raven selection tables and Audacity
label tracks (one per recording), one CSV, eBird's record format and a Darwin Core Archive GBIF can publish.

Every export starts from the same records (`_records.py`): a detection, its id, and the verdict a person gave it.
No Prefect here.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from birdflow.core.export_formats import FORMATS
from birdflow.core.exports._darwin_core import write_dwca
from birdflow.core.exports._ebird import ebird_records
from birdflow.core.exports._records import (
    CSV_COLUMNS,
    Evidence,
    ExportError,
    Place,
    Publishing,
    Record,
    exported_records,
)
from birdflow.core.exports._tables import audacity_labels, detections_csv, per_recording, raven_table, write_text

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "Evidence",
    "ExportError",
    "Place",
    "Publishing",
    "Record",
    "export",
    "exported_records",
]


def export(
    table: pa.Table,
    format: str,
    output: Path,
    place: Place,
    evidence: Evidence | None = None,
    publishing: Publishing | None = None,
    reviewed_only: bool = False,
) -> list[Path]:
    """Write `table` (detections, birdflow.core.detections.SCHEMA) in `format` under `output`: a folder, or for
    dwc a .zip file (a folder gets `<station>-dwca.zip`). Returns the files written; refuses (ExportError)
    before writing anything when the export cannot be what its reader expects."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    evidence = evidence or Evidence()
    publishing = publishing or Publishing()
    records = exported_records(table, evidence.verdicts, reviewed_only)
    if format == "dwc":
        archive = output if output.suffix == ".zip" else output / f"{place.station_id}-dwca.zip"
        write_dwca(records, archive, place, evidence, publishing)
        return [archive]
    if output.suffix:
        raise ExportError(f"{format} files go into a folder, not {output.name!r}")
    if format == "ebird":
        text = ebird_records(records, place, evidence.recorded, publishing)  # refused before the folder is made
        output.mkdir(parents=True, exist_ok=True)
        return [write_text(output / "ebird.csv", text)]
    output.mkdir(parents=True, exist_ok=True)
    if format == "raven":
        suffix = ".BirdNET.selection.table.txt"
        return per_recording(records, output, suffix, lambda found: raven_table(found, evidence))
    if format == "audacity":
        return per_recording(records, output, ".txt", audacity_labels)
    return [write_text(output / "detections.csv", detections_csv(records))]
