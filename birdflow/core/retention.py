"""What a station deletes so that its storage stops growing: the local archive beyond its caps (or, at
the disk floor, its oldest audio) and the temporary files of writes a crash interrupted.

Flow runs with their task runs, logs and artifacts are deleted by the Prefect server's own vacuum
service; cached task results and the detections dataset have their own pruning and compaction
(birdflow.core.results, birdflow.core.sinks). No Prefect here.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from birdflow.core.disk import MB
from birdflow.settings import Settings

GB = 1 << 30
DAY_S = 86400.0
FLOOR_HEADROOM = 1.1  # at the floor, free a little more than the floor, so the next recording fits
_DAY_FOLDERS = re.compile(r"(\d{4})/(\d{2})/(\d{2})$")


@dataclass
class Freed:
    files: int = 0
    bytes: int = 0

    def __iadd__(self, other: "Freed") -> "Freed":
        self.files += other.files
        self.bytes += other.bytes
        return self


@dataclass(frozen=True)
class ArchivedFile:
    day: str  # YYYY/MM/DD of the recording (archive layout), "" when the path has none
    modified: float
    size: int
    path: Path


def archived_files(root: Path) -> list[ArchivedFile]:
    """The local archive's audio, oldest recording day first (then oldest copy first)."""
    found = []
    for folder, _, names in os.walk(root):
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
    free_bytes: Optional[Callable[[], int]] = None,
    now: Optional[float] = None,
) -> Freed:
    """Delete the oldest archived audio while the archive is over `max_bytes`, older than `max_age_s`,
    or the disk has less than `free_target_bytes` free (0 turns a rule off)."""
    now = time.time() if now is None else now
    files = archived_files(Path(root)) if Path(root).is_dir() else []
    total = sum(item.size for item in files)
    freed = Freed()
    for item in files:
        too_old = max_age_s > 0 and now - item.modified > max_age_s
        too_big = max_bytes > 0 and total > max_bytes
        too_full = free_target_bytes > 0 and free_bytes is not None and free_bytes() < free_target_bytes
        if not (too_old or too_big or too_full):
            break
        item.path.unlink(missing_ok=True)
        total -= item.size
        freed += Freed(1, item.size)
        _remove_empty_folders(item.path.parent, Path(root))
    return freed


def remove_stale_files(
    folders: Iterable[Path], older_than_s: float, pattern: str = "*.partial", now: Optional[float] = None
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


def archive_retention(settings: Settings) -> Freed:
    """The local archive's caps and, at the disk floor, its oldest audio: always with an S3 archive (the
    local copies are all in S3 too), and with a local-only archive when local_archive_purge_at_floor."""
    floor_bytes = settings.unattended.min_free_disk_mb * MB
    purge_at_floor = settings.archive.archive_backend == "s3" or settings.unattended.local_archive_purge_at_floor
    return prune_local_archive(
        settings.local_archive_dir,
        max_bytes=int(settings.unattended.local_archive_max_gb * GB),
        max_age_s=settings.unattended.local_archive_max_days * DAY_S,
        free_target_bytes=int(floor_bytes * FLOOR_HEADROOM) if purge_at_floor else 0,
        free_bytes=lambda: shutil.disk_usage(settings.data_dir).free,
    )
