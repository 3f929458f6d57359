"""The ingest API over real HTTP (uvicorn on loopback), with chunk boundaries chosen byte by byte."""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import wave

import httpx
import pytest

from birdflow.core.wav import WavFormat, build_header
from birdflow.ingest_api.framing import encode_frame
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until
from tests.ingest_client import chunked_post, frames_of, serving, wav_bytes


@pytest.fixture
def ingest(tmp_path):
    # these tests send recordings faster than real time: no per-minute limit
    settings = Settings(
        data_dir=tmp_path / "data", min_duration_s=0.5, max_upload_bytes=4 << 20, max_recordings_per_minute=10_000
    )
    with serving(settings) as port:
        yield settings, port


def recordings(settings: Settings) -> list:
    return sorted(settings.recordings_dir.glob("*.wav"))


def test_frames_split_across_odd_http_chunks_rebuild_the_audio_exactly(ingest, sample_48k):
    settings, port = ingest
    source = sample_48k.read_bytes()
    stream = frames_of(source)
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]  # never aligned with 32 KiB frames
    status, summary = chunked_post(port, "/recordings_stream?listener_id=mic-7", chunks)
    assert status == 200 and len(summary["recordings"]) == 1
    [path] = recordings(settings)
    with wave.open(str(path)) as stored, wave.open(str(sample_48k)) as original:
        assert stored.getframerate() == 48000
        assert stored.readframes(stored.getnframes()) == original.readframes(original.getnframes())
    assert path.name.startswith("mic-7_") and path.with_suffix(".json").is_file()


def test_client_vanishing_mid_frame_keeps_the_recording_so_far(ingest):
    settings, port = ingest
    stream = frames_of(wav_bytes(2.0))
    chunked_post(port, "/recordings_stream?listener_id=mic-8", [stream[: len(stream) - 5000]], finish=False)
    wait_until(lambda: len(recordings(settings)) == 1, 10, "recording closed after disconnect")
    with wave.open(str(recordings(settings)[0])) as stored:
        assert 1.5 < stored.getnframes() / 48000 < 2.0
    metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
    assert 'birdflow_frames_dropped_total{station="station01"} 1.0' in metrics


@pytest.mark.parametrize("listener_id", ["../escape", "a/b", "bad%00id", "", "x_y"])
def test_listener_ids_with_path_characters_are_refused(ingest, listener_id):
    settings, port = ingest
    status, body = chunked_post(port, f"/recordings_stream?listener_id={listener_id}", [frames_of(wav_bytes(1.0))])
    assert status in (400, 422) and recordings(settings) == []
    assert not (settings.data_dir.parent / "escape").exists()


def test_oversized_frame_ends_the_stream_with_400_and_keeps_the_open_recording(ingest):
    settings, port = ingest
    good = frames_of(wav_bytes(1.0))
    bad = (5).to_bytes(3, "little") + (0xFFFFF0).to_bytes(3, "little") + b"garbage"
    status, body = chunked_post(port, "/recordings_stream?listener_id=mic-9", [good, bad])
    assert status == 400 and "exceeds" in body["error"]
    assert len(recordings(settings)) == 1


def test_non_pcm_header_gets_415(ingest):
    settings, port = ingest
    header = bytearray(build_header(WavFormat(48000, 1, 16)).raw)
    header[20:22] = struct.pack("<H", 0x55)  # MPEG layer 3 in a WAV container
    status, body = chunked_post(port, "/recordings_stream?listener_id=mic-10", [encode_frame(0, bytes(header))])
    assert status == 415 and "not PCM" in body["error"]
    metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
    assert 'birdflow_requests_rejected_total{reason="bad_header",station="station01"} 1.0' in metrics


