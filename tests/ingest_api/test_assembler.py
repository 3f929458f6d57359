"""The streaming protocol's semantics, frame by frame, on the pure assembler."""

from __future__ import annotations

import struct
import wave
from datetime import datetime, timedelta, timezone

import pytest

from birdflow.core.recordings import RecordingStore, load_info
from birdflow.core.wav import WavFormat, build_header
from birdflow.ingest_api.assembler import StreamAssembler, StreamLimits, StreamRejected
from birdflow.ingest_api.framing import METADATA_SEQ, Frame, FrameParser, FramingError, encode_frame

FORMAT = WavFormat(48000, 1, 16)
PAGE = 32768
START = datetime(2025, 6, 1, 5, 30, tzinfo=timezone.utc)


def page(value: int, size: int = PAGE) -> bytes:
    """A page whose samples all equal `value`, so the assembled file shows where each page went."""
    return struct.pack("<h", value) * (size // 2)


def pcm_header(sample_rate: int = 48000, size_field: int = 0) -> bytes:
    return build_header(WavFormat(sample_rate, 1, 16), size_field).raw


@pytest.fixture
def store(tmp_path):
    return RecordingStore(tmp_path / "partial", tmp_path / "recordings", "station-t")


def make(store, min_s=0.1, max_s=20.0, max_gap_pages=9, events=None):
    limits = StreamLimits(min_s, max_s, max_gap_pages, FORMAT)
    clock = iter(START + timedelta(minutes=i) for i in range(1000))
    record = (lambda name, count: events.append(name)) if events is not None else (lambda name, count: None)
    return StreamAssembler("mic1", store, limits, on_event=record, clock=lambda: next(clock))


def read_wav(path):
    with wave.open(str(path)) as wav:
        return wav.getframerate(), wav.readframes(wav.getnframes())


def samples(audio: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(audio) // 2}h", audio))


def test_header_then_pages_make_a_valid_wav_with_patched_sizes(store):
    assembler = make(store)
    assembler.handle(Frame(0, pcm_header(size_field=123456)))
    for seq in range(1, 5):
        assembler.handle(Frame(seq, page(seq)))
    stats = assembler.finish()
    assert len(stats.recordings) == 1
    info = stats.recordings[0]
    path = store.recordings_dir / info.file_name
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 4)[0] == len(raw) - 8
    assert struct.unpack_from("<I", raw, 40)[0] == 4 * PAGE
    rate, audio = read_wav(path)
    assert rate == 48000 and samples(audio)[:: PAGE // 2] == [1, 2, 3, 4]
    assert info.start_time == START and info.duration_s == pytest.approx(4 * PAGE / 96000)
    assert info.recording_id.startswith("mic1_20250601T053000Z_") and load_info(path) == info


def test_frame_parser_reassembles_frames_split_across_any_chunking():
    stream = b"".join(encode_frame(seq, page(seq, 1000)) for seq in range(5)) + encode_frame(METADATA_SEQ, b"{}")
    for chunk_size in (1, 5, 6, 7, 999, 1006, len(stream)):
        parser = FrameParser(max_payload=4096)
        frames = [
            frame
            for start in range(0, len(stream), chunk_size)
            for frame in parser.feed(stream[start : start + chunk_size])
        ]
        assert [frame.seq for frame in frames] == [0, 1, 2, 3, 4, METADATA_SEQ]
        assert frames[3].payload == page(3, 1000) and parser.pending_bytes == 0


def test_frame_longer_than_the_limit_is_malformed():
    parser = FrameParser(max_payload=1024)
    with pytest.raises(FramingError, match="exceeds"):
        list(parser.feed(encode_frame(1, b"x" * 2000)))


def test_gap_is_padded_with_silence_and_counted(store):
    events = []
    assembler = make(store, events=events)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(4, page(4)))  # pages 2 and 3 lost
    info = assembler.finish().recordings[0]
    _, audio = read_wav(store.recordings_dir / info.file_name)
    assert samples(audio)[:: PAGE // 2] == [1, 0, 0, 4]
    assert info.gaps == 1 and events.count("gap") == 1


def test_large_jump_closes_the_recording_and_drops_frames_until_the_next_start(store):
    assembler = make(store)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(20, page(20)))  # beyond 9 missing pages
    assembler.handle(Frame(21, page(21)))
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(7)))
    stats = assembler.finish()
    assert len(stats.recordings) == 2 and stats.dropped_frames == 2
    first = samples(read_wav(store.recordings_dir / stats.recordings[0].file_name)[1])
    assert set(first) == {1}


