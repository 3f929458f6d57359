"""The station's SQLite state files as its processes open them, and what became of damaged ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from birdflow.core.ledger import ProcessedLedger
from birdflow.core.local_db import DAMAGED_MARK
from birdflow.settings import Settings


def processed_ledger(settings: Settings) -> ProcessedLedger:
    """The processed record, rebuilt from the station's detection files if it is ever found damaged."""
    return ProcessedLedger(settings.processed_record_file, settings.detections_dir, settings.recordings_dir)


@dataclass(frozen=True, order=True)
class DamagedCopy:
    """A state file found damaged, moved aside (and rebuilt in its place): kept until a person removes it."""

    file: str
    kept_as: str


def damaged_copies(state_dir: Path) -> list[DamagedCopy]:
    return sorted(
        DamagedCopy(path.name.partition(DAMAGED_MARK)[0], path.name)
        for path in state_dir.glob(f"*{DAMAGED_MARK}*")
        if not path.name.endswith(("-wal", "-shm"))
    )
