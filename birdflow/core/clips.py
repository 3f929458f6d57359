"""Clips of detections: the 3 s window (plus padding) as FLAC and a spectrogram PNG, and which ones to keep.

The spectrogram is a numpy STFT drawn with Pillow: no plotting stack in the flow. Which clips stay is the
rule BirdNET-Pi and BirdNET-Go users ask for: at most `per_day` per species and day, the most confident,
and never the best clip of a species (the one a station would show for it). In the local archive, clips
are under the same caps as the recordings of their day (`local_archive_max_gb`, `..._max_days`).
"""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from birdflow.core.local_db import LocalDatabase

FFT_SIZE = 512  # 94 Hz bins: 128 rows up to 12 kHz, half the cost of 1024 for a picture
HOP = 512  # 10.7 ms at 48 kHz: ~470 columns for a 5 s clip
MAX_FREQUENCY_HZ = 12000  # birds are below; the image keeps its height for them
DYNAMIC_RANGE_DB = 60.0
# one clip costs ~7 % of the analysis of 10 s of audio: at most one per started 10 s keeps clips under ~10 %
AUDIO_S_PER_CLIP = 10.0


@dataclass(frozen=True)
class ClipPlan:
    """Where one detection's clip goes and which part of the recording it holds."""

    base_key: str  # without extension: .flac and .png beside each other
    start_s: float
    end_s: float


def clip_budget(duration_s: float) -> int:
    """How many clips a recording may make (its most confident detections get them)."""
    return max(1, math.ceil(duration_s / AUDIO_S_PER_CLIP - 1e-9))


