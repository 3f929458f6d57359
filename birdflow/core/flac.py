"""Lossless FLAC copies of PCM WAV recordings for the archive (about half the bytes of the field recordings).

A copy is kept only after it decodes back to exactly the samples of its source. It carries the SHA-256 of
the WAV it came from in a Vorbis comment, so the archived file still names the recording it is: a rerun or
a backfill recognises the audio by the content hash of the original.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile

IDENTITY_PREFIX = "birdflow-source-sha256="
# WAV sample formats FLAC holds losslessly (libsndfile writes FLAC of 8, 16 and 24 bits)
FLAC_SUBTYPES = {"PCM_U8": "PCM_S8", "PCM_S8": "PCM_S8", "PCM_16": "PCM_16", "PCM_24": "PCM_24"}
BLOCK_FRAMES = 1 << 18


class FlacError(ValueError):
    """The copy does not decode to the source's samples."""


def can_encode(wav: Path) -> bool:
    """FLAC (through libsndfile) holds 8-, 16- and 24-bit PCM; 32-bit and float WAVs stay WAV."""
    return soundfile.info(str(wav)).subtype in FLAC_SUBTYPES


def encode_flac(wav: Path, flac: Path, source_sha256: str) -> None:
    """Write `flac` from `wav` and check it sample for sample; FlacError (and no file) otherwise."""
    info = soundfile.info(str(wav))
    with soundfile.SoundFile(
        str(flac),
        "w",
        samplerate=info.samplerate,
        channels=info.channels,
        format="FLAC",
        subtype=FLAC_SUBTYPES[info.subtype],
    ) as out:
        out.comment = IDENTITY_PREFIX + source_sha256
        for block in soundfile.blocks(str(wav), blocksize=BLOCK_FRAMES, dtype="int32", always_2d=True):
            out.write(block)
    try:
        _check_identical(wav, flac)
    except FlacError:
        flac.unlink(missing_ok=True)
        raise


def _check_identical(wav: Path, flac: Path) -> None:
    with soundfile.SoundFile(str(wav)) as source, soundfile.SoundFile(str(flac)) as copy:
        if copy.frames != source.frames:
            raise FlacError(f"FLAC copy of {wav.name} has {copy.frames} frames, its source {source.frames}")
        while True:
            expected = source.read(BLOCK_FRAMES, dtype="int32", always_2d=True)
            if not len(expected):
                return
            if not np.array_equal(copy.read(BLOCK_FRAMES, dtype="int32", always_2d=True), expected):
                raise FlacError(f"FLAC copy of {wav.name} does not decode to the source's samples")


def flac_identity(source: Path | bytes) -> str | None:
    """The SHA-256 of the WAV a birdflow FLAC was made from, or None for any other file."""
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as file:
            if file.format != "FLAC":
                return None
            comment = file.comment or ""
    except (soundfile.LibsndfileError, RuntimeError):
        return None
    return comment[len(IDENTITY_PREFIX) :] if comment.startswith(IDENTITY_PREFIX) else None
