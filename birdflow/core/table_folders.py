"""Where a station keeps each of its tables: plain paths, so that the settings can name them without loading the
Parquet writer (the supervisor and the ingest API never do)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TableFolders:
    """The folders of a station's tables (the settings' `table_folders`)."""

    detections: Path
    species_hourly: Path
    listener_health: Path
    reviews: Path
