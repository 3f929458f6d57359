"""A recording of any length costs bounded memory: an hour-long recording, as an AudioMoth writes them, is
analysed a block at a time by the station's executor, with the detections of its pieces analysed one by one."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import decoded_blocks, window_batches
from birdflow.core.birdnet import BirdNET
from birdflow_tools.bench import PIECE_S, recording_pieces, write_long_recording
from birdflow_tools.stack import Stack, peak_rss_mb, resident_mb, restart_peak
from birdflow_tools.testbed import wait_until

HOUR_S = 3600
START = datetime(2025, 6, 1, 5, 0, tzinfo=timezone.utc)


def detections_of_pieces(pieces: list[np.ndarray]) -> list[tuple[float, str, float]]:
    """(start in the hour, species, confidence): each piece analysed on its own, placed where it lies in the hour."""
    model, params = BirdNET(batch_size=4), AnalysisParams()
    heard = []
    for piece in pieces:
        buffer = io.BytesIO()
        soundfile.write(buffer, piece, 48000, format="WAV", subtype="PCM_16")
        heard.append(model.hear_all(window_batches(decoded_blocks(buffer.getvalue())), params, START).detections)
    found = []
    for number in range(HOUR_S // PIECE_S):
        for detection in heard[number % len(pieces)]:
            found.append((detection.start_s + number * PIECE_S, detection.scientific_name, detection.confidence))
    return sorted(found)


def test_an_hour_long_recording_is_analysed_in_bounded_memory_as_its_pieces_are(tmp_path, sample_48k):
    pieces = recording_pieces(sample_48k)
    hour = tmp_path / "mic1_20250601T050000Z.flac"
    write_long_recording(hour, pieces, HOUR_S)
    (tmp_path / "station").mkdir()
    stack = Stack(tmp_path / "station", station_id="hour", settings={"clips_enabled": False})
    try:
        stack.start()
        stack.upload("mic1_20250601T040000Z.wav", sample_48k.read_bytes())
        wait_until(lambda: stack.completed_runs() == 1, 120, "the first recording analysed")
        executor = stack.child("executor")
        idle_mb = resident_mb(executor)
        restart_peak(executor)  # the hour's peak, not the start's (the runtime check opens each runtime once)
        with open(hour, "rb") as body:
            reply = stack.upload(hour.name, body, timeout_s=120)
        recording_id = reply["recording_id"]
        assert reply["duration_s"] == HOUR_S
        wait_until(lambda: stack.completed_runs() == 2, 600, "the hour analysed")
        peak_mb = peak_rss_mb([executor])
        print(f"executor idle {idle_mb:.0f} MB, peak over the hour {peak_mb:.0f} MB")
        assert peak_mb - idle_mb < 100
        rows = pq.read_table([*stack.places.detections_dir.rglob(f"{recording_id}*.parquet")][0]).to_pylist()
    finally:
        stack.stop()
    found = sorted((row["start_s"], row["scientific_name"], row["confidence"]) for row in rows)
    expected = detections_of_pieces(pieces)
    assert len(found) >= HOUR_S // PIECE_S  # the goldfinch at least once per piece's variant
    assert [(start, name) for start, name, _ in found] == [(start, name) for start, name, _ in expected]
    assert [confidence for *_, confidence in found] == pytest.approx(
        [confidence for *_, confidence in expected], abs=1e-4
    )
