"""Turns one listener's frames into finished WAV recordings (no HTTP in here).

Memory per stream is one open file and one page: audio goes straight to disk as it arrives. A recording's
file is opened with its first audio, so a connection that only sends headers holds no file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

from birdflow.core.errors import Refused
from birdflow.core.recordings import RecordingInfo, RecordingStore
from birdflow.core.wav import WavError, WavFormat, WavHeader, build_header, looks_like_wav, parse_header, patch_sizes
from birdflow.ingest_api.framing import METADATA_SEQ, SEQ_MODULUS, START_SEQ, Frame

log = logging.getLogger(__name__)

# Audio pages are numbered 1 .. 0xFFFFFE and wrap (0 starts a recording, 0xFFFFFF is metadata).
AUDIO_SEQ_CYCLE = SEQ_MODULUS - 2
DEFAULT_PAGE_BYTES = 32768


class StreamRejected(Refused):
    """The listener sent something that is not acceptable audio; the stream ends with a 4xx."""


class TooManyRecordings(Refused):
    """A listener starts recordings faster than any listener does (a flood): its stream is cut, its upload refused."""


class RecordingRate:
    """Recordings started per listener id in the last minute, over all its streams, reconnects and uploads."""

    FORGET_AT = 4096  # listener ids tracked before those quiet for a minute are forgotten (bounded memory)

    def __init__(self, per_minute: int | None):
        self.per_minute = per_minute  # None: no limit
        self._starts: dict[str, deque[float]] = {}

    def admit(self, listener_id: str, now: float | None = None) -> None:
        """Count one more recording of the listener, or raise TooManyRecordings."""
        if self.per_minute is None:
            return
        now = time.monotonic() if now is None else now
        if len(self._starts) >= self.FORGET_AT:
            self._starts = {key: starts for key, starts in self._starts.items() if now - starts[-1] <= 60}
        starts = self._starts.setdefault(listener_id, deque())
        while starts and now - starts[0] > 60:
            starts.popleft()
        if len(starts) >= self.per_minute:
            raise TooManyRecordings(
                f"listener {listener_id!r} started more than {self.per_minute} recordings within a minute"
            )
        starts.append(now)


@dataclass(frozen=True)
class StreamLimits:
    min_duration_s: float
    max_duration_s: float
    max_gap_pages: int
    default_format: WavFormat


RECENT_RECORDINGS = 100  # a connection can last for days: its summary keeps the newest ones only


@dataclass
class StreamStats:
    recordings: deque[RecordingInfo] = field(default_factory=lambda: deque(maxlen=RECENT_RECORDINGS))
    closed: int = 0
    discarded: int = 0
    gaps: int = 0
    dropped_frames: int = 0
    metadata_frames: int = 0


_EVENT_STATS = {
    "recording_discarded": "discarded",
    "recording_abandoned": "discarded",
    "gap": "gaps",
    "frame_dropped": "dropped_frames",
    "metadata_frame": "metadata_frames",
}


@dataclass(frozen=True)
class _Announced:
    """A recording whose header has arrived but no audio yet: no file exists for it."""

    header: WavHeader
    start_time: datetime


@dataclass
class _OpenRecording:
    path: Path
    file: BinaryIO
    header: WavHeader
    start_time: datetime
    data_bytes: int = 0
    gaps: int = 0

    @property
    def duration_s(self) -> float:
        return self.data_bytes / self.header.format.byte_rate


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class StreamAssembler:
    """The per-connection state machine of the streaming protocol.

    ``on_event(name, count)`` reports what happened (recording_closed, recording_discarded,
    recording_abandoned, gap, frame_dropped, metadata_frame) so the caller can count it without this
    code knowing about metrics.
    """

    def __init__(
        self,
        listener_id: str,
        store: RecordingStore,
        limits: StreamLimits,
        on_event: Callable[[str, int], None] = lambda name, count: None,
        clock: Callable[[], datetime] = _utc_now,
        sealer: Callable[[Callable[[], None]], None] = lambda seal: seal(),
        before_open: Callable[[], None] = lambda: None,
        rate: RecordingRate | None = None,
    ):
        """`sealer` runs each closed recording's seal step; the HTTP app hands it to a worker thread
        so an fsync never stalls the other listeners' streams. `before_open` runs before each new
        recording is opened and may raise to refuse it (the disk floor): the recording before it is
        closed and published first."""
        self.listener_id = listener_id
        self.sealer = sealer
        self.before_open = before_open
        self.store = store
        self.limits = limits
        self.on_event = on_event
        self.clock = clock
        self.stats = StreamStats()
        self._open: _OpenRecording | None = None
        self._announced: _Announced | None = None
        self.rate = rate or RecordingRate(None)  # shared by the station's streams and uploads
        self._last_header: WavHeader | None = None
        self._last_seq = 0
        self._page_bytes = DEFAULT_PAGE_BYTES

    # frames -------------------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        if frame.seq == METADATA_SEQ:
            self._count("metadata_frame")
            return
        if frame.seq == START_SEQ:
            self._start_recording(frame.payload, self.clock())
            self._last_seq = START_SEQ
            return
        if looks_like_wav(frame.payload):
            self._start_recording(frame.payload, self.clock())
            self._last_seq = frame.seq
            return
        if self._open is None and self._announced is None:
            self._count("frame_dropped")
            return
        step = (frame.seq - self._last_seq) % AUDIO_SEQ_CYCLE
        if step == 0 or step > AUDIO_SEQ_CYCLE // 2:
            # A repeated or late page: the audio it would fill has already been written.
            self._count("frame_dropped")
            return
        missing = step - 1
        if missing > self.limits.max_gap_pages:
            log.info("listener %s: seq jumped by %d pages, closing the recording", self.listener_id, step)
            self._close()
            self._count("frame_dropped")
            return
        if missing:
            self._pad_silence(missing)
        self._last_seq = frame.seq
        if frame.payload:
            self._page_bytes = len(frame.payload)
        self._write_audio(frame.payload)

    @property
    def open_path(self) -> Path | None:
        """The partial file of the recording in progress."""
        return self._open.path if self._open else None

    def finish(self) -> StreamStats:
        """The connection ended (normally or not): close what is open."""
        self._close()
        return self.stats

    def abandon(self) -> None:
        """Writing failed (a full disk): the open recording cannot be trusted, so none is left behind."""
        self._announced = None
        current, self._open = self._open, None
        if current is None:
            return
        with contextlib.suppress(OSError):  # closing flushes what is buffered: on a full disk that fails too
            current.file.close()
        current.path.unlink(missing_ok=True)
        self._count("recording_abandoned")

    # recordings -----------------------------------------------------------------------------------------

    def _start_recording(self, payload: bytes, start_time: datetime) -> None:
        if payload[:4] == b"RIFF":
            try:
                header = parse_header(payload)
            except WavError as exc:
                raise StreamRejected(f"listener {self.listener_id}: {exc}") from exc
            audio = payload[header.size :]
            self._last_header = header
        else:
            header = self._last_header or build_header(self.limits.default_format)
            audio = payload
        self._close()
        self._announce(header, start_time)
        self._write_audio(audio)

    def _announce(self, header: WavHeader, start_time: datetime) -> None:
        """A recording starts (a header, or a rollover); its file is opened when audio arrives."""
        self.rate.admit(self.listener_id)
        self._announced = _Announced(header, start_time)

    def _open_announced(self) -> _OpenRecording:
        announced, self._announced = self._announced, None
        assert announced is not None, "audio before any header"
        self.before_open()
        path = self.store.new_stream_partial(self.listener_id, announced.start_time)
        file = open(path, "wb")
        file.write(announced.header.raw)
        file.flush()  # the format is on disk from the first moment, for a recovery after a crash
        self._open = _OpenRecording(path=path, file=file, header=announced.header, start_time=announced.start_time)
        return self._open

    def _write_audio(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:
            current = self._open or self._open_announced()
            room = self._max_data_bytes(current.header.format) - current.data_bytes
            piece = view[:room]
            current.file.write(piece)
            current.data_bytes += piece.nbytes
            view = view[piece.nbytes :]
            if current.data_bytes >= self._max_data_bytes(current.header.format):
                self._roll_over()

    def _roll_over(self) -> None:
        previous = self._open
        assert previous is not None, "a roll-over of no open recording"
        self._close()
        self._announce(previous.header, previous.start_time + timedelta(seconds=previous.duration_s))

    def _pad_silence(self, pages: int) -> None:
        current = self._open or self._announced
        assert current is not None, "a gap before any header"
        block_align = current.header.format.block_align
        self._write_audio(bytes(pages * self._page_bytes // block_align * block_align))
        if self._open:  # pages shorter than a sample frame pad nothing
            self._open.gaps += 1
        self._count("gap")

    def _max_data_bytes(self, wav_format: WavFormat) -> int:
        return int(self.limits.max_duration_s * wav_format.sample_rate) * wav_format.block_align

    def _close(self) -> None:
        """Patch the sizes now; flushing to disk and publishing go through the sealer."""
        if self._announced is not None:  # a header and no audio: nothing was written
            self._announced = None
            self._count("recording_discarded")
        current, self._open = self._open, None
        if current is None:
            return
        patch_sizes(current.file, current.header.size, current.data_bytes)
        self.sealer(lambda: self._seal(current))

    def _seal(self, current: _OpenRecording) -> None:
        """fsync, then discard (too short) or publish: the slow part of a close (ms on an SD card)."""
        current.file.flush()
        os.fsync(current.file.fileno())
        current.file.close()
        if current.duration_s < self.limits.min_duration_s:
            current.path.unlink(missing_ok=True)
            log.info(
                "listener %s: discarded a %.2f s recording (minimum %.1f s)",
                self.listener_id,
                current.duration_s,
                self.limits.min_duration_s,
            )
            self._count("recording_discarded")
            return
        info = self.store.publish(
            current.path,
            listener_id=self.listener_id,
            start_time=current.start_time,
            duration_s=current.duration_s,
            sample_rate=current.header.format.sample_rate,
            channels=current.header.format.channels,
            gaps=current.gaps,
            source="stream",
        )
        self.stats.recordings.append(info)  # listed either way: the station holds it
        self.stats.closed += 1
        self._count("recording_resent" if info.resent else "recording_closed")

    def _count(self, name: str, count: int = 1) -> None:
        stat = _EVENT_STATS.get(name)
        if stat:
            setattr(self.stats, stat, getattr(self.stats, stat) + count)
        self.on_event(name, count)
