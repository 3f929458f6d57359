"""Finding recordings to reprocess: in a local folder (an SD-card dump, the local archive) or under an
S3 prefix, filtered by time, station and listener. No Prefect here; the backfill flow sits on top."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Optional

from birdflow.core.recordings import AUDIO_EXTENSIONS, parse_file_name


@dataclass(frozen=True)
class Candidate:
    """One audio file of a backfill source: a local path or an S3 key."""

    location: str
    name: str
    listener_id: Optional[str]
    start_time: Optional[datetime]
    modified: datetime
    size: int


def candidate(location: str, modified: datetime, size: int) -> Candidate:
    name = PurePosixPath(location).name
    listener, start = parse_file_name(name)
    return Candidate(location, name, listener, start, modified, size)


def local_candidates(folder: Path) -> Iterator[Candidate]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            stat = path.stat()
            yield candidate(str(path), datetime.fromtimestamp(stat.st_mtime, timezone.utc), stat.st_size)


def select(
    found: Iterable[Candidate],
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
    listener: Optional[str] = None,
    station: Optional[str] = None,
) -> list[Candidate]:
    """Those recorded in [since, until) (start time from the name, else the file time), of the listener,
    and under a `<station>/` folder when a station is given (the archive's layout)."""
    chosen = []
    for item in found:
        when = item.start_time or item.modified
        if since and when < since or until and when >= until:
            continue
        if listener and item.listener_id != listener:
            continue
        if station and station not in PurePosixPath(item.location.replace("\\", "/")).parts[:-1]:
            continue
        chosen.append(item)
    return chosen


def parse_s3_source(source: str) -> Optional[tuple[str, str]]:
    """s3://bucket/prefix -> (bucket, prefix); None for anything else."""
    if not source.startswith("s3://"):
        return None
    bucket, _, prefix = source[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {source!r} (expected s3://bucket/prefix)")
    return bucket, prefix
