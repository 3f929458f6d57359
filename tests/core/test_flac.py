"""FLAC copies for the archive: lossless (checked against what the encoder recorded of the source's samples), and
they name the recording they came from."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import soundfile

from birdflow.core.archive import holds_recording
from birdflow.core.flac import FlacError, StreamInfo, can_encode, check_flac, encode_flac, flac_identity, stream_info
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
    # the MD5 taken here is the one the encoder recorded of its input (flac --test checks decodes against it)
    recorded = stream_info(flac.read_bytes())
    assert recorded is not None and (recorded.frames, recorded.channels) == (48000, channels)


def test_a_copy_whose_encoder_saw_other_samples_or_no_stream_is_refused(tmp_path):
    wav = tmp_path / "source.wav"
    soundfile.write(wav, np.random.default_rng(3).uniform(-0.5, 0.5, 48000), 48000, subtype="PCM_16")
    flac = tmp_path / "copy.flac"
    encode_flac(wav, flac, "cd" * 32)
    good = stream_info(flac.read_bytes())
    assert isinstance(good, StreamInfo)
    other_samples = replace(good, samples_md5=bytes(16))
    with pytest.raises(FlacError, match="does not hold the source's samples"):
        check_flac(flac, other_samples, "source.wav")
    with pytest.raises(FlacError, match="has 48000 frames, its source 48001"):
        check_flac(flac, replace(good, frames=48001), "source.wav")
    flac.write_bytes(flac.read_bytes()[:30])  # cut short inside its header
    with pytest.raises(FlacError, match="no stream header"):
        check_flac(flac, good, "source.wav")


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
