"""RIFF/WAVE headers: parse what listeners send, build a default one, patch sizes when a recording closes."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from birdflow.core.errors import Unprocessable

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The first two bytes of the PCM sub-format GUID of WAVE_FORMAT_EXTENSIBLE.
PCM_SUBFORMAT_PREFIX = b"\x01\x00"
PLAIN_HEADER_BYTES = 44
# What BirdNET can use and listeners really send: 8-192 kHz, 16/24/32-bit PCM, up to 8 channels.
# Narrower formats would only multiply recordings (and flow runs) per byte received.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
SAMPLE_WIDTHS = (16, 24, 32)
MAX_CHANNELS = 8


class WavError(Unprocessable):
    """The bytes are not a RIFF/WAVE PCM header."""


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    channels: int
    bits_per_sample: int

    @property
    def block_align(self) -> int:
        return self.channels * (self.bits_per_sample // 8)

    @property
    def byte_rate(self) -> int:
        return self.sample_rate * self.block_align


@dataclass(frozen=True)
class WavHeader:
    """A header as the listener sent it: every byte up to and including the data chunk's size field."""

    format: WavFormat
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)


def looks_like_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def parse_header(data: bytes) -> WavHeader:
    """Find the fmt and data chunks; raise WavError unless this is an uncompressed PCM header.

    The header ends right after the data chunk's 4-byte size field; the bytes that follow are audio.
    """
    if not looks_like_wav(data):
        raise WavError("not a RIFF/WAVE header")
    offset = 12
    wav_format = None
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (chunk_size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"data":
            if wav_format is None:
                raise WavError("WAV data chunk comes before its fmt chunk")
            return WavHeader(wav_format, bytes(data[:body]))
        if chunk_id == b"fmt ":
            if chunk_size < 16 or body + 16 > len(data):
                raise WavError("WAV fmt chunk is truncated")
            wav_format = _parse_fmt(data[body : body + chunk_size])
        offset = body + chunk_size + (chunk_size & 1)
    raise WavError("WAV header has no data chunk")


def _parse_fmt(fmt: bytes) -> WavFormat:
    tag, channels, sample_rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", fmt, 0)
    if tag == WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26 and fmt[24:26] == PCM_SUBFORMAT_PREFIX:
        tag = WAVE_FORMAT_PCM
    if tag != WAVE_FORMAT_PCM:
        raise WavError(f"WAV audio format {tag:#06x} is not PCM")
    if bits not in SAMPLE_WIDTHS:
        raise WavError(f"WAV bits per sample {bits} is not supported (16, 24 or 32)")
    check_rate_and_channels(sample_rate, channels)
    return WavFormat(sample_rate=sample_rate, channels=channels, bits_per_sample=bits)


def check_rate_and_channels(sample_rate: int, channels: int) -> None:
    """Raise WavError for a sample rate or channel count birdflow does not take (any container)."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise WavError(f"sample rate {sample_rate} Hz is not supported ({MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise WavError(f"{channels} channels are not supported (1-{MAX_CHANNELS})")


def build_header(wav_format: WavFormat, data_bytes: int = 0) -> WavHeader:
    """A plain 44-byte PCM header, for streams that never sent one."""
    raw = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        PLAIN_HEADER_BYTES - 8 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        WAVE_FORMAT_PCM,
        wav_format.channels,
        wav_format.sample_rate,
        wav_format.byte_rate,
        wav_format.block_align,
        wav_format.bits_per_sample,
        b"data",
        data_bytes,
    )
    return WavHeader(wav_format, raw)


def patch_sizes(file: BinaryIO, header_size: int, data_bytes: int) -> None:
    """Rewrite the RIFF and data sizes of a file whose header is header_size bytes long."""
    file.seek(4)
    file.write(struct.pack("<I", header_size - 8 + data_bytes))
    file.seek(header_size - 4)
    file.write(struct.pack("<I", data_bytes))
    file.seek(0, 2)
