"""Partial files a crash left behind: published under their real listener and time, or removed and counted."""

from __future__ import annotations

import struct
import wave
from datetime import datetime, timezone

import pytest

from birdflow.core.recordings import RecordingStore, load_info, parse_stream_partial
from birdflow.core.wav import WavFormat, build_header
from birdflow.ingest_api.assembler import StreamAssembler, StreamLimits
from birdflow.ingest_api.framing import Frame
from birdflow.ingest_api.recovery import recover_partials
from birdflow.settings import Settings

FORMAT = WavFormat(48000, 1, 16)
START = datetime(2025, 6, 1, 5, 30, 12, 250000, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path):
    return RecordingStore(tmp_path / "partial", tmp_path / "recordings", "station-r")


def crashed_stream(store, seconds: float, listener: str = "mic-4", torn_bytes: int = 0):
    """What a listener's stream leaves on disk when the ingest dies mid-recording (kill -9): the header as
    sent (sizes zero) and the audio so far, ending anywhere."""
    partial = store.new_stream_partial(listener, START)
    audio = struct.pack("<h", 700) * int(seconds * 48000) + b"\x01" * torn_bytes
    partial.write_bytes(build_header(FORMAT).raw + audio)
    return partial


def test_a_stream_partial_is_named_after_its_listener_and_start_from_its_first_audio(store):
    assembler = StreamAssembler("mic-4", store, StreamLimits(3.0, 20.0, 9, FORMAT), clock=lambda: START)
    assembler.handle(Frame(0, build_header(FORMAT).raw))
    assert assembler.open_path is None and list(store.partial_dir.iterdir()) == []  # a header alone holds no file
    assembler.handle(Frame(1, b"\x01\x00" * 8))
    assert parse_stream_partial(assembler.open_path.name) == ("mic-4", START)
    # the format is on disk with the first audio, for a recovery after a crash
    assert assembler.open_path.read_bytes()[:44] == build_header(FORMAT).raw
    assembler.finish()


def test_a_crashed_stream_is_published_under_its_listener_and_start_time(store):
    crashed_stream(store, 4.0, torn_bytes=1)
    outcome = recover_partials(store, min_duration_s=3.0)
    [info] = outcome.published
    assert (info.listener_id, info.start_time, info.source) == ("mic-4", START, "recovered")
    assert info.duration_s == pytest.approx(4.0)
    path = store.recordings_dir / info.file_name
    with wave.open(str(path)) as recovered:  # sizes patched, the torn half sample cut off
        assert recovered.getnframes() == 4 * 48000 and recovered.getframerate() == 48000
    assert load_info(path) == info and list(store.partial_dir.iterdir()) == []


def test_what_cannot_be_a_recording_is_removed_and_counted(store):
    crashed_stream(store, 1.0, listener="short")
    (store.partial_dir / "stream_mic-5_20250601T053000.000000Z_0badf00d.wav").write_bytes(b"garbage, no header")
    (store.partial_dir / "upload_5f1e.wav").write_bytes(build_header(FORMAT).raw + bytes(96000 * 5))
    outcome = recover_partials(store, min_duration_s=3.0)
    assert outcome.published == []
    assert outcome.removed == {"partial_too_short": 1, "partial_unreadable": 1, "interrupted_upload": 1}
    assert list(store.partial_dir.iterdir()) == [] and list(store.recordings_dir.iterdir()) == []


def test_a_live_stream_partial_is_left_alone(store):
    live = crashed_stream(store, 4.0)
    assert recover_partials(store, 3.0, in_use={live}).published == []
    assert recover_partials(store, 3.0, untouched_for_s=600).published == []  # written a moment ago
    assert live.exists()


def test_the_ingest_recovers_partials_when_it_starts(tmp_path):
    from fastapi.testclient import TestClient

    from birdflow.ingest_api.app import create_app

    settings = Settings(data_dir=tmp_path / "data")
    store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
    crashed_stream(store, 5.0, listener="mic-6")
    with TestClient(create_app(settings)) as client:
        metrics = client.get("/metrics").text
    [recovered] = settings.recordings_dir.glob("mic-6_20250601T053012Z_*.wav")
    assert load_info(recovered).source == "recovered"
    assert 'birdflow_recordings_received_total{source="recovered",station="station01"} 1.0' in metrics
