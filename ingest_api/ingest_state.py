"""What the ingest routes share for the life of the app: the recording store, the disk floor, who may
send, the streams connected now, and the one thread that seals closed recordings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta, timezone
from functools import cached_property

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from birdflow.core.archive import Archive, LocalArchive
from birdflow.core.disk import MB, DiskFloor
from birdflow.core.errors import StateFileError
from birdflow.core.links import link_key
from birdflow.core.recordings import RecordingStore
from birdflow.core.wav import WavFormat
from birdflow.ingest_api.access import IngestAccess
from birdflow.ingest_api.assembler import RecordingRate, StreamAssembler, StreamLimits
from birdflow.ingest_api.checks import Rejection, checked_listener_id
from birdflow.ingest_api.recovery import recover_partials
from birdflow.ingest_api.telemetry import receive_health
from birdflow.runtime import metrics
from birdflow.runtime.archive_retention import archive_retention
from birdflow.runtime.state_files import processed_ledger
from birdflow.settings import Settings

log = logging.getLogger("birdflow.ingest")
# partials no stream has written to for this long are left over (a close that failed): publish them
PARTIAL_SWEEP_S = 600.0
RETRY_AFTER_S = {503: "30", 507: "300", 429: "60"}
BACKLOG_AFTER = timedelta(minutes=10)  # an upload of a recording that ended longer ago is a listener's backlog


def recover_and_count(
    store: RecordingStore, settings: Settings, untouched_for_s: float | None = None, in_use: frozenset = frozenset()
) -> None:
    """Publish (or remove) partial files a crash or a failed close left behind, and count them."""
    outcome = recover_partials(store, settings.ingest.min_duration_s, untouched_for_s, in_use)
    station = settings.station_id
    for info in outcome.published:
        metrics.RECORDINGS_RECEIVED.labels(station, "recovered").inc()
        log.info("recovered %s (%.1f s) from a partial file", info.recording_id, info.duration_s)
    for reason, count in outcome.removed.items():
        metrics.RECORDINGS_DISCARDED.labels(station, reason).inc(count)
        log.info("removed %d partial file(s): %s", count, reason)


class IngestState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.station_id = station = settings.station_id
        self.ledger = processed_ledger(settings)
        self.store = RecordingStore(settings.partial_dir, settings.recordings_dir, station, processed=self.processed)
        recover_and_count(self.store, settings)  # nothing of this process is open yet: every partial is left over
        self.disk = DiskFloor(settings.data_dir, settings.unattended.min_free_disk_mb * MB, relieve=self.relieve_disk)
        self.limits = StreamLimits(
            min_duration_s=settings.ingest.min_duration_s,
            max_duration_s=settings.ingest.max_duration_s,
            max_gap_pages=settings.ingest.max_gap_pages,
            default_format=WavFormat(
                settings.ingest.default_sample_rate,
                settings.ingest.default_channels,
                settings.ingest.default_bits_per_sample,
            ),
        )
        self.recording_rate = RecordingRate(settings.ingest.max_recordings_per_minute)
        self.backlog_rate = RecordingRate(settings.ingest.max_backlog_uploads_per_minute)
        self.access = IngestAccess(settings, self.ledger)
        self.streams: set[StreamAssembler] = set()  # the streams connected now
        self.open_uploads = 0  # uploads in progress
        self.listener_uploads: Counter[str] = Counter()  # of those, by listener id once it is known
        # one thread seals closed recordings (fsync, hash, publish) in order, off the event loop
        self.sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seal")
        self._event_counters = {
            "recording_closed": metrics.RECORDINGS_RECEIVED.labels(station, "stream"),
            "recording_discarded": metrics.RECORDINGS_DISCARDED.labels(station, "too_short"),
            "recording_abandoned": metrics.RECORDINGS_DISCARDED.labels(station, "write_failed"),
            "recording_resent": metrics.RECORDINGS_DISCARDED.labels(station, "resent"),
            "gap": metrics.GAPS.labels(station),
            "frame_dropped": metrics.FRAMES_DROPPED.labels(station),
            "metadata_frame": metrics.METADATA_FRAMES.labels(station),
        }

    @cached_property
    def link_key(self) -> bytes:
        """The key of the station's signed links (the executor and worker sign with the same file)."""
        return link_key(self.settings.link_key_file)

    @cached_property
    def clip_archive(self) -> Archive:
        """The archive the clips are in, as the settings describe it."""
        if self.settings.archive.archive_backend == "s3":
            from birdflow.blocks import archive_in_bucket, s3_bucket_from_settings

            return archive_in_bucket(s3_bucket_from_settings(self.settings))
        return LocalArchive(self.settings.local_archive_dir)

    def relieve_disk(self) -> None:
        """At the disk floor: what the archive retention allows, counted (maintenance announces it)."""
        metrics.count_purged(self.station_id, archive_retention(self.settings, worth=self.ledger.detections))

    def processed(self, recording_id: str) -> bool:
        """Whether a recording sent again was analysed already. A record that cannot be read now is no reason to
        refuse audio: the executor looks again before it runs anything."""
        try:
            return self.ledger.holds(recording_id)
        except (sqlite3.Error, StateFileError) as exc:
            log.warning("the processed record could not be read (%s): %s is taken as new", exc, recording_id)
            return False

    def upload_rate(self, start: datetime | None, duration_s: float) -> RecordingRate:
        """What an upload counts against: a recording that ended a while ago (a listener sending its backlog) has
        an allowance of its own, so that a card's worth of old recordings is not held to the pace of live ones."""
        if start is not None and start + timedelta(seconds=duration_s) < datetime.now(timezone.utc) - BACKLOG_AFTER:
            return self.backlog_rate
        return self.recording_rate

    def count_event(self, name: str, count: int) -> None:
        self._event_counters[name].inc(count)

    def reject(
        self, rejection: Rejection, listener_id: str | None, extra: dict | None = None, peer: str | None = None
    ) -> JSONResponse:
        """The answer to a refused request (the connection then drops what is left of its body); `peer`: the
        sender's address, which the log names when the request was refused before its listener id was read."""
        metrics.REQUESTS_REJECTED.labels(self.station_id, rejection.reason).inc()
        sender = f"listener {listener_id!r}" if listener_id else f"{peer or 'a sender'} (before its listener id)"
        log.warning("rejected request from %s: %s", sender, rejection)
        headers = {}
        if rejection.status in RETRY_AFTER_S:
            headers["Retry-After"] = RETRY_AFTER_S[rejection.status]
        if rejection.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": str(rejection), **(extra or {})}, status_code=rejection.status, headers=headers)

    def admit_stream(self, listener_id: str, token: str | None) -> None:
        """A valid id, the listener's token when auth is on, and room for one more stream."""
        checked_listener_id(listener_id)
        self.access.admit_stream(listener_id, token)
        if len(self.streams) >= self.settings.ingest.max_open_streams:
            raise Rejection(
                503, "too_many_streams", f"{len(self.streams)} streams are open, the most this station takes"
            )
        per_listener = self.settings.ingest.max_streams_per_listener
        if sum(stream.listener_id == listener_id for stream in self.streams) >= per_listener:
            raise Rejection(
                503, "listener_streams", f"listener {listener_id!r} already has {per_listener} open streams"
            )

    @contextmanager
    def upload_slot(self) -> Iterator[None]:
        """Room for one more upload in progress (max_open_uploads), held until it is answered."""
        if self.open_uploads >= self.settings.ingest.max_open_uploads:
            raise Rejection(
                503, "too_many_uploads", f"{self.open_uploads} uploads are in progress, the most this station takes"
            )
        self.open_uploads += 1
        try:
            yield
        finally:
            self.open_uploads -= 1

    @contextmanager
    def listener_upload(self, listener_id: str) -> Iterator[None]:
        """Within an upload slot, once its listener is known: at most max_uploads_per_listener of one listener."""
        per_listener = self.settings.ingest.max_uploads_per_listener
        if self.listener_uploads[listener_id] >= per_listener:
            raise Rejection(
                503, "listener_uploads", f"listener {listener_id!r} already has {per_listener} uploads in progress"
            )
        self.listener_uploads[listener_id] += 1
        try:
            yield
        finally:
            self.listener_uploads[listener_id] -= 1

    def admit_next_recording(self, listener_id: str, token: str | None, connected_at: float) -> None:
        """Before each recording of a stream: room on the disk, a token still valid (one revoked while the
        stream lasts ends it), and a stream not older than max_stream_lifetime_s."""
        self.disk.require_room()
        self.access.admit_stream(listener_id, token)
        lifetime = self.settings.ingest.max_stream_lifetime_s
        if time.monotonic() - connected_at > lifetime:
            raise Rejection(503, "stream_lifetime", f"the stream has lasted longer than {lifetime:g} s: reconnect")

    def submit_seal(self, listener_id: str, seal) -> concurrent.futures.Future:
        def report(future: concurrent.futures.Future) -> None:
            if future.exception() is not None:
                log.error("listener %s: a closed recording could not be stored: %s", listener_id, future.exception())

        future = self.sealer.submit(seal)
        future.add_done_callback(report)
        return future

    async def _sweep_partials(self) -> None:
        while True:
            await asyncio.sleep(PARTIAL_SWEEP_S)
            in_use = frozenset(stream.open_path for stream in self.streams if stream.open_path)
            await run_in_threadpool(recover_and_count, self.store, self.settings, PARTIAL_SWEEP_S, in_use)

    @asynccontextmanager
    async def lifespan(self, app):
        sweeper = asyncio.create_task(self._sweep_partials())
        health = asyncio.create_task(receive_health(self.settings, self.access.known_listener))
        yield
        sweeper.cancel()
        health.cancel()
        # Stopping (SIGTERM, Ctrl-C): the server has cancelled the streams, which close their recordings;
        # those are published before the process exits, so a restart finds them in the recordings folder.
        for _ in range(100):
            if not self.streams:
                break
            await asyncio.sleep(0.05)
        await run_in_threadpool(self.sealer.shutdown, True)
