"""The privacy filter: where people were heard, and audio with those windows silenced.

BirdNET 2.4 scores every 3 s window for its human classes (Human vocal, non-vocal, whistle); a window that
reaches the threshold holds a human. With `silence` those windows are zeroed in what is kept (the archived
recording and the clips); with `drop` no audio of the recording is kept at all. Detections stay, except the
human classes themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from birdflow.core.audio import WINDOW_S
from birdflow.core.birdnet import Heard
from birdflow.core.flac import BLOCK_FRAMES, FLAC_SUBTYPES, IDENTITY_PREFIX

Spans = list[tuple[float, float]]


def human_spans(heard: Heard, threshold: float) -> Spans:
    """The (start, end) seconds of windows with a human, overlapping ones merged."""
    spans: Spans = []
    for start, score in zip(heard.window_starts, heard.human_scores):
        if score < threshold:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], start + WINDOW_S)
        else:
            spans.append((start, start + WINDOW_S))
    return spans


def silenced(samples: np.ndarray, rate: int, spans: Spans, offset_s: float = 0.0) -> np.ndarray:
    """A copy with the spans zeroed; `offset_s` is where `samples` begin in the recording (a clip's start)."""
    quiet = samples.copy()
    for start, end in spans:
        first, last = max(0, int((start - offset_s) * rate)), max(0, int((end - offset_s) * rate))
        quiet[first:last] = 0
    return quiet


def write_silenced_copy(source: Path, target: Path, spans: Spans, as_flac: bool, source_sha256: str) -> None:
    """The recording with its human spans zeroed, in its own sample format: FLAC (naming the recording it was made
    from, as archived FLAC copies do) or WAV. Copied a block at a time, whatever the recording's length."""
    import soundfile

    info = soundfile.info(str(source))
    rate, flac = info.samplerate, as_flac and info.subtype in FLAC_SUBTYPES
    form = (
        {"format": "FLAC", "subtype": FLAC_SUBTYPES[info.subtype]}
        if flac
        else {"format": "WAV", "subtype": info.subtype}
    )
    quiet_frames = [(int(start * rate), int(end * rate)) for start, end in spans]
    with soundfile.SoundFile(str(target), "w", samplerate=rate, channels=info.channels, **form) as out:
        if flac:
            out.comment = IDENTITY_PREFIX + source_sha256
        offset = 0
        for block in soundfile.blocks(str(source), blocksize=BLOCK_FRAMES, dtype="int32", always_2d=True):
            for first, last in quiet_frames:
                block[max(0, first - offset) : max(0, last - offset)] = 0
            out.write(block)
            offset += len(block)
