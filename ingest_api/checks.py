"""What an upload must be before it is accepted (no HTTP in here): a plain file name, a valid listener id,
audio of the type its name says, in a format BirdNET can use. Each refusal is a `Rejection` with the status
the API answers; messages name the problem, never a file on this server."""

from __future__ import annotations

import errno
from datetime import datetime
from pathlib import Path

import soundfile

from birdflow.core.errors import Refused
from birdflow.core.listener_ids import validate_listener_id
from birdflow.core.recordings import AUDIO_EXTENSIONS, RecordingNameError, checked_start, parse_file_name
from birdflow.core.wav import WavError, check_rate_and_channels, looks_like_wav, parse_header

FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class Rejection(Refused):
    """A request refused with a 4xx (or 503); `reason` labels the metric."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


def checked_file_name(name: str) -> str:
    if any(char in name for char in "/\\\0"):
        raise Rejection(400, "bad_file_name", f"file name {name!r} must not contain path separators or NUL")
    return name


def listener_and_start(name: str, now: datetime) -> tuple[str | None, datetime | None]:
    """The listener and start time a file's name gives; 400 for a time that does not exist or lies ahead."""
    try:
        listener, start = parse_file_name(name)
        return listener, start and checked_start(start, now)
    except RecordingNameError as exc:
        raise Rejection(400, "bad_start_time", str(exc)) from None


def checked_listener_id(listener_id: str) -> str:
    try:
        return validate_listener_id(listener_id)
    except ValueError as exc:
        raise Rejection(400, "bad_listener_id", str(exc)) from None


def checked_suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in AUDIO_EXTENSIONS:
        raise Rejection(
            415, "unsupported_type", f"unsupported file type {suffix or '(none)'}: send .wav, .flac or .mp3"
        )
    return suffix


def declared_length(header: str | None, limit: int) -> int:
    try:
        declared = int(header or 0)
    except ValueError:
        raise Rejection(400, "bad_length", "Content-Length is not a number") from None
    if declared > limit:
        raise Rejection(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit}")
    return declared


def sniff_audio(path: Path, suffix: str) -> None:
    """The upload must really be the audio type its name says: PCM WAV, FLAC or MP3."""
    with open(path, "rb") as file:
        head = file.read(4096)
    if suffix == ".wav":
        if not looks_like_wav(head):
            raise Rejection(415, "not_audio", "file is not a RIFF/WAVE file")
        try:
            parse_header(head)
        except WavError as exc:
            raise Rejection(415, "not_pcm", str(exc)) from exc
    elif suffix == ".flac" and head[:4] != b"fLaC":
        raise Rejection(415, "not_audio", "file is not FLAC")
    elif suffix == ".mp3" and not (
        head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    ):
        raise Rejection(415, "not_audio", "file is not MP3")


def audio_details(path: Path, suffix: str):
    """Duration and format of an upload; 415 for what cannot be decoded or analysed."""
    try:
        details = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError):  # their messages name the file on this server
        raise Rejection(
            415, "not_audio", f"file cannot be decoded as {suffix[1:].upper()} (corrupt or another format)"
        ) from None
    try:
        check_rate_and_channels(details.samplerate, details.channels)
    except WavError as exc:
        raise Rejection(415, "unsupported_format", str(exc)) from None
    return details


def write_failure(exc: OSError) -> Exception:
    """A full disk is the station's condition (507, try again later); other I/O errors are its fault."""
    if exc.errno in FULL_DISK_ERRORS:
        return Rejection(507, "insufficient_storage", f"insufficient storage: {exc.strerror}")
    return exc
