"""Finished recordings on disk: naming, content hashes, metadata sidecars and the atomic hand-over.

A recording is published by writing ``<id>.json`` (its metadata) and then renaming ``<id>.<ext>`` into the
recordings folder. The audio file appearing is the signal that it is complete; the executor picks it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from birdflow.core.errors import Unprocessable

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3")
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
FUTURE_START_ALLOWANCE = timedelta(hours=1)
_NAME_PATTERN = re.compile(r"^(?P<listener>[^_]+)_(?P<stamp>\d{8}T\d{6}Z)")
# A stream's partial file is named after its listener and start time, so that a crash leaves everything
# needed to publish it (the format is in the WAV header at its first bytes); listener ids have no "_".
PARTIAL_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_STREAM_PARTIAL_PATTERN = re.compile(r"^stream_(?P<listener>[^_]+)_(?P<stamp>\d{8}T\d{6}\.\d{6}Z)_[0-9a-f]+\.wav$")


class RecordingInfo(BaseModel):
    """What every recording carries downstream (the flow run's parameter)."""

    recording_id: str
    listener_id: str
    station_id: str
    start_time: datetime
    duration_s: float
    sample_rate: int
    channels: int = 1
    gaps: int = 0
    content_hash: str
    size_bytes: int
    file_name: str
    source: Literal["stream", "upload", "recovered", "folder", "archive", "backfill"] = "stream"
    # where the audio is read from when it is not in the recordings folder (a backfill source); never deleted
    source_path: str | None = None
    # set by RecordingStore.publish when the station held this recording already (a listener sent it again):
    # the copy was dropped; never stored or passed on
    resent: bool = Field(False, exclude=True)

    @field_validator("recording_id", "listener_id", "station_id", "file_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        """These become file names and archive keys: a run's parameters must not name another path."""
        if not value or value.startswith(".") or any(char in value for char in "/\\") or not value.isprintable():
            raise ValueError(f"{value!r} must be a plain name (no path separators, control characters or leading '.')")
        return value

    def archive_key(self, file_name: str) -> str:
        """station/listener/YYYY/MM/DD/file: the same in every archive backend."""
        day = self.start_time.astimezone(timezone.utc)
        return f"{self.station_id}/{self.listener_id}/{day:%Y/%m/%d}/{file_name}"

    def archive_names(self, archive_format: str) -> list[str]:
        """Names it may be archived under, the one `archive_format` prefers first: a WAV recording is
        archived as <id>.flac unless its samples do not fit FLAC (32-bit), and the station may have
        changed formats since."""
        if not self.file_name.endswith(".wav"):
            return [self.file_name]
        flac = self.recording_id + ".flac"
        return [flac, self.file_name] if archive_format == "flac" else [self.file_name, flac]

    @property
    def run_name(self) -> str:
        return f"{self.listener_id}-{self.start_time.astimezone(timezone.utc):{TIMESTAMP_FORMAT}}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def recording_id_for(listener_id: str, start_time: datetime, content_hash: str) -> str:
    """Listener and UTC start second, plus the content hash so two recordings never share a name."""
    stamp = start_time.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)
    return f"{listener_id}_{stamp}_{content_hash[:8]}"


class RecordingNameError(Unprocessable):
    """A file name whose start time cannot be: no such date, or later than the station's clock allows."""


def parse_file_name(name: str) -> tuple[str | None, datetime | None]:
    """listener01_20250101T120000Z.wav -> ("listener01", 2025-01-01 12:00:00 UTC); missing parts are None.
    RecordingNameError for a time that does not exist (20251341T256161Z)."""
    stem = Path(name).name
    match = _NAME_PATTERN.match(stem)
    if match:
        try:
            start = datetime.strptime(match["stamp"], TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            raise RecordingNameError(f"file name {stem!r}: {match['stamp']} is not a date and time") from None
        return match["listener"], start
    listener = stem.split("_", 1)[0] if "_" in stem else None
    return listener, None


def name_parts_or_none(name: str) -> tuple[str | None, datetime | None]:
    """parse_file_name for files found on a card or in a folder: an impossible time in the name is no time (the
    file's modification time stands in)."""
    try:
        return parse_file_name(name)
    except RecordingNameError:
        return Path(name).name.split("_", 1)[0], None


def checked_start(start: datetime, now: datetime) -> datetime:
    """A recording cannot start after it arrived: beyond FUTURE_START_ALLOWANCE (a listener's clock a little
    ahead), its name's time is wrong (RecordingNameError)."""
    if start > now + FUTURE_START_ALLOWANCE:
        raise RecordingNameError(
            f"the file name's start {start:%Y-%m-%dT%H:%M:%SZ} is after the station's clock "
            f"({now:%Y-%m-%dT%H:%M:%SZ}): "
            "check the listener's clock"
        )
    return start


class RecordingStore:
    """The partial and recordings folders of one station."""

    def __init__(
        self,
        partial_dir: Path,
        recordings_dir: Path,
        station_id: str,
        processed: Callable[[str], bool] = lambda recording_id: False,
    ):
        """`processed`: whether a recording id was analysed already (the processed record), so that a recording
        sent again is dropped rather than queued."""
        self.partial_dir = Path(partial_dir)
        self.recordings_dir = Path(recordings_dir)
        self.station_id = station_id
        self.processed = processed
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.recordings_dir.mkdir(parents=True, exist_ok=True)

    def new_stream_partial(self, listener_id: str, start_time: datetime) -> Path:
        stamp = start_time.astimezone(timezone.utc).strftime(PARTIAL_STAMP_FORMAT)
        return self.partial_dir / f"stream_{listener_id}_{stamp}_{uuid.uuid4().hex[:8]}.wav"

    def new_upload_partial(self, suffix: str) -> Path:
        """An upload is answered only once published: a crash before that leaves nothing worth keeping."""
        return self.partial_dir / f"upload_{uuid.uuid4().hex}{suffix}"

    def publish(
        self,
        partial: Path,
        *,
        listener_id: str,
        start_time: datetime,
        duration_s: float,
        sample_rate: int,
        channels: int,
        gaps: int,
        source: str,
    ) -> RecordingInfo:
        """Name the finished file after its content, write its metadata, then move it in atomically; a recording
        the station holds already (waiting, or processed) is dropped and returned with `resent` set."""
        content_hash = sha256_file(partial)
        recording_id = recording_id_for(listener_id, start_time, content_hash)
        info = RecordingInfo(
            recording_id=recording_id,
            listener_id=listener_id,
            station_id=self.station_id,
            start_time=start_time.astimezone(timezone.utc),
            duration_s=round(duration_s, 6),
            sample_rate=sample_rate,
            channels=channels,
            gaps=gaps,
            content_hash=content_hash,
            size_bytes=partial.stat().st_size,
            file_name=recording_id + partial.suffix.lower(),
            source=source,
        )
        if (self.recordings_dir / info.file_name).exists() or self.processed(recording_id):
            partial.unlink(missing_ok=True)  # the same audio of the same listener and start: held already
            return info.model_copy(update={"resent": True})
        self._move_in(partial, info)
        return info

    def hand_in(self, path: Path, info: RecordingInfo) -> None:
        """A copy of a file described elsewhere (a backfill's), queued as `info` says: the executor runs it."""
        partial = self.new_upload_partial(path.suffix.lower())
        try:
            shutil.copyfile(path, partial)
            self._move_in(partial, info)
        except OSError:
            partial.unlink(missing_ok=True)
            raise

    def _move_in(self, partial: Path, info: RecordingInfo) -> None:
        """The metadata first, then the audio, each moved in atomically: the executor sees both or neither."""
        sidecar_tmp = partial.with_suffix(".json")
        try:
            sidecar_tmp.write_text(info.model_dump_json())
        except OSError:
            sidecar_tmp.unlink(missing_ok=True)  # never a truncated sidecar (a full disk); the partial stays
            raise
        os.replace(sidecar_tmp, self.recordings_dir / f"{info.recording_id}.json")
        os.replace(partial, self.recordings_dir / info.file_name)

    def pending(self) -> list[Path]:
        """Published audio files, oldest first (a file finished while this runs is left out)."""
        files = []
        for entry in os.scandir(self.recordings_dir):
            if entry.name.lower().endswith(AUDIO_EXTENSIONS):
                try:
                    files.append((entry.stat().st_mtime, entry.path))
                except FileNotFoundError:
                    continue
        return [Path(path) for _, path in sorted(files)]


def is_inside(path: Path, roots: list[Path]) -> bool:
    """Whether `path`, with its symbolic links followed, lies under one of `roots`."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def parse_stream_partial(name: str) -> tuple[str, datetime] | None:
    """(listener id, start time) of a stream's partial file name, or None for any other file."""
    match = _STREAM_PARTIAL_PATTERN.match(name)
    if not match:
        return None
    start = datetime.strptime(match["stamp"], PARTIAL_STAMP_FORMAT).replace(tzinfo=timezone.utc)
    return match["listener"], start


def load_info(audio_path: Path) -> RecordingInfo | None:
    """The metadata published beside an audio file, or None when it was dropped in by hand."""
    sidecar = audio_path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    return RecordingInfo.model_validate(json.loads(sidecar.read_text()))


def remove_recording(audio_path: Path) -> None:
    audio_path.unlink(missing_ok=True)
    audio_path.with_suffix(".json").unlink(missing_ok=True)


def describe_audio_file(path: Path, station_id: str, source: str, modified: datetime | None = None) -> RecordingInfo:
    """Metadata for an audio file that arrived without a sidecar: listener and start time from its name
    (listener01_20250101T120000Z...), else "unknown" and the file's modification time. A FLAC copy from
    a birdflow archive is the recording it was made from: same content hash, same recording id."""
    import soundfile

    from birdflow.core.flac import flac_identity

    details = soundfile.info(str(path))
    listener, start = name_parts_or_none(path.name)
    start = start or modified or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    source_hash = flac_identity(path) if path.suffix.lower() == ".flac" else None
    content_hash = source_hash or sha256_file(path)
    recording_id = recording_id_for(listener or "unknown", start, content_hash)
    return RecordingInfo(
        recording_id=recording_id,
        listener_id=listener or "unknown",
        station_id=station_id,
        start_time=start,
        duration_s=details.duration,
        sample_rate=details.samplerate,
        channels=details.channels,
        content_hash=content_hash,
        size_bytes=path.stat().st_size,
        file_name=recording_id + path.suffix.lower(),
        source=source,
    )
