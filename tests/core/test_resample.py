"""Resampling to 48 kHz without numba: the samples, windows and detections resampy's kaiser_fast gives (what
birdnetlib reads audio with), at the rates recorders use, in pieces of any size, with bounded working memory."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pytest
import resampy
import soundfile

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import MODEL_SAMPLE_RATE, windows
from birdflow.core.birdnet import BirdNET
from birdflow.core.resample import MAX_MATRIX_WEIGHTS, _phases, resample, resample_stream, resampled_length

RECORDER_RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 96000, 192000, 384000]


def mono(path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32), rate


@pytest.mark.parametrize("rate", RECORDER_RATES)
def test_samples_match_resampy_kaiser_fast_at_recorder_rates(rate):
    noise = (np.random.default_rng(rate).standard_normal(rate) * 0.2).astype(np.float32)
    expected = resampy.resample(noise, rate, MODEL_SAMPLE_RATE, filter="kaiser_fast")
    found = resample(noise, rate, MODEL_SAMPLE_RATE)
    assert found.dtype == np.float32 and len(found) == len(expected) == resampled_length(rate, rate, MODEL_SAMPLE_RATE)
    assert np.abs(found - expected).max() < 1e-6


def test_pieces_of_any_size_give_the_whole_signals_samples(sample_44k1):
    samples, rate = mono(sample_44k1)
    whole = resample(samples, rate, MODEL_SAMPLE_RATE)
    cuts = np.sort(np.random.default_rng(7).integers(0, len(samples), 40))
    pieces = np.split(samples, cuts) + [np.zeros(0, np.float32)]
    streamed = list(resample_stream(pieces, rate, MODEL_SAMPLE_RATE))
    assert np.array_equal(np.concatenate(streamed), whole)
    assert max(len(piece) for piece in streamed) <= len(whole)


def test_an_odd_rate_is_resampled_near_its_ratio_with_a_bounded_filter():
    rate = 44056  # 48000/44056 = 6000/5507: one phase per output would be a 33-million-weight matrix
    phases = _phases(rate, MODEL_SAMPLE_RATE)
    assert phases.weights.size <= MAX_MATRIX_WEIGHTS
    assert abs(phases.outputs / phases.inputs - MODEL_SAMPLE_RATE / rate) < 1e-5
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate * 2) / rate).astype(np.float32)
    found = resample(tone, rate, MODEL_SAMPLE_RATE)
    assert len(found) == resampled_length(len(tone), rate, MODEL_SAMPLE_RATE)
    spectrum = np.abs(np.fft.rfft(found[4800:-4800]))
    assert abs(np.argmax(spectrum) * MODEL_SAMPLE_RATE / (len(found) - 9600) - 1000) < 1.0  # still a 1 kHz tone


def test_a_long_soundscape_keeps_its_detections_and_scores(sample_44k1, sample_48k):
    """Two minutes of the field recordings at 44.1 kHz, each copy at another gain: what the model hears after
    our resampling is what it heard after resampy's."""
    quiet, rate = mono(sample_44k1)
    loud = resampy.resample(mono(sample_48k)[0], MODEL_SAMPLE_RATE, rate, filter="kaiser_fast")
    soundscape = np.concatenate([piece * gain for gain in (1.0, 0.5, 0.8, 0.3, 1.2, 0.6) for piece in (quiet, loud)])
    soundscape = soundscape.astype(np.float32)[: rate * 120]
    model = BirdNET(batch_size=4)
    ours, starts = windows(resample(soundscape, rate, MODEL_SAMPLE_RATE))
    theirs, _ = windows(resampy.resample(soundscape, rate, MODEL_SAMPLE_RATE, filter="kaiser_fast"))
    scores = [1 / (1 + np.exp(-np.clip(model.logits(batch), -15, 15))) for batch in (ours, theirs)]
    assert np.abs(scores[0] - scores[1]).max() < 1e-4
    when = datetime(2025, 6, 15, tzinfo=timezone.utc)
    heard = [model.detect(batch, starts, AnalysisParams(), when) for batch in (ours, theirs)]
    assert [(d.scientific_name, d.start_s) for d in heard[0]] == [(d.scientific_name, d.start_s) for d in heard[1]]
    assert len(heard[0]) >= 6


def test_decoding_other_rates_loads_neither_numba_nor_librosa(sample_44k1):
    probe = (
        "import sys; from birdflow.core.audio import decode; decode(sys.argv[1]); "
        "print(sorted({'numba', 'llvmlite', 'resampy', 'librosa', 'scipy'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(sample_44k1)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
