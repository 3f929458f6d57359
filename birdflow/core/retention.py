"""What a station deletes so that its storage stops growing: the local archive beyond its caps, at the
disk floor copies of what S3 holds (the only copies only when the operator chose so), and the temporary
files of writes a crash interrupted. Nothing archived goes silently: each deletion is logged and journalled.

Flow runs with their task runs, logs and artifacts are deleted by the Prefect server's own vacuum
service; cached task results and the detections dataset have their own pruning and compaction
(birdflow.core.results, birdflow.core.sinks). No Prefect here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("birdflow.retention")
GB = 1 << 30
CLIPS_FOLDER = "clips"  # under the local archive's root
DAY_S = 86400.0
FLOOR_HEADROOM = 1.1  # at the floor, free a little more than the floor, so the next recording fits
_DAY_FOLDERS = re.compile(r"(\d{4})/(\d{2})/(\d{2})$")


@dataclass
class Freed:
    files: int = 0
    bytes: int = 0

    def __iadd__(self, other: Freed) -> Freed:
        self.files += other.files
        self.bytes += other.bytes
        return self


@dataclass(frozen=True)
class ArchivedFile:
    day: str  # YYYY/MM/DD of the recording (archive layout), "" when the path has none
    modified: float
    size: int
    path: Path

    @property
    def recording_id(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class Purged:
    """An archived recording deleted, and why: `age` or `size` (the local archive's caps), `floor` (at the
    disk floor, the only copy: only when local_archive_purge_at_floor), `floor-copy` (a copy of S3's)."""

    recording_id: str
    path: str
    size: int
    reason: str


def archived_files(root: Path) -> list[ArchivedFile]:
    """The local archive's recordings, oldest recording day first (then oldest copy first). Clips are not
    among them: they are kept by their own rules (birdflow.core.clips), a species' best never deleted."""
    found = []
    for folder, subfolders, names in os.walk(root):
        if Path(folder) == Path(root) and CLIPS_FOLDER in subfolders:
            subfolders.remove(CLIPS_FOLDER)
        match = _DAY_FOLDERS.search(Path(folder).as_posix())
        day = "/".join(match.groups()) if match else ""
        for name in names:
            if name.endswith(".partial"):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append(ArchivedFile(day, stat.st_mtime, stat.st_size, path))
    found.sort(key=lambda item: (item.day, item.modified))
    return found


def prune_local_archive(
    root: Path,
    *,
    max_bytes: int = 0,
    max_age_s: float = 0.0,
    free_target_bytes: int = 0,
    free_bytes: Callable[[], int] | None = None,
    floor_reason: str = "floor",
    worth: Callable[[str], int] = lambda recording_id: 1,
    now: float | None = None,
) -> list[Purged]:
    """Delete archived audio older than `max_age_s` or over `max_bytes`, oldest first; then, while the disk
    has less than `free_target_bytes` free, the least worth first (`worth` of a recording id: 0 for one
    without detections), oldest first among equals (0 turns a rule off). Returns what went, and why."""
    now = time.time() if now is None else now
    files = archived_files(Path(root)) if Path(root).is_dir() else []
    total = sum(item.size for item in files)
    purged: list[Purged] = []

    def delete(item: ArchivedFile, reason: str) -> None:
        nonlocal total
        item.path.unlink(missing_ok=True)
        total -= item.size
        purged.append(Purged(item.recording_id, str(item.path), item.size, reason))
        _remove_empty_folders(item.path.parent, Path(root))

    left = []
    for item in files:
        if max_age_s > 0 and now - item.modified > max_age_s:
            delete(item, "age")
        elif max_bytes > 0 and total > max_bytes:
            delete(item, "size")
        else:
            left.append(item)
    if free_target_bytes > 0 and free_bytes is not None:
        for item in sorted(left, key=lambda item: worth(item.recording_id) > 0):  # stable: oldest first within
            if free_bytes() >= free_target_bytes:
                break
            delete(item, floor_reason)
    return purged


def remove_stale_files(
    folders: Iterable[Path], older_than_s: float, pattern: str = "*.partial", now: float | None = None
) -> Freed:
    """Files matching `pattern` not touched for `older_than_s`: by default the `*.partial` files of a copy
    or write a crash interrupted."""
    now = time.time() if now is None else now
    freed = Freed()
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).rglob(pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if now - stat.st_mtime > older_than_s:
                path.unlink(missing_ok=True)
                freed += Freed(1, stat.st_size)
    return freed


def _remove_empty_folders(folder: Path, root: Path) -> None:
    root = root.resolve()
    folder = folder.resolve()
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


class PurgeJournal:
    """Deletions not yet announced: JSON lines, appended by whichever process deleted, taken by maintenance."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def add(self, purged: Iterable[Purged]) -> None:
        lines = "".join(json.dumps(asdict(item)) + "\n" for item in purged)
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as journal:
                journal.write(lines)

    def take(self) -> list[Purged]:
        """What the journal holds, emptied (a line cut by a crash is skipped)."""
        taking = self.path.with_suffix(".taking")
        try:
            os.replace(self.path, taking)
        except FileNotFoundError:
            pass
        if not taking.exists():
            return []
        purged = []
        for line in taking.read_text().splitlines():
            try:
                purged.append(Purged(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return purged

    def taken(self) -> None:
        """The entries take() returned were announced."""
        self.path.with_suffix(".taking").unlink(missing_ok=True)