def test_sequence_wraps_past_0xfffffe_without_a_gap(store):
    assembler = make(store)
    # a recording that (re)starts with a header frame late in the sequence space
    assembler.handle(Frame(0xFFFFFC, pcm_header()))
    for seq, value in ((0xFFFFFD, 1), (0xFFFFFE, 2), (METADATA_SEQ, None), (1, 3), (2, 4)):
        assembler.handle(Frame(seq, page(value) if value else b'{"battery": 3.9}'))
    stats = assembler.finish()
    assert stats.gaps == 0 and stats.dropped_frames == 0 and stats.metadata_frames == 1
    info = stats.recordings[0]
    assert samples(read_wav(store.recordings_dir / info.file_name)[1])[:: PAGE // 2] == [1, 2, 3, 4]


def test_repeated_page_is_dropped_not_written_twice(store):
    assembler = make(store)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(2, page(2)))
    stats = assembler.finish()
    assert stats.dropped_frames == 1
    assert samples(read_wav(store.recordings_dir / stats.recordings[0].file_name)[1])[:: PAGE // 2] == [1, 2]


def test_rollover_at_max_duration_continues_with_the_same_header(store):
    assembler = make(store, max_s=1.0)  # 96 000 bytes per recording
    assembler.handle(Frame(0, pcm_header()))
    for seq in range(1, 8):  # 7 pages = 229 376 bytes = 2.39 s
        assembler.handle(Frame(seq, page(seq)))
    stats = assembler.finish()
    durations = [info.duration_s for info in stats.recordings]
    assert durations[:2] == [1.0, 1.0] and durations[2] == pytest.approx(7 * PAGE / 96000 - 2)
    starts = [info.start_time for info in stats.recordings]
    assert starts == [START, START + timedelta(seconds=1), START + timedelta(seconds=2)]
    total = b"".join(read_wav(store.recordings_dir / info.file_name)[1] for info in stats.recordings)
    assert total == b"".join(page(seq) for seq in range(1, 8))


def test_short_recording_is_discarded_and_counted(store):
    events = []
    assembler = make(store, min_s=3.0, events=events)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    stats = assembler.finish()
    assert not stats.recordings and stats.closed == 0 and stats.discarded == 1 and "recording_discarded" in events
    assert list(store.recordings_dir.iterdir()) == [] and list(store.partial_dir.iterdir()) == []


def test_header_in_the_middle_of_a_recording_starts_a_new_one(store):
    assembler = make(store)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(2, pcm_header(sample_rate=16000) + page(9, 3200)))
    assembler.handle(Frame(3, page(3, 32000)))
    stats = assembler.finish()
    assert [info.sample_rate for info in stats.recordings] == [48000, 16000]
    rate, audio = read_wav(store.recordings_dir / stats.recordings[1].file_name)
    assert rate == 16000 and len(audio) == 3200 + 32000


def test_seq0_without_header_reuses_the_last_header_and_audio_before_any_header_is_dropped(store):
    assembler = make(store)
    assembler.handle(Frame(5, page(5)))  # no recording open yet
    assembler.handle(Frame(0, pcm_header(sample_rate=32000)))
    assembler.handle(Frame(1, page(1)))
    assembler.handle(Frame(0, page(2)))  # next recording, no header
    assembler.handle(Frame(1, page(3)))
    stats = assembler.finish()
    assert stats.dropped_frames == 1
    assert [info.sample_rate for info in stats.recordings] == [32000, 32000]


def test_non_pcm_header_is_rejected_and_the_open_recording_is_kept(store):
    assembler = make(store)
    assembler.handle(Frame(0, pcm_header()))
    assembler.handle(Frame(1, page(1)))
    float_header = bytearray(pcm_header())
    float_header[20:22] = struct.pack("<H", 3)  # IEEE float
    with pytest.raises(StreamRejected, match="not PCM"):
        assembler.handle(Frame(0, bytes(float_header)))
    assert len(assembler.finish().recordings) == 1
