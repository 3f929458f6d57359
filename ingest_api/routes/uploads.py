"""POST /recordings_upload: one finished recording as multipart/form-data, `file` and an optional
`listener_id` (the protocol document, section 2). It is answered only once the recording is published.

The body is parsed as it arrives (ingest_api/upload_form.py): the file goes straight into its partial file
in the data directory, once its sender and name have been checked, and an upload slower than
min_upload_bytes_per_s is cut."""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from birdflow.core.disk import InsufficientStorage
from birdflow.core.recordings import RecordingStore
from birdflow.ingest_api.assembler import TooManyRecordings
from birdflow.ingest_api.checks import (
    Rejection,
    audio_details,
    checked_file_name,
    checked_listener_id,
    checked_suffix,
    declared_length,
    listener_and_start,
    sniff_audio,
    write_failure,
)
from birdflow.ingest_api.deps import IngestStateDep, TokenDep
from birdflow.ingest_api.ingest_state import IngestState
from birdflow.ingest_api.upload_form import UploadForm
from birdflow.runtime import metrics

router = APIRouter()


class UploadInProgress:
    """One upload while its body arrives: who sends it, under what name, and where its file goes."""

    def __init__(self, ingest: IngestState, sender: str | None, holds: ExitStack):
        self.ingest, self.sender, self.holds = ingest, sender, holds
        self.listener_id: str | None = None
        self.name_listener: str | None = None
        self.start: datetime | None = None
        self.partial: Path | None = None

    def open_file(self, file_name: str, fields: dict[str, str]) -> BinaryIO:
        """The file part begins: its name, its sender and their room are checked before a byte is kept."""
        name = checked_file_name(file_name)
        self.name_listener, self.start = listener_and_start(name, datetime.now(timezone.utc))
        self.admit(fields)
        self.partial = self.ingest.store.new_upload_partial(checked_suffix(name))
        try:
            return self.holds.enter_context(open(self.partial, "wb"))
        except OSError as exc:
            raise write_failure(exc) from exc

    def admit(self, fields: dict[str, str]) -> None:
        """The listener the form names (a listener_id field, else the file's name, else the token's owner); again
        when a listener_id field came after the file."""
        named = fields.get("listener_id") or self.name_listener or self.sender
        if not named:
            raise Rejection(
                400,
                "no_listener_id",
                "no listener id: send a listener_id form field before the file, or name the file "
                "<listener>_<start>.wav",
            )
        listener_id = checked_listener_id(str(named))
        if listener_id == self.listener_id:
            return
        self.ingest.access.admit_upload(self.sender, listener_id)
        self.holds.enter_context(self.ingest.listener_upload(listener_id))
        self.listener_id = listener_id

    async def receive(self, request: Request, form: UploadForm) -> None:
        """The body into the form, counted: past the limit 413, slower than the minimum rate 408."""
        limits = self.ingest.settings.ingest
        started, received = time.monotonic(), 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                form.feed(chunk)
                elapsed = time.monotonic() - started
                if (
                    limits.min_upload_bytes_per_s
                    and elapsed > limits.body_timeout_s
                    and received < elapsed * limits.min_upload_bytes_per_s
                ):
                    raise Rejection(
                        408,
                        "too_slow",
                        f"upload arrives at {received / elapsed:.0f} bytes/s, below the minimum of "
                        f"{limits.min_upload_bytes_per_s}",
                    )
        except ClientDisconnect:
            raise Rejection(400, "disconnected", "the client went away before the upload was complete") from None
        except OSError as exc:
            raise write_failure(exc) from exc
        form.finish()
        if form.file_bytes == 0:
            raise Rejection(400, "empty", "the uploaded file is empty")


@router.post("/recordings_upload")
async def recordings_upload(request: Request, ingest: IngestStateDep, token: TokenDep):
    settings = ingest.settings
    upload: UploadInProgress | None = None
    with ExitStack() as holds:
        try:
            sender = ingest.access.upload_sender(token)  # before a byte of the body is read
            declared_length(request.headers.get("content-length"), settings.ingest.max_upload_bytes)
            try:
                ingest.disk.require_room()
            except InsufficientStorage as exc:
                raise Rejection(507, "insufficient_storage", str(exc)) from None
            holds.enter_context(ingest.upload_slot())
            upload = UploadInProgress(ingest, sender, holds)
            form = UploadForm(request.headers.get("content-type"), upload.open_file, settings.ingest.max_upload_bytes)
            holds.callback(form.close)
            await upload.receive(request, form)
            upload.admit(form.fields)
            assert upload.partial is not None and form.file_name is not None and upload.listener_id is not None
            suffix = checked_suffix(form.file_name)
            sniff_audio(upload.partial, suffix)
            details = audio_details(upload.partial, suffix)
            if details.duration < settings.ingest.min_duration_s:
                metrics.RECORDINGS_DISCARDED.labels(ingest.station_id, "too_short").inc()
                raise Rejection(
                    422,
                    "too_short",
                    f"recording is {details.duration:.2f} s, shorter than the minimum {settings.ingest.min_duration_s} "
                    "s",
                )
            if details.duration > settings.ingest.max_upload_duration_s:
                metrics.RECORDINGS_DISCARDED.labels(ingest.station_id, "too_long").inc()
                raise Rejection(
                    422,
                    "too_long",
                    f"recording is {details.duration:.0f} s, longer than the maximum "
                    f"{settings.ingest.max_upload_duration_s:g} s "
                    "(setting 'max_upload_duration_s')",
                )
            try:
                ingest.upload_rate(upload.start, details.duration).admit(upload.listener_id)
            except TooManyRecordings as exc:
                raise Rejection(429, "too_many_recordings", str(exc)) from None
            info = await run_in_threadpool(
                _publish_or_refuse,
                ingest.store,
                upload.partial,
                listener_id=upload.listener_id,
                start_time=upload.start or datetime.now(timezone.utc),
                duration_s=details.duration,
                sample_rate=details.samplerate,
                channels=details.channels,
                gaps=0,
                source="upload",
            )
            if info.resent:
                metrics.RECORDINGS_DISCARDED.labels(ingest.station_id, "resent").inc()
            else:
                metrics.RECORDINGS_RECEIVED.labels(ingest.station_id, "upload").inc()
            return {
                "recording_id": info.recording_id,
                "resent": info.resent,  # the station held it already: this copy was dropped
                "file_name": info.file_name,
                "listener_id": info.listener_id,
                "start_time": info.start_time.isoformat(),
                "duration_s": info.duration_s,
                "content_hash": info.content_hash,
            }
        except Rejection as rejection:
            peer = request.client.host if request.client else None
            return ingest.reject(rejection, upload.listener_id if upload else None, peer=peer)
        finally:
            if upload is not None and upload.partial is not None:
                upload.partial.unlink(missing_ok=True)  # published files were moved away; anything else goes


def _publish_or_refuse(store: RecordingStore, partial: Path, **details):
    try:
        return store.publish(partial, **details)
    except OSError as exc:
        raise write_failure(exc) from exc
