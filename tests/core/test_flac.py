"""FLAC copies for the archive: lossless (checked sample for sample), and they name the recording they came from."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile

from birdflow.core.archive import holds_recording
from birdflow.core.flac import can_encode, encode_flac, flac_identity
from birdflow.core.recordings import describe_audio_file


@pytest.mark.parametrize("subtype, channels", [("PCM_16", 1), ("PCM_24", 2), ("PCM_U8", 1)])
def test_flac_copies_decode_to_exactly_the_source_samples(tmp_path, subtype, channels):
    noise = np.random.default_rng(7).uniform(-0.9, 0.9, (48000, channels))
    wav = tmp_path / "source.wav"
    soundfile.write(wav, noise, 48000, subtype=subtype)
    flac = tmp_path / "copy.flac"
    encode_flac(wav, flac, "ab" * 32)
    assert np.array_equal(soundfile.read(flac, dtype="int32")[0], soundfile.read(wav, dtype="int32")[0])
    assert flac_identity(flac) == "ab" * 32 and flac_identity(flac.read_bytes()) == "ab" * 32


def test_32_bit_audio_stays_wav_and_other_files_have_no_identity(tmp_path):
    wav = tmp_path / "wide.wav"
    soundfile.write(wav, np.zeros(4800), 48000, subtype="PCM_32")
    assert not can_encode(wav)
    assert flac_identity(wav) is None and flac_identity(b"not audio") is None


def test_the_field_recording_halves_and_is_recognised_as_itself(tmp_path, sample_48k):
    source_hash = hashlib.sha256(sample_48k.read_bytes()).hexdigest()
    flac = tmp_path / f"mic1_20250601T053000Z_{source_hash[:8]}.flac"
    encode_flac(sample_48k, flac, source_hash)
    assert flac.stat().st_size < 0.55 * sample_48k.stat().st_size
    assert holds_recording(flac.read_bytes(), source_hash) and holds_recording(sample_48k.read_bytes(), source_hash)
    assert not holds_recording(flac.read_bytes(), "0" * 64)
    # a backfill of the archive sees the recording it was made from: same content hash, same id
    info = describe_audio_file(flac, "st", "backfill")
    assert info.content_hash == source_hash and info.recording_id == flac.stem
