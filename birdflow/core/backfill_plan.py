"""Finding recordings to reprocess: in a local folder (an SD-card dump, the local archive) or under an
S3 prefix, filtered by time, station and listener. No Prefect here; the backfill flow sits on top."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from birdflow.core.recordings import AUDIO_EXTENSIONS, RecordingInfo, name_parts_or_none

ALREADY_PROCESSED = "already processed"
UNKNOWN_LISTENER = "unknown listener"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Candidate:
    """One audio file of a backfill source: a local path or an S3 key."""

    location: str
    name: str
    listener_id: str | None
    start_time: datetime | None
    modified: datetime
    size: int


def candidate(location: str, modified: datetime, size: int) -> Candidate:
    name = PurePosixPath(location).name
    listener, start = name_parts_or_none(name)
    return Candidate(location, name, listener, start, modified, size)


def local_candidates(folder: Path) -> Iterator[Candidate]:
    """The audio files under a folder; a link to a file outside it is not the folder's (a run would refuse it)."""
    inside = folder.resolve()
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file() and path.resolve().is_relative_to(inside):
            stat = path.stat()
            yield candidate(str(path), datetime.fromtimestamp(stat.st_mtime, timezone.utc), stat.st_size)


def s3_candidates(client, bucket: str, prefix: str) -> Iterator[Candidate]:
    """The audio objects under an S3 prefix, listed a page at a time (`client`: a boto3 S3 client)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if Path(item["Key"]).suffix.lower() in AUDIO_EXTENSIONS:
                yield candidate(item["Key"], item["LastModified"], item["Size"])


def select(
    found: Iterable[Candidate],
    since: datetime | None = None,
    until: datetime | None = None,
    listener: str | None = None,
    station: str | None = None,
) -> list[Candidate]:
    """Those recorded in [since, until) (start time from the name, else the file time), of the listener,
    and under a `<station>/` folder when a station is given (the archive's layout). A time without a zone (a date
    typed into the Prefect UI's form) is UTC."""
    since, until = (as_utc(value) if value else None for value in (since, until))
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


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def parse_s3_source(source: str) -> tuple[str, str] | None:
    """s3://bucket/prefix -> (bucket, prefix); None for anything else."""
    if not source.startswith("s3://"):
        return None
    bucket, _, prefix = source[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {source!r} (expected s3://bucket/prefix)")
    return bucket, prefix


@dataclass(frozen=True)
class Decision:
    """What a backfill does with one file, and why it skips it."""

    item: Candidate
    process: bool
    reason: str = ""  # ALREADY_PROCESSED, UNKNOWN_LISTENER or UNREADABLE when it is skipped
    detail: str = ""
    info: RecordingInfo | None = None


def plan(
    chosen: Iterable[Candidate],
    describe: Callable[[Candidate], RecordingInfo],
    processed: Callable[[str], bool],
    known_recording: Callable[[Candidate], str | None] = lambda item: None,
    listener_known: Callable[[str], bool] = lambda listener: True,
) -> Iterator[Decision]:
    """Each candidate decided in turn. A file a backfill saw before (same place, size and time) whose recording
    was processed is skipped without being read again, which is what makes an interrupted backfill resume cheaply."""
    for item in chosen:
        seen = known_recording(item)
        if seen and processed(seen):
            yield Decision(item, False, ALREADY_PROCESSED)
            continue
        listener = item.listener_id or "unknown"
        if not listener_known(listener):
            yield Decision(item, False, UNKNOWN_LISTENER, listener)
            continue
        try:
            info = describe(item)
        except Exception as exc:  # unreadable audio, a vanished object: reported, the rest goes on
            yield Decision(item, False, UNREADABLE, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        if processed(info.recording_id):
            yield Decision(item, False, ALREADY_PROCESSED, info=info)
        else:
            yield Decision(item, True, info=info)