def test_upload_stores_a_recording_named_after_listener_and_time(ingest, sample_44k1):
    settings, port = ingest
    files = {"file": ("field-3_20250101T120000Z.wav", sample_44k1.read_bytes(), "audio/wav")}
    response = httpx.post(f"http://{LOOPBACK}:{port}/recordings_upload", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["listener_id"] == "field-3" and body["start_time"] == "2025-01-01T12:00:00+00:00"
    assert (settings.recordings_dir / body["file_name"]).read_bytes() == sample_44k1.read_bytes()


def test_two_uploads_in_the_same_second_from_one_listener_do_not_overwrite(ingest):
    settings, port = ingest
    names = set()
    for value in (1, 2):
        files = {"file": ("mic-1_20250101T120000Z.wav", wav_bytes(1.0, value=value))}
        response = httpx.post(f"http://{LOOPBACK}:{port}/recordings_upload", files=files, data={"listener_id": "mic-1"})
        assert response.status_code == 200
        names.add(response.json()["file_name"])
    assert len(names) == 2 and len(recordings(settings)) == 2


@pytest.mark.parametrize(
    "name, content, status",
    [
        ("mic-1_x.txt", b"hello", 415),
        ("mic-1_x.wav", b"this is not a wav file at all" * 10, 415),
        ("mic-1_x.flac", b"RIFF0000WAVE", 415),
        ("mic-1_x.wav", b"", 400),
        ("../../mic_x.wav", None, 400),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing_behind(ingest, name, content, status):
    settings, port = ingest
    content = wav_bytes(1.0) if content is None else content
    response = httpx.post(f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": (name, content)})
    assert response.status_code == status and response.json()["error"]
    assert recordings(settings) == [] and list(settings.partial_dir.iterdir()) == []


def test_oversize_upload_is_refused_with_413(ingest):
    settings, port = ingest
    big = wav_bytes(50.0)  # 4.8 MB, over the 4 MiB limit of this fixture
    response = httpx.post(f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": ("mic-1_x.wav", big)})
    assert response.status_code == 413 and recordings(settings) == []


def test_too_short_upload_is_discarded_with_422(ingest):
    settings, port = ingest
    response = httpx.post(
        f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": ("mic-1_x.wav", wav_bytes(0.2))}
    )
    assert response.status_code == 422 and "shorter" in response.json()["error"]


def test_endless_simulator_stops_on_ctrl_c_and_reports_what_it_sent(ingest, tmp_path):
    settings, port = ingest
    source = tmp_path / "two_seconds.wav"
    source.write_bytes(wav_bytes(2.0))
    listen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "listen",
            "--file",
            str(source),
            "--listeners",
            "2",
            "--interval",
            "0.2",
            "--pace",
            "8",
            "--url",
            f"http://{LOOPBACK}:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(recordings(settings)) >= 4, 30, "four streamed recordings")
        # a recording is closed when the next one starts: the listeners had sent at least these in full
        closed_before = len(recordings(settings))
    finally:
        listen.send_signal(signal.SIGINT)
        out, err = listen.communicate(timeout=30)
    assert listen.returncode == 0, err[-2000:]
    sent = int(re.search(r"sent (\d+) recording\(s\) from 2 listener\(s\); 0 error\(s\)", out).group(1))
    assert sent >= closed_before >= 4 and "Traceback" not in err
    # both connections ended and were finished by the server (audio still in flight when the simulator
    # dropped its connections is lost, as it is when a listener loses power)
    open_streams = 'birdflow_open_streams{station="station01"} 0.0'
    wait_until(lambda: open_streams in httpx.get(f"http://{LOOPBACK}:{port}/metrics").text, 10, "streams closed")


def test_simulator_gives_up_on_a_refused_upload_instead_of_resending_it(ingest, tmp_path):
    settings, port = ingest
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio")
    listen = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "listen",
            "--upload",
            "--file",
            str(notes),
            "--listeners",
            "2",
            "--interval",
            "0",
            "--url",
            f"http://{LOOPBACK}:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listen.returncode == 1
    # each listener reports its refusal as it happens, then the summary counts one error each
    refusal = "415: unsupported file type .txt: send .wav, .flac or .mp3"
    assert f"listener01: {refusal}" in listen.stdout and f"listener02: {refusal}" in listen.stdout
    assert "sent 0 recording(s) from 2 listener(s), 2 refused; 2 error(s)" in listen.stdout
    assert recordings(settings) == []


def listen_once(port: int, source, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "birdflow.app.cli", "listen", "--file", str(source), "--recordings", "1"]
        + ["--pace", "0", "--url", f"http://{LOOPBACK}:{port}", *options],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_refused_stream_is_reported_in_the_stations_words_and_counted_as_refused(tmp_path):
    source = tmp_path / "ten_seconds.wav"
    source.write_bytes(wav_bytes(10.0))
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, ingest_auth="on")
    with serving(settings) as port:
        listen = listen_once(port, source)
    assert listen.returncode == 1, listen.stderr
    assert "listener01: 401: missing or invalid token for listener 'listener01'" in listen.stdout, listen.stdout
    assert "sent 0 recording(s) from 1 listener(s), 1 refused; 1 error(s)" in listen.stdout
    assert recordings(settings) == []


def test_a_listener_with_a_number_of_recordings_stops_after_that_many_attempts_when_the_station_is_down(tmp_path):
    source = tmp_path / "one_second.wav"
    source.write_bytes(wav_bytes(1.0))
    for options in ([], ["--upload"]):
        listen = listen_once(free_port(), source, *options)  # nothing listens there
        assert listen.returncode == 1 and "Traceback" not in listen.stderr, listen.stderr
        assert "ConnectError" in listen.stdout
        assert "sent 0 recording(s) from 1 listener(s), 1 not delivered; 1 error(s)" in listen.stdout


@pytest.mark.parametrize(
    "content, options, message",
    [
        (None, ["--prefix", "mic_"], "--prefix 'mic_' makes an invalid listener id 'mic_01'"),
        (b"fLaC" + bytes(100), [], "not a RIFF/WAVE header; streaming needs a PCM WAV"),
    ],
)
def test_simulator_refuses_bad_options_before_sending_anything(tmp_path, content, options, message):
    source = tmp_path / "recording.wav"
    source.write_bytes(wav_bytes(1.0) if content is None else content)
    listen = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "listen",
            "--file",
            str(source),
            *options,
            "--url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listen.returncode == 1 and message in listen.stderr and "Traceback" not in listen.stderr


def test_below_the_disk_floor_recordings_are_refused_with_507_and_nothing_is_written(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, min_free_disk_mb=1 << 30)  # always below
    with serving(settings) as port:
        upload = httpx.post(
            f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": ("mic-1_x.wav", wav_bytes(1.0))}
        )
        status, body = chunked_post(port, "/recordings_stream?listener_id=mic-2", [frames_of(wav_bytes(1.0))])
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
    assert upload.status_code == 507 and "min_free_disk_mb" in upload.json()["error"]
    assert status == 507 and "insufficient storage" in body["error"]
    assert 'birdflow_requests_rejected_total{reason="insufficient_storage",station="station01"} 2.0' in metrics
    assert recordings(settings) == [] and list(settings.partial_dir.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system of its own (tmpfs), to fill for real."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_disk_that_fills_mid_stream_keeps_the_closed_recordings_and_leaves_no_truncated_file(small_disk):
    settings = Settings(data_dir=small_disk / "data", min_duration_s=0.5, max_duration_s=120, min_free_disk_mb=0)
    first, second = frames_of(wav_bytes(1.0, value=5)), frames_of(wav_bytes(1.0, value=6))  # 96 KB each
    long = frames_of(wav_bytes(60.0, value=9))  # 5.8 MB: more than the disk holds
    with serving(settings) as port:
        status, body = chunked_post(port, "/recordings_stream?listener_id=mic-3", [first, second, long])
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
    assert status == 507 and "No space left" in body["error"]
    assert body["recordings_closed"] == 2
    kept = recordings(settings)
    assert len(kept) == 2
    for path in kept:  # complete, with the sizes of what they hold
        with wave.open(str(path)) as stored:
            assert stored.getnframes() == 48000
        assert path.with_suffix(".json").stat().st_size > 0
    assert list(settings.partial_dir.iterdir()) == []
    assert 'birdflow_recordings_discarded_total{reason="write_failed",station="station01"} 1.0' in metrics


def test_a_recording_sent_again_is_answered_200_and_dropped_whether_it_waits_or_was_processed(ingest):
    """A listener that resends on a 5xx may send audio the station holds: same listener, start and content."""
    from birdflow.core.ledger import ProcessedLedger

    settings, port = ingest
    name, audio = "mic-9_20250601T050000Z.wav", wav_bytes(1.0, value=3)

    def upload() -> dict:
        response = httpx.post(f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": (name, audio)}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def resent_counted() -> float:  # this process's counters are shared with the other tests: a difference
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
        found = re.search(
            rf'birdflow_recordings_discarded_total\{{reason="resent",station="{settings.station_id}"\}} (\S+)', metrics
        )
        return float(found.group(1)) if found else 0.0

    counted_before = resent_counted()
    first, again = upload(), upload()
    assert (first["resent"], again["resent"]) == (False, True)
    assert again["recording_id"] == first["recording_id"] and len(recordings(settings)) == 1  # waiting: one copy
    # processed since, its audio gone from the folder: still known, still dropped
    ProcessedLedger(settings.processed_record_file).record(first["recording_id"], "analysis-1")
    for path in settings.recordings_dir.iterdir():
        path.unlink()
    assert upload()["resent"] is True and recordings(settings) == []
    # other audio of the same listener and start is another recording
    audio = wav_bytes(1.0, value=4)
    assert upload()["resent"] is False and len(recordings(settings)) == 1
    assert resent_counted() - counted_before == 2


def test_a_listener_sending_its_backlog_is_not_held_to_the_pace_of_live_recordings(tmp_path):
    """A card's worth of old recordings has its own allowance per minute; live ones keep theirs."""
    from datetime import datetime, timedelta, timezone

    settings = Settings(
        data_dir=tmp_path / "data", min_duration_s=0.5, max_recordings_per_minute=3, max_backlog_uploads_per_minute=40
    )
    now = datetime.now(timezone.utc)

    def upload(start: datetime, number: int) -> int:
        name = f"mic-5_{start:%Y%m%dT%H%M%SZ}.wav"
        response = httpx.post(
            f"http://{LOOPBACK}:{port}/recordings_upload",
            files={"file": (name, wav_bytes(1.0, value=number))},
            timeout=30,
        )
        return response.status_code

    with serving(settings) as port:
        # three days offline: 40 recordings of the backlog in well under a minute, then the 41st waits
        backlog = [upload(now - timedelta(days=3, minutes=number), number) for number in range(41)]
        assert backlog == [200] * 40 + [429], backlog
        # live recordings still have their own three a minute
        live = [upload(now - timedelta(seconds=5 * number), 100 + number) for number in range(4)]
        assert live == [200, 200, 200, 429], live
    assert len(recordings(settings)) == 43
