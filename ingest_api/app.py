"""The HTTP face of the aggregator: the listener protocol's two endpoints, /healthz and /metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import shutil
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import soundfile
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from birdflow import metrics
from birdflow.disk import MB, DiskFloor, InsufficientStorage
from birdflow.recordings import AUDIO_EXTENSIONS, RecordingStore, parse_file_name
from birdflow.retention import archive_retention
from birdflow.settings import Settings, validate_listener_id
from birdflow.wav import WavError, WavFormat, check_rate_and_channels, looks_like_wav, parse_header
from ingest_api.access import IngestAccess, Rejection, presented_token
from ingest_api.assembler import StreamAssembler, StreamLimits, StreamRejected, StreamStats, TooManyRecordings
from ingest_api.framing import FrameParser, FramingError
from ingest_api.recovery import recover_partials

log = logging.getLogger("birdflow.ingest")
UPLOAD_READ_BYTES = 1 << 20
# partials no stream has written to for this long are left over (a close that failed): publish them
PARTIAL_SWEEP_S = 600.0
FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)
RETRY_AFTER_S = {503: "30", 507: "300", 429: "60"}


def _summary(listener_id: str, stats: StreamStats) -> dict:
    return {
        "listener_id": listener_id,
        "recordings_closed": stats.closed,
        "recordings": [info.recording_id for info in stats.recordings],  # the newest 100
        "discarded": stats.discarded,
        "gaps": stats.gaps,
        "dropped_frames": stats.dropped_frames,
        "metadata_frames": stats.metadata_frames,
    }


def _sniff_audio(path: Path, suffix: str) -> None:
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
    elif suffix == ".mp3" and not (head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)):
        raise Rejection(415, "not_audio", "file is not MP3")


def recover_and_count(
    store: RecordingStore, settings: Settings, untouched_for_s: Optional[float] = None, in_use: frozenset = frozenset()
) -> None:
    """Publish (or remove) partial files a crash or a failed close left behind, and count them."""
    outcome = recover_partials(store, settings.min_duration_s, untouched_for_s, in_use)
    station = settings.station_id
    for info in outcome.published:
        metrics.RECORDINGS_RECEIVED.labels(station, "recovered").inc()
        log.info("recovered %s (%.1f s) from a partial file", info.recording_id, info.duration_s)
    for reason, count in outcome.removed.items():
        metrics.RECORDINGS_DISCARDED.labels(station, reason).inc(count)
        log.info("removed %d partial file(s): %s", count, reason)


def create_app(settings: Settings) -> FastAPI:
    store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
    station = settings.station_id
    recover_and_count(store, settings)  # nothing of this process is open yet: every partial is left over
    disk = DiskFloor(settings.data_dir, settings.min_free_disk_mb * MB, relieve=lambda: archive_retention(settings))
    limits = StreamLimits(
        min_duration_s=settings.min_duration_s,
        max_duration_s=settings.max_duration_s,
        max_gap_pages=settings.max_gap_pages,
        default_format=WavFormat(settings.default_sample_rate, settings.default_channels, settings.default_bits_per_sample),
        max_recordings_per_minute=settings.max_recordings_per_minute,
    )
    access = IngestAccess(settings)
    event_counters = {
        "recording_closed": metrics.RECORDINGS_RECEIVED.labels(station, "stream"),
        "recording_discarded": metrics.RECORDINGS_DISCARDED.labels(station, "too_short"),
        "recording_abandoned": metrics.RECORDINGS_DISCARDED.labels(station, "write_failed"),
        "gap": metrics.GAPS.labels(station),
        "frame_dropped": metrics.FRAMES_DROPPED.labels(station),
        "metadata_frame": metrics.METADATA_FRAMES.labels(station),
    }

    def count_event(name: str, count: int) -> None:
        event_counters[name].inc(count)

    def reject(rejection: Rejection, listener_id: Optional[str], extra: Optional[dict] = None) -> JSONResponse:
        """The answer to a refused request (the connection then drops what is left of its body)."""
        metrics.REQUESTS_REJECTED.labels(station, rejection.reason).inc()
        log.warning("rejected request from listener %r: %s", listener_id, rejection)
        headers = {}
        if rejection.status in RETRY_AFTER_S:
            headers["Retry-After"] = RETRY_AFTER_S[rejection.status]
        if rejection.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": str(rejection), **(extra or {})}, status_code=rejection.status, headers=headers)

    def admit_stream(listener_id: str, token: Optional[str]) -> None:
        """A valid id, the listener's token when auth is on, and room for one more stream."""
        try:
            validate_listener_id(listener_id)
        except ValueError as exc:
            raise Rejection(400, "bad_listener_id", str(exc)) from None
        access.admit_stream(listener_id, token)
        if len(streams) >= settings.max_open_streams:
            raise Rejection(503, "too_many_streams", f"{len(streams)} streams are open, the most this station takes")
        if sum(stream.listener_id == listener_id for stream in streams) >= settings.max_streams_per_listener:
            raise Rejection(
                503, "listener_streams", f"listener {listener_id!r} already has {settings.max_streams_per_listener} open streams"
            )

    # one thread seals closed recordings (fsync, hash, publish) in order, off the event loop
    sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seal")

    def submit_seal(listener_id: str, seal) -> concurrent.futures.Future:
        def report(future: concurrent.futures.Future) -> None:
            if future.exception() is not None:
                log.error("listener %s: a closed recording could not be stored: %s", listener_id, future.exception())

        future = sealer.submit(seal)
        future.add_done_callback(report)
        return future

    async def seal_all(sealing: list[concurrent.futures.Future]) -> None:
        """Wait for this stream's recordings to be published, so its response lists them."""
        await asyncio.gather(*(asyncio.wrap_future(future) for future in sealing), return_exceptions=True)

    streams: set[StreamAssembler] = set()  # the streams connected now

    async def sweep_partials() -> None:
        while True:
            await asyncio.sleep(PARTIAL_SWEEP_S)
            in_use = frozenset(stream.open_path for stream in streams if stream.open_path)
            await run_in_threadpool(recover_and_count, store, settings, PARTIAL_SWEEP_S, in_use)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(sweep_partials())
        yield
        sweeper.cancel()
        # Stopping (SIGTERM, Ctrl-C): the server has cancelled the streams, which close their recordings;
        # those are published before the process exits, so a restart finds them in the recordings folder.
        for _ in range(100):
            if not streams:
                break
            await asyncio.sleep(0.05)
        await run_in_threadpool(sealer.shutdown, True)

    app = FastAPI(title="birdflow ingest API", version="1", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "station_id": station}

    @app.get("/metrics")
    def prometheus_metrics(request: Request) -> Response:
        try:
            access.admit_metrics(request.headers.get("authorization"), request.client.host if request.client else None)
        except Rejection as rejection:
            return reject(rejection, None)
        metrics.DISK_FREE.labels(station).set(shutil.disk_usage(settings.data_dir).free)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/recordings_stream")
    async def recordings_stream(request: Request, listener_id: str = Query(...), token: Optional[str] = Query(None)):
        """Frames of one listener, for as long as the connection lasts (see the protocol document)."""
        try:
            admit_stream(listener_id, presented_token(request.headers.get("authorization"), token))
        except Rejection as rejection:
            return reject(rejection, listener_id)
        parser = FrameParser(settings.max_frame_bytes)
        sealing: list[concurrent.futures.Future] = []

        def seal_later(seal) -> None:
            sealing[:] = [future for future in sealing if not future.done()]  # bounded on days-long streams
            sealing.append(submit_seal(listener_id, seal))

        assembler = StreamAssembler(
            listener_id, store, limits, on_event=count_event, sealer=seal_later, before_open=disk.require_room
        )
        streams.add(assembler)
        open_streams = metrics.OPEN_STREAMS.labels(station)
        open_streams.inc()
        rejection = None
        try:
            async for chunk in request.stream():
                for frame in parser.feed(chunk):
                    assembler.handle(frame)
        except ClientDisconnect:
            log.info("listener %s disconnected", listener_id)
        except asyncio.CancelledError:
            # the server is stopping and ends the streams: the recording in progress is closed and kept
            # below, and nobody is left to read an answer
            log.info("listener %s: stream closed because the ingest API is stopping", listener_id)
            return Response(status_code=503)
        except FramingError as exc:
            rejection = Rejection(400, "malformed_frame", str(exc))
        except StreamRejected as exc:
            rejection = Rejection(415, "bad_header", str(exc))
        except TooManyRecordings as exc:
            rejection = Rejection(429, "too_many_recordings", f"listener {listener_id}: {exc}")
        except InsufficientStorage as exc:  # checked as each recording opens; the ones before it are kept
            rejection = Rejection(507, "insufficient_storage", str(exc))
        except OSError as exc:
            assembler.abandon()  # a recording cut by a write error is not kept half-written
            rejection = _write_failure(exc)
            if not isinstance(rejection, Rejection):
                raise
        finally:
            if parser.pending_bytes and rejection is None:
                log.info("listener %s: stream ended inside a frame (%d bytes dropped)", listener_id, parser.pending_bytes)
                count_event("frame_dropped", 1)
            stats = assembler.finish()
            streams.discard(assembler)
            open_streams.dec()
            await seal_all(sealing)
        if rejection:
            return reject(rejection, listener_id, _summary(listener_id, stats))
        return _summary(listener_id, stats)

    @app.post("/recordings_upload")
    async def recordings_upload(request: Request, token: Optional[str] = Query(None)):
        """One finished recording as multipart/form-data (`file`, optional `listener_id`)."""
        listener_id = None
        partial = None
        try:
            sender = access.upload_sender(presented_token(request.headers.get("authorization"), token))
            try:
                declared = int(request.headers.get("content-length") or 0)
            except ValueError:
                raise Rejection(400, "bad_length", "Content-Length is not a number") from None
            if declared > settings.max_upload_bytes:
                raise Rejection(413, "too_large", f"upload of {declared} bytes exceeds the limit of {settings.max_upload_bytes}")
            try:
                disk.require_room()
            except InsufficientStorage as exc:
                raise Rejection(507, "insufficient_storage", str(exc)) from None
            try:
                form = await request.form(max_files=1, max_fields=8)
            except OSError as exc:
                raise _write_failure(exc) from exc
            except Exception as exc:  # starlette raises several types for a broken body
                raise Rejection(400, "bad_form", f"expected multipart/form-data with a 'file' field: {exc}") from exc
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise Rejection(400, "bad_form", "missing the 'file' field")
            name = upload.filename or ""
            if any(char in name for char in "/\\\0"):
                raise Rejection(400, "bad_file_name", f"file name {name!r} must not contain path separators or NUL")
            name_listener, name_start = parse_file_name(name)
            listener_id = str(form.get("listener_id") or name_listener or sender or "")
            try:
                validate_listener_id(listener_id)
            except ValueError as exc:
                raise Rejection(400, "bad_listener_id", str(exc)) from exc
            access.admit_upload(sender, listener_id)
            suffix = Path(name).suffix.lower()
            if suffix not in AUDIO_EXTENSIONS:
                raise Rejection(415, "unsupported_type", f"unsupported file type {suffix or '(none)'}: send .wav, .flac or .mp3")
            partial = store.new_upload_partial(suffix)
            size = 0
            try:
                with open(partial, "wb") as out:
                    while block := await upload.read(UPLOAD_READ_BYTES):
                        size += len(block)
                        if size > settings.max_upload_bytes:
                            raise Rejection(413, "too_large", f"upload exceeds the limit of {settings.max_upload_bytes} bytes")
                        out.write(block)
            except OSError as exc:
                raise _write_failure(exc) from exc
            if size == 0:
                raise Rejection(400, "empty", "the uploaded file is empty")
            _sniff_audio(partial, suffix)
            details = _audio_details(partial, suffix)
            if details.duration < settings.min_duration_s:
                metrics.RECORDINGS_DISCARDED.labels(station, "too_short").inc()
                raise Rejection(422, "too_short", f"recording is {details.duration:.2f} s, shorter than the minimum {settings.min_duration_s} s")
            info = await run_in_threadpool(
                _publish_or_refuse,
                store,
                partial,
                listener_id=listener_id,
                start_time=name_start or datetime.now(timezone.utc),
                duration_s=details.duration,
                sample_rate=details.samplerate,
                channels=details.channels,
                gaps=0,
                source="upload",
            )
            metrics.RECORDINGS_RECEIVED.labels(station, "upload").inc()
            return {
                "recording_id": info.recording_id,
                "file_name": info.file_name,
                "listener_id": info.listener_id,
                "start_time": info.start_time.isoformat(),
                "duration_s": info.duration_s,
                "content_hash": info.content_hash,
            }
        except Rejection as rejection:
            return reject(rejection, listener_id)
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)  # published files were moved away; anything else goes

    return app


def _audio_details(path: Path, suffix: str):
    """Duration and format of an upload; 415 for what cannot be decoded or analysed. The messages name
    the problem, never the server's file."""
    try:
        details = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError):  # their messages name the file on this server
        raise Rejection(415, "not_audio", f"file cannot be decoded as {suffix[1:].upper()} (corrupt or another format)") from None
    try:
        check_rate_and_channels(details.samplerate, details.channels)
    except WavError as exc:
        raise Rejection(415, "unsupported_format", str(exc)) from None
    return details


def _write_failure(exc: OSError) -> Exception:
    """A full disk is the station's condition (507, try again later); other I/O errors are its fault."""
    if exc.errno in FULL_DISK_ERRORS:
        return Rejection(507, "insufficient_storage", f"insufficient storage: {exc.strerror}")
    return exc


def _publish_or_refuse(store: RecordingStore, partial: Path, **details):
    try:
        return store.publish(partial, **details)
    except OSError as exc:
        raise _write_failure(exc) from exc
