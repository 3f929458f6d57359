"""POST /recordings_upload: one finished recording as multipart/form-data, `file` and an optional
`listener_id` (the protocol document, section 2). It is answered only once the recording is published."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from birdflow.app import metrics
from birdflow.core.disk import InsufficientStorage
from birdflow.core.recordings import RecordingStore
from ingest_api.checks import (
    Rejection,
    audio_details,
    checked_file_name,
    listener_and_start,
    checked_listener_id,
    checked_suffix,
    declared_length,
    sniff_audio,
    write_failure,
)
from ingest_api.deps import StationDep, TokenDep

UPLOAD_READ_BYTES = 1 << 20
router = APIRouter()


@router.post("/recordings_upload")
async def recordings_upload(request: Request, station: StationDep, token: TokenDep):
    settings = station.settings
    listener_id = None
    partial = None
    try:
        sender = station.access.upload_sender(token)  # before a byte of the body is read
        declared_length(request.headers.get("content-length"), settings.ingest.max_upload_bytes)
        try:
            station.disk.require_room()
        except InsufficientStorage as exc:
            raise Rejection(507, "insufficient_storage", str(exc)) from None
        form = await _read_form(request)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise Rejection(400, "bad_form", "missing the 'file' field")
        name = checked_file_name(upload.filename or "")
        name_listener, name_start = listener_and_start(name, datetime.now(timezone.utc))
        listener_id = checked_listener_id(str(form.get("listener_id") or name_listener or sender or ""))
        station.access.admit_upload(sender, listener_id)
        suffix = checked_suffix(name)
        partial = station.store.new_upload_partial(suffix)
        await _copy(upload, partial, settings.ingest.max_upload_bytes)
        sniff_audio(partial, suffix)
        details = audio_details(partial, suffix)
        if details.duration < settings.ingest.min_duration_s:
            metrics.RECORDINGS_DISCARDED.labels(station.station_id, "too_short").inc()
            raise Rejection(422, "too_short", f"recording is {details.duration:.2f} s, shorter than the minimum {settings.ingest.min_duration_s} s")
        if details.duration > settings.ingest.max_upload_duration_s:
            metrics.RECORDINGS_DISCARDED.labels(station.station_id, "too_long").inc()
            raise Rejection(
                422, "too_long",
                f"recording is {details.duration:.0f} s, longer than the maximum {settings.ingest.max_upload_duration_s:g} s "
                "(setting 'max_upload_duration_s')",
            )
        info = await run_in_threadpool(
            _publish_or_refuse, station.store, partial, listener_id=listener_id,
            start_time=name_start or datetime.now(timezone.utc), duration_s=details.duration,
            sample_rate=details.samplerate, channels=details.channels, gaps=0, source="upload",
        )
        metrics.RECORDINGS_RECEIVED.labels(station.station_id, "upload").inc()
        return {
            "recording_id": info.recording_id,
            "file_name": info.file_name,
            "listener_id": info.listener_id,
            "start_time": info.start_time.isoformat(),
            "duration_s": info.duration_s,
            "content_hash": info.content_hash,
        }
    except Rejection as rejection:
        return station.reject(rejection, listener_id)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)  # published files were moved away; anything else goes


async def _read_form(request: Request) -> FormData:
    try:
        return await request.form(max_files=1, max_fields=8)
    except OSError as exc:
        raise write_failure(exc) from exc
    except Exception as exc:  # starlette raises several types for a broken body
        raise Rejection(400, "bad_form", f"expected multipart/form-data with a 'file' field: {exc}") from exc


async def _copy(upload: UploadFile, partial: Path, limit: int) -> None:
    """The upload into its partial file, refused past `limit` bytes (a declared length can lie)."""
    size = 0
    try:
        with open(partial, "wb") as out:
            while block := await upload.read(UPLOAD_READ_BYTES):
                size += len(block)
                if size > limit:
                    raise Rejection(413, "too_large", f"upload exceeds the limit of {limit} bytes")
                out.write(block)
    except OSError as exc:
        raise write_failure(exc) from exc
    if size == 0:
        raise Rejection(400, "empty", "the uploaded file is empty")


def _publish_or_refuse(store: RecordingStore, partial: Path, **details):
    try:
        return store.publish(partial, **details)
    except OSError as exc:
        raise write_failure(exc) from exc
