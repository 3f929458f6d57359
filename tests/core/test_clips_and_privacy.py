"""Clips (FLAC + spectrogram), which clips stay, and the privacy filter's spans and silencing."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import soundfile
from PIL import Image

from birdflow.core.birdnet import Heard
from birdflow.core.clips import (
    BOTTOM_MARGIN,
    FFT_SIZE,
    LEFT_MARGIN,
    RIGHT_MARGIN,
    TOP_MARGIN,
    ClipIndex,
    clip_budget,
    clip_plan,
    flac_bytes,
    spectrogram,
    spectrogram_png,
)
from birdflow.core.privacy import human_spans, silenced, write_silenced_copy

RATE = 48000


def tone(frequency_hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def test_a_clip_is_the_window_with_padding_inside_the_recording():
    at = datetime(2025, 6, 1, 5, 30, 3, tzinfo=timezone.utc)
    plan = clip_plan(
        "north", "mic1_20250601T053000Z_ab", "Junco hyemalis", at, 3.0, 6.0, padding_s=1.0, duration_s=10.0
    )
    assert plan.base_key == "clips/north/Junco_hyemalis/2025/06/01/mic1_20250601T053000Z_ab_3s"
    assert (plan.start_s, plan.end_s) == (2.0, 7.0)
    edge = clip_plan("north", "r", "Junco hyemalis", at, 0.0, 3.0, padding_s=1.5, duration_s=3.5)
    assert (edge.start_s, edge.end_s) == (0.0, 3.5)
    assert [clip_budget(seconds) for seconds in (3.0, 10.0, 10.5, 20.0, 60.0)] == [1, 1, 2, 2, 6]


def test_the_flac_clip_decodes_to_the_samples_and_the_spectrogram_shows_the_tone_where_it_is():
    audio = tone(4000, 5.0)
    decoded, rate = soundfile.read(io.BytesIO(flac_bytes(audio, RATE)), dtype="float32")
    assert rate == RATE and len(decoded) == len(audio) and np.max(np.abs(decoded - audio)) < 1e-4
    power = spectrogram(audio, RATE)
    loudest_bin = int(np.argmax(power.mean(axis=1)))
    assert abs(loudest_bin * RATE / FFT_SIZE - 4000) < RATE / FFT_SIZE  # the 4 kHz row
    image = Image.open(io.BytesIO(spectrogram_png(audio, RATE, start_s=11.0)))
    assert image.format == "PNG" and image.mode == "L"
    rows, columns = power.shape
    assert image.size == (LEFT_MARGIN + columns + RIGHT_MARGIN, TOP_MARGIN + rows + BOTTOM_MARGIN)
    pixels = np.asarray(image)
    plot = pixels[TOP_MARGIN : TOP_MARGIN + rows, LEFT_MARGIN : LEFT_MARGIN + columns]
    darkest_row = int(np.argmin(plot.mean(axis=1)))  # loud is dark; high frequencies at the top
    assert abs((rows - 1 - darkest_row) - loudest_bin) <= 1
    # the axes: a tick label beside the 4 kHz row, and labels under the plot (11 ... 15 s into the recording)
    four_khz = TOP_MARGIN + rows - round(4000 / (RATE / FFT_SIZE))
    assert pixels[four_khz - 4 : four_khz + 5, : LEFT_MARGIN - 6].min() < 100
    under = pixels[TOP_MARGIN + rows + 6 :, LEFT_MARGIN:]
    inked = np.flatnonzero(under.min(axis=0) < 100)
    assert len(inked) and inked.max() - inked.min() > columns * 0.6  # labels spread along the whole time axis


def test_clips_per_species_and_day_keep_the_best_and_never_the_best_clip_of_a_species(tmp_path):
    index = ClipIndex(tmp_path / "clips.sqlite", per_day=2)
    assert index.keep("a", "s", "Junco", "2025-06-01", 0.95) == []
    assert index.keep("b", "s", "Junco", "2025-06-01", 0.7) == []
    assert not index.wanted("s", "Junco", "2025-06-01", 0.6)  # the day is full of better ones
    assert index.wanted("s", "Junco", "2025-06-01", 0.8)
    assert index.keep("c", "s", "Junco", "2025-06-01", 0.8) == ["b"]
    assert index.count("s", "Junco", "2025-06-01") == 2
    # another day: its own two, but the species' best (a, 0.95) is never pushed out
    index.keep("d", "s", "Junco", "2025-06-02", 0.6)
    index.keep("e", "s", "Junco", "2025-06-02", 0.65)
    assert index.keep("f", "s", "Junco", "2025-06-02", 0.7) == ["d"]
    assert index.count("s", "Junco") == 4 and index.wanted("s", "Siskin", "2025-06-01", 0.1)
    # a clip under review leaves the budget: better ones no longer push it out
    index.release("e")
    assert index.keep("g", "s", "Junco", "2025-06-02", 0.9) == [] and index.count("s", "Junco", "2025-06-02") == 2


def test_human_windows_merge_and_are_silenced_in_what_is_kept(tmp_path):
    heard = Heard([], [0.0, 3.0, 6.0, 9.0], [0.9, 0.4, 0.1, 0.6])
    assert human_spans(heard, 0.3) == [(0.0, 6.0), (9.0, 12.0)]
    assert human_spans(heard, 0.95) == []
    audio = tone(1000, 10.0)
    quiet = silenced(audio, RATE, [(0.0, 6.0)], offset_s=2.0)  # a clip that starts 2 s into the recording
    assert not quiet[: 4 * RATE].any() and np.array_equal(quiet[4 * RATE :], audio[4 * RATE :])
    source = tmp_path / "r.wav"
    soundfile.write(str(source), (audio * 20000).astype(np.int16), RATE, subtype="PCM_16")
    copy = tmp_path / "r.flac"
    write_silenced_copy(source, copy, [(3.0, 6.0)], as_flac=True, source_sha256="ab" * 32)
    samples, _ = soundfile.read(str(copy), dtype="int16")
    original, _ = soundfile.read(str(source), dtype="int16")
    assert not samples[3 * RATE : 6 * RATE].any()
    assert np.array_equal(samples[: 3 * RATE], original[: 3 * RATE]) and np.array_equal(
        samples[6 * RATE :], original[6 * RATE :]
    )
