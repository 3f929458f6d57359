"""The flow's retry and cache policies, without running a flow."""

from __future__ import annotations

from datetime import datetime, timezone

from botocore.exceptions import EndpointConnectionError
from prefect.states import Failed

from birdflow.archive import ArchiveError
from birdflow.audio import AudioError
from birdflow.birdnet import AnalysisParams
from birdflow.recordings import RecordingInfo
from flows.process_recording import analysis_cache_key, worth_retrying


def failed_with(exc: BaseException) -> bool:
    return worth_retrying(None, None, Failed(data=exc))


def test_io_failures_are_retried_and_bad_audio_is_not():
    assert failed_with(OSError("disk busy"))
    assert failed_with(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert failed_with(ArchiveError("upload did not match"))
    assert not failed_with(AudioError("cannot decode audio"))
    assert not failed_with(ValueError("archived copy does not match the content hash"))


def recording(content_hash: str, start: datetime) -> RecordingInfo:
    return RecordingInfo(
        recording_id=f"mic1_{start:%Y%m%dT%H%M%SZ}_{content_hash[:8]}", listener_id="mic1", station_id="s1",
        start_time=start, duration_s=10.0, sample_rate=48000, content_hash=content_hash, size_bytes=1,
        file_name="x.wav",
    )


def test_analysis_cache_key_follows_content_parameters_and_range_week():
    june, december = datetime(2025, 6, 1, tzinfo=timezone.utc), datetime(2025, 12, 1, tzinfo=timezone.utc)
    plain = AnalysisParams()
    ranged = AnalysisParams(latitude=42.0, longitude=-76.0)
    key = analysis_cache_key(recording("a" * 64, june), plain)
    assert key == analysis_cache_key(recording("a" * 64, june), AnalysisParams())  # re-sent audio: same key
    assert key != analysis_cache_key(recording("b" * 64, june), plain)
    assert key != analysis_cache_key(recording("a" * 64, june), AnalysisParams(min_confidence=0.5))
    # without a range filter the date does not matter; with one, the week does
    assert key == analysis_cache_key(recording("a" * 64, december), plain)
    assert analysis_cache_key(recording("a" * 64, june), ranged) != analysis_cache_key(recording("a" * 64, december), ranged)