def species_folder(scientific_name: str) -> str:
    """A species as one safe path part: "Junco hyemalis" -> "Junco_hyemalis"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", scientific_name).strip("_") or "unknown"


def clip_plan(
    station_id: str,
    recording_id: str,
    scientific_name: str,
    detected_at: datetime,
    start_s: float,
    end_s: float,
    padding_s: float,
    duration_s: float,
) -> ClipPlan:
    start, end = max(0.0, start_s - padding_s), min(duration_s, end_s + padding_s)
    key = f"clips/{station_id}/{species_folder(scientific_name)}/{detected_at:%Y/%m/%d}/{recording_id}_{start_s:g}s"
    return ClipPlan(key, start, end)


def flac_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit FLAC of float samples in [-1, 1]."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def spectrogram(samples: np.ndarray, rate: int) -> np.ndarray:
    """Power in dB (frequency rows, low first; time columns) up to MAX_FREQUENCY_HZ."""
    if len(samples) < FFT_SIZE:
        samples = np.pad(samples, (0, FFT_SIZE - len(samples)))
    count = 1 + (len(samples) - FFT_SIZE) // HOP
    frames = np.lib.stride_tricks.as_strided(
        samples, shape=(count, FFT_SIZE), strides=(samples.strides[0] * HOP, samples.strides[0]), writeable=False
    )
    bins = int(MAX_FREQUENCY_HZ / (rate / FFT_SIZE))
    spectrum = np.fft.rfft(frames * _window(), axis=1)[:, :bins]
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return 10.0 * np.log10(power.T + np.float32(1e-12))


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    return np.hanning(FFT_SIZE).astype(np.float32)


# the picture's margins, for the axes' tick labels (Pillow's built-in font is 11 px high)
LEFT_MARGIN, BOTTOM_MARGIN, TOP_MARGIN, RIGHT_MARGIN = 44, 34, 8, 10
TICK = 4


def spectrogram_png(samples: np.ndarray, rate: int, start_s: float = 0.0) -> bytes:
    """The spectrogram as a PNG: high frequencies up, loud is dark on white (as field guides print them), with a
    frequency axis in kHz and a time axis in seconds into the recording (the clip starts `start_s` into it)."""
    from PIL import Image

    decibels = spectrogram(samples.astype(np.float32), rate)
    loudest = decibels.max()
    scaled = np.clip((decibels - (loudest - DYNAMIC_RANGE_DB)) * np.float32(255 / DYNAMIC_RANGE_DB), 0, 255)
    pixels = np.ascontiguousarray((255 - scaled).astype(np.uint8)[::-1])
    height, width = pixels.shape
    canvas = Image.new("L", (LEFT_MARGIN + width + RIGHT_MARGIN, TOP_MARGIN + height + BOTTOM_MARGIN), 255)
    canvas.paste(Image.fromarray(pixels, mode="L"), (LEFT_MARGIN, TOP_MARGIN))
    _draw_axes(canvas, height, width, rate, len(samples) / rate, start_s)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)  # fast: ~10 % larger
    return buffer.getvalue()


def _draw_axes(canvas, height: int, width: int, rate: int, duration_s: float, start_s: float) -> None:
    """Ticks and labels: every 2 kHz up the left side, every second (or half second) along the bottom."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    left, top, bottom = LEFT_MARGIN, TOP_MARGIN, TOP_MARGIN + height
    draw.rectangle((left - 1, top - 1, left + width, bottom), outline=0)
    hz_per_row = rate / FFT_SIZE
    for khz in range(0, MAX_FREQUENCY_HZ // 1000 + 1, 2):
        y = bottom - round(khz * 1000 / hz_per_row)
        draw.line((left - TICK, y, left - 1, y), fill=0)
        draw.text((left - TICK - 2, y), f"{khz}", fill=0, anchor="rm")
    draw.text((2, top), "kHz", fill=0, anchor="lt")
    seconds_per_column = HOP / rate
    step = 0.5 if duration_s <= 3 else 1.0
    first = math.ceil(start_s / step) * step
    for index in range(int((start_s + duration_s - first) / step) + 1):
        second = first + index * step
        x = left + round((second - start_s) / seconds_per_column)
        if x > left + width:
            break
        draw.line((x, bottom, x, bottom + TICK), fill=0)
        draw.text((x, bottom + TICK + 1), f"{second:g}", fill=0, anchor="mt")
    draw.text((left + width, bottom + TICK + 13), "s into the recording", fill=0, anchor="rt")


SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (base_key TEXT PRIMARY KEY, station_id TEXT NOT NULL, species TEXT NOT NULL,
    day TEXT NOT NULL, confidence REAL NOT NULL, kept_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clips_by_day ON clips (station_id, species, day, confidence);
"""


class ClipIndex:
    """The clips kept: enough to decide, before cutting one, whether it would stay, and which to delete."""

    def __init__(self, path: Path, per_day: int):
        self.database = LocalDatabase(path, [SCHEMA])
        self.per_day = per_day

    def wanted(self, station_id: str, species: str, day: str, confidence: float) -> bool:
        """Whether a clip of this confidence would be kept (a full day keeps only better ones)."""
        rows = self.database.execute(
            "SELECT confidence FROM clips WHERE station_id = ? AND species = ? AND day = ? ORDER BY confidence DESC "
            "LIMIT ?",
            (station_id, species, day, self.per_day),
        ).fetchall()
        return len(rows) < self.per_day or confidence > rows[-1][0]

    def keep(self, base_key: str, station_id: str, species: str, day: str, confidence: float) -> list[str]:
        """Record a stored clip; returns the base keys of the clips it pushes out (to delete from the archive)."""
        execute = self.database.execute
        with self.database.transaction():
            execute(
                "INSERT OR REPLACE INTO clips VALUES (?, ?, ?, ?, ?, ?)",
                (base_key, station_id, species, day, confidence, time.time()),
            )
            (best,) = execute(
                "SELECT base_key FROM clips WHERE station_id = ? AND species = ? ORDER BY confidence DESC, kept_at "
                "LIMIT 1",
                (station_id, species),
            ).fetchone()
            surplus = execute(
                "SELECT base_key FROM clips WHERE station_id = ? AND species = ? AND day = ?"
                " ORDER BY confidence DESC, kept_at LIMIT -1 OFFSET ?",
                (station_id, species, day, self.per_day),
            ).fetchall()
            evicted = [key for (key,) in surplus if key != best]
            for key in evicted:
                execute("DELETE FROM clips WHERE base_key = ?", (key,))
        return evicted

    def release(self, base_key: str) -> None:
        """Take a clip out of the budget (one under review): it is no longer pushed out by better ones."""
        self.database.execute("DELETE FROM clips WHERE base_key = ?", (base_key,))

    def count(self, station_id: str, species: str, day: str | None = None) -> int:
        query, parameters = "SELECT count(*) FROM clips WHERE station_id = ? AND species = ?", [station_id, species]
        if day:
            query, parameters = query + " AND day = ?", parameters + [day]
        return self.database.execute(query, parameters).fetchone()[0]
