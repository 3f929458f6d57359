"""Sample-rate conversion to the model's rate, with the filter and interpolation of resampy's "kaiser_fast"
(what birdnetlib reads audio with, so the scores stay those birdnetlib gives), in plain numpy.

resampy runs a per-sample loop compiled by numba: numba and llvmlite are ~210 MB on disk and ~150 MB in
the memory of the process that loads them. Here the same windowed-sinc weights are computed once per
*phase*: when the ratio of the two rates is L/M (48000/44100 = 160/147), every output sample is one of L
phases and each block of M input samples makes L output samples, so the whole conversion is one matrix
product per run of input blocks. Works as a stream: input in pieces of any size, output as it is ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from math import isqrt

import numpy as np

# resampy's precomputed kaiser_fast filter (24 zero crossings, 512 points each; resampy, ISC licence)
FILTER_FILE = "kaiser_fast.npy"
TABLE_POINTS = 512
# phase matrices up to ~1M weights: exact for every rate recorders use (8 kHz ... 384 kHz); a rate with
# an odd ratio to 48 kHz (44056 Hz) is resampled at the nearest ratio with few phases (drift < 1e-5)
MAX_MATRIX_WEIGHTS = 1 << 20
# input periods multiplied at once: bounds the working memory, not the length of what is resampled
BLOCK_SAMPLES = 1 << 16


@lru_cache(maxsize=1)
def _half_window() -> np.ndarray:
    with resources.files(__package__).joinpath(FILTER_FILE).open("rb") as file:
        return np.load(file)


@dataclass(frozen=True)
class _Phases:
    """The conversion as a matrix: output L*m + j is x[M*m : M*m + width] @ weights[:, j] (x padded with
    `pad` zeros in front)."""

    outputs: int  # L
    inputs: int  # M
    pad: int
    weights: np.ndarray  # (width, L)

    @property
    def width(self) -> int:
        return self.weights.shape[0]


def _wing(positions: np.ndarray, table: np.ndarray, delta: np.ndarray, step: int) -> np.ndarray:
    """Weights of one side of the filter per phase (rows), nearest input first: the table read at
    `positions` and every `step` points after, interpolated linearly as resampy does."""
    offsets = positions.astype(np.int64)
    etas = positions - offsets
    counts = (len(table) - offsets) // step
    taps = np.arange(counts.max())
    index = offsets[:, None] + taps[None, :] * step
    inside = taps[None, :] < counts[:, None]
    index = np.where(inside, index, 0)
    return np.where(inside, table[index] + etas[:, None] * delta[index], 0.0)


@lru_cache(maxsize=16)
def _phases(rate_in: int, rate_out: int) -> _Phases:
    ratio = Fraction(rate_out, rate_in)
    taps = 2 * 24 * (rate_in // rate_out + 1)
    if ratio.numerator * (ratio.denominator + taps) > MAX_MATRIX_WEIGHTS:
        ratio = 1 / (1 / ratio).limit_denominator(isqrt(MAX_MATRIX_WEIGHTS * rate_out // rate_in))
    outputs, inputs = ratio.numerator, ratio.denominator
    scale = min(1.0, rate_out / rate_in)
    table = _half_window() * scale
    delta = np.diff(table, append=table[-1])
    step = int(scale * TABLE_POINTS)
    phase = np.arange(outputs)
    first = phase * inputs // outputs  # input sample at or before each phase's output
    fraction = scale * ((phase * inputs - first * outputs) / outputs)
    left_index = fraction * TABLE_POINTS
    right_index = (scale - fraction) * TABLE_POINTS
    left = _wing(left_index, table, delta, step)
    right = _wing(right_index, table, delta, step)
    pad = left.shape[1] - 1
    weights = np.zeros((int(first.max()) + pad + 1 + right.shape[1], outputs))
    for j in range(outputs):  # column j: x[first - i] for the left wing, x[first + 1 + k] for the right
        weights[first[j] + pad - np.arange(left.shape[1]), j] = left[j]
        weights[first[j] + pad + 1 + np.arange(right.shape[1]), j] = right[j]
    return _Phases(outputs, inputs, pad, weights)


def resampled_length(samples: int, rate_in: int, rate_out: int) -> int:
    """How many samples `samples` at rate_in become (resampy's rounding)."""
    return int(samples * float(rate_out) / float(rate_in))


def resample_stream(pieces: Iterable[np.ndarray], rate_in: int, rate_out: int) -> Iterator[np.ndarray]:
    """float32 pieces at rate_in -> float32 pieces at rate_out, in order, with bounded working memory."""
    if rate_in == rate_out:
        yield from pieces
        return
    phases = _phases(rate_in, rate_out)
    held = np.zeros(phases.pad, dtype=np.float32)
    received = produced = 0
    for piece in pieces:
        received += len(piece)
        held = np.concatenate([held, piece.astype(np.float32, copy=False)])
        ready = (len(held) - phases.width) // phases.inputs + 1 if len(held) >= phases.width else 0
        if ready:
            out = _apply(phases, held, ready)
            produced += len(out)
            held = held[ready * phases.inputs :]
            yield out
    remaining = resampled_length(received, rate_in, rate_out) - produced
    if remaining > 0:
        periods = -(-remaining // phases.outputs)
        needed = (periods - 1) * phases.inputs + phases.width
        held = np.concatenate([held, np.zeros(max(0, needed - len(held)), dtype=np.float32)])
        yield _apply(phases, held, periods)[:remaining]


def _apply(phases: _Phases, held: np.ndarray, periods: int) -> np.ndarray:
    """Output of the first `periods` input periods of `held` (which holds at least their windows)."""
    windows = np.lib.stride_tricks.sliding_window_view(held, phases.width)[:: phases.inputs]
    per_block = max(1, BLOCK_SAMPLES // phases.width)
    out = np.empty((periods, phases.outputs), dtype=np.float32)
    for start in range(0, periods, per_block):
        stop = min(periods, start + per_block)
        out[start:stop] = windows[start:stop] @ phases.weights
    return out.reshape(-1)


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """The whole signal at once (see resample_stream)."""
    if rate_in == rate_out:
        return samples
    return np.concatenate(list(resample_stream([samples], rate_in, rate_out)) or [np.zeros(0, np.float32)])
