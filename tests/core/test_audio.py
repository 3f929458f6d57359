"""Decoding a block at a time: the windows, the resampled signal and a clip's span are those of the whole file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from birdflow.core.audio import (
    MIN_WINDOW_S,
    MODEL_SAMPLE_RATE,
    WINDOW_SAMPLES,
    AudioError,
    audio_info,
    decode,
    decode_span,
    decoded_blocks,
    window_batches,
)


def windows_of_the_whole(samples: np.ndarray, overlap_s: float) -> tuple[np.ndarray, list[float]]:
    """The rule spelled out on the whole signal: a window every (3 - overlap) s, a tail of >= 1.5 s zero-padded."""
    step = int((3.0 - overlap_s) * MODEL_SAMPLE_RATE)
    starts = [
        start for start in range(0, len(samples), step) if len(samples) - start >= MIN_WINDOW_S * MODEL_SAMPLE_RATE
    ]
    rows = np.zeros((len(starts), WINDOW_SAMPLES), np.float32)
    for row, start in enumerate(starts):
        piece = samples[start : start + WINDOW_SAMPLES]
        rows[row, : len(piece)] = piece
    return rows, [start / MODEL_SAMPLE_RATE for start in starts]


@pytest.mark.parametrize("seconds, overlap_s", [(10.0, 0.0), (10.0, 1.5), (4.4, 0.0), (1.4, 0.0), (31.7, 0.5)])
def test_windows_from_blocks_of_any_size_are_those_of_the_whole_signal(seconds, overlap_s):
    signal = np.random.default_rng(7).standard_normal(int(seconds * MODEL_SAMPLE_RATE)).astype(np.float32)
    expected, expected_starts = windows_of_the_whole(signal, overlap_s)
    cuts = np.sort(np.random.default_rng(int(seconds)).integers(0, len(signal), 9))
    blocks = np.split(signal, cuts)  # uneven, some empty
    batches = list(window_batches(blocks, overlap_s, per_batch=3))
    assert all(len(batch) <= 3 for batch, _ in batches)
    found = np.concatenate([batch for batch, _ in batches]) if batches else np.zeros((0, WINDOW_SAMPLES))
    assert np.array_equal(found, expected)
    assert [start for _, starts in batches for start in starts] == expected_starts


def test_a_file_decoded_in_blocks_is_the_file_decoded_at_once(sample_44k1):
    whole = decode(sample_44k1)
    pieces = list(decoded_blocks(sample_44k1, block_s=0.7))
    assert len(pieces) > 10 and len(whole) == 10 * MODEL_SAMPLE_RATE
    assert np.abs(np.concatenate(pieces) - whole).max() < 1e-6


@pytest.mark.parametrize("which", ["sample_48k", "sample_44k1"])
def test_a_clips_span_is_read_without_the_rest_and_is_that_part_of_the_whole(which, request):
    path = request.getfixturevalue(which)
    whole = decode(path)
    for start_s, end_s in [(2.25, 7.5), (1.00001, 4.3), (0.0, 3.0), (8.0, 10.0)]:
        expected = whole[int(start_s * MODEL_SAMPLE_RATE) : int(end_s * MODEL_SAMPLE_RATE)]
        assert np.array_equal(decode_span(path, start_s, end_s), expected), (start_s, end_s)


def test_an_hour_long_file_is_described_without_decoding_it(tmp_path):
    path = tmp_path / "hour.flac"
    with soundfile.SoundFile(path, "w", samplerate=48000, channels=1, format="FLAC") as out:
        for _ in range(60):
            out.write(np.zeros(60 * 48000, np.int16))
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.duration_s) == (48000, 1, 3600.0)
    with pytest.raises(AudioError):
        audio_info(b"RIFF\x00\x00\x00\x00WAVEnot audio")
