"""Lossless FLAC copies of PCM WAV recordings for the archive (about half the bytes of the field recordings).

A copy is kept only when what the encoder recorded of its input matches the source: FLAC's STREAMINFO holds the
format, the length and the MD5 of the samples libFLAC encoded, and the MD5 is taken of the same samples here as
they are handed over. That checks the whole path from the WAV to the encoder without decoding the copy again
(a second decode was ~8 ms of a 10 s recording's ~20 ms of archive work). It carries the SHA-256 of the WAV it
came from in a Vorbis comment, so the archived file still names the recording it is: a rerun or a backfill
recognises the audio by the content hash of the original.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from birdflow.core.errors import BirdflowError

IDENTITY_PREFIX = "birdflow-source-sha256="
# WAV sample formats FLAC holds losslessly (libsndfile writes FLAC of 8, 16 and 24 bits), and their bits
FLAC_SUBTYPES = {"PCM_U8": "PCM_S8", "PCM_S8": "PCM_S8", "PCM_16": "PCM_16", "PCM_24": "PCM_24"}
SAMPLE_BITS = {"PCM_S8": 8, "PCM_16": 16, "PCM_24": 24}
BLOCK_FRAMES = 1 << 18
STREAMINFO_END = 42  # "fLaC", a metadata block header, then the 34 bytes of STREAMINFO


class FlacError(BirdflowError):
    """The copy is not what its source holds."""


@dataclass(frozen=True)
class StreamInfo:
    sample_rate: int
    channels: int
    bits: int
    frames: int
    samples_md5: bytes


def can_encode(wav: Path) -> bool:
    """FLAC (through libsndfile) holds 8-, 16- and 24-bit PCM; 32-bit and float WAVs stay WAV."""
    return soundfile.info(str(wav)).subtype in FLAC_SUBTYPES


def encode_flac(wav: Path, flac: Path, source_sha256: str) -> None:
    """Write `flac` from `wav` and check it against the samples handed to the encoder; FlacError (and no file)
    otherwise."""
    info = soundfile.info(str(wav))
    subtype = FLAC_SUBTYPES[info.subtype]
    bits, samples_md5 = SAMPLE_BITS[subtype], hashlib.md5()
    with soundfile.SoundFile(
        str(flac), "w", samplerate=info.samplerate, channels=info.channels, format="FLAC", subtype=subtype
    ) as out:
        out.comment = IDENTITY_PREFIX + source_sha256
        for block in soundfile.blocks(str(wav), blocksize=BLOCK_FRAMES, dtype="int32", always_2d=True):
            out.write(block)
            samples_md5.update(flac_sample_bytes(block, bits))
    expected = StreamInfo(info.samplerate, info.channels, bits, info.frames, samples_md5.digest())
    try:
        check_flac(flac, expected, wav.name)
    except FlacError:
        flac.unlink(missing_ok=True)
        raise


def flac_sample_bytes(block: np.ndarray, bits: int) -> bytes:
    """Samples (int32, as libsndfile reads any PCM: left-aligned) as FLAC's MD5 takes them: signed, little-endian,
    in the fewest whole bytes, interleaved."""
    samples = block >> (32 - bits)
    if bits == 24:
        return samples.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return samples.astype("<i2" if bits == 16 else "i1").tobytes()


def stream_info(header: bytes) -> StreamInfo | None:
    """What a FLAC file's first bytes say of its stream (None when they are not a FLAC STREAMINFO)."""
    if len(header) < STREAMINFO_END or header[:4] != b"fLaC" or (header[4] & 0x7F) != 0:
        return None
    packed = int.from_bytes(header[18:26], "big")  # 20 bits rate, 3 channels - 1, 5 bits - 1, 36 frames
    return StreamInfo(
        sample_rate=packed >> 44,
        channels=((packed >> 41) & 0x7) + 1,
        bits=((packed >> 36) & 0x1F) + 1,
        frames=packed & ((1 << 36) - 1),
        samples_md5=header[26:42],
    )


def check_flac(flac: Path, expected: StreamInfo, source_name: str) -> None:
    """FlacError unless the copy's STREAMINFO is `expected` (format, length, MD5 of the samples)."""
    with open(flac, "rb") as file:
        found = stream_info(file.read(STREAMINFO_END))
    if found is None:
        raise FlacError(f"FLAC copy of {source_name} has no stream header")
    if found.frames != expected.frames:
        raise FlacError(f"FLAC copy of {source_name} has {found.frames} frames, its source {expected.frames}")
    if found != expected:
        raise FlacError(f"FLAC copy of {source_name} does not hold the source's samples")


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
