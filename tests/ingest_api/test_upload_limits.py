"""What an upload may cost: its body is refused as it arrives (not after the whole of it was spooled somewhere),
a slow drip is cut, and uploads in progress are capped in all and per listener."""

from __future__ import annotations

import select
import socket
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from birdflow.core.listener_tokens import ListenerTokens
from birdflow.ingest_api.framing import encode_frame
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, wait_until
from tests.ingest_client import chunked_post, frames_of, serving, wav_bytes

BOUNDARY = "upload-boundary"


def upload_head(file_name: str, token: str | None = None) -> bytes:
    """Request line, headers (chunked: no declared length) and the form up to the file's first byte."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST /recordings_upload HTTP/1.1\r\nHost: {LOOPBACK}\r\n{auth}Transfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode() + chunk(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
    )


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def answer_of(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server has answered, waiting at most timeout_s."""
    if not select.select([sock], [], [], timeout_s)[0]:
        return b""
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def send_until_answered(port: int, head: bytes, total: int) -> tuple[int, bytes]:
    """Send the head, then a file body of `total` bytes in 64 KiB chunks, until the server answers:
    (file bytes sent by then, the answer)."""
    sent = 0
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        sock.sendall(head)
        while sent < total:
            answer = answer_of(sock, 0)
            if answer:
                return sent, answer
            try:
                sock.sendall(chunk(b"\0" * (64 << 10)))
            except OSError:
                break
            sent += 64 << 10
        return sent, answer_of(sock, 10)


@pytest.fixture
def station(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        min_duration_s=0.5,
        max_upload_bytes=4 << 20,
        ingest_auth="on",
        ingest_auth_exempt=["old-1"],
        body_timeout_s=2,
        max_open_uploads=3,
        max_recordings_per_minute=10_000,
    )
    tokens = ListenerTokens(settings.listener_tokens_file)
    with serving(settings) as port:
        yield settings, port, {listener: tokens.add(listener) for listener in ("mic-1", "mic-2")}


@pytest.mark.parametrize(
    "case, file_name, token_of, status",
    [
        ("a chunked upload past max_upload_bytes", "mic-1_20250101T000000Z.wav", "mic-1", 413),
        ("no token while an exempt list is set", "mic-1_20250101T000000Z.wav", None, 401),
    ],
)
def test_a_refused_upload_is_answered_as_its_body_arrives_and_kept_nowhere(
    station, case, file_name, token_of, status, tmp_path
):
    settings, port, tokens = station
    sent, answer = send_until_answered(port, upload_head(file_name, tokens.get(token_of or "")), 64 << 20)
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), (case, answer[:200])
    assert sent < (16 << 20 if status == 413 else 8 << 20), case  # not the 64 MiB offered: the answer came first
    assert not [path for path in settings.data_dir.rglob("upload_*")], case


def test_an_upload_dripping_a_byte_a_second_is_cut_with_408(station):
    settings, port, tokens = station
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        sock.sendall(upload_head("mic-1_20250101T000000Z.wav", tokens["mic-1"]))
        started, answer = time.monotonic(), b""
        while not answer and time.monotonic() - started < 15:
            sock.sendall(chunk(b"R"))
            answer = answer_of(sock, 1.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"below the minimum" in answer
    assert time.monotonic() - started < 8  # cut once body_timeout_s (2 s) had passed, at the next byte


def test_uploads_in_progress_are_capped_in_all_and_per_listener(station):
    settings, port, tokens = station
    held = []
    try:
        for listener in ("mic-1", "mic-1", "mic-2"):
            sock = socket.create_connection((LOOPBACK, port), timeout=20)
            sock.sendall(upload_head(f"{listener}_20250101T000000Z.wav", tokens[listener]) + chunk(b"RIFF"))
            held.append(sock)
        time.sleep(0.5)  # the three have reached their file parts

        def upload(listener: str) -> httpx.Response:
            return httpx.post(
                f"http://{LOOPBACK}:{port}/recordings_upload",
                files={"file": (f"{listener}_20250101T000100Z.wav", wav_bytes(1.0))},
                headers={"Authorization": f"Bearer {tokens[listener]}"},
                timeout=20,
            )

        full = upload("mic-2")
        assert full.status_code == 503 and "uploads are in progress" in full.text and full.headers["Retry-After"]
        held.pop().close()  # mic-2's slow upload goes away: room for one, but not for a third of mic-1
        wait_until(lambda: "already has 2 uploads in progress" in upload("mic-1").text, 10, "mic-1's third refused")
        assert upload("mic-2").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_a_listeners_recordings_per_minute_are_counted_over_its_reconnects_and_uploads(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, max_recordings_per_minute=4)
    with serving(settings) as port:
        first, _ = chunked_post(port, "/recordings_stream?listener_id=mic-1", [frames_of(wav_bytes(1.0, value=1))])
        second, _ = chunked_post(port, "/recordings_stream?listener_id=mic-1", [frames_of(wav_bytes(1.0, value=2))])

        def upload(listener: str, value: int) -> int:  # live recordings: a backlog has an allowance of its own
            started = datetime.now(timezone.utc) - timedelta(seconds=value)
            return httpx.post(
                f"http://{LOOPBACK}:{port}/recordings_upload",
                files={"file": (f"{listener}_{started:%Y%m%dT%H%M%SZ}.wav", wav_bytes(1.0, value=value))},
                timeout=20,
            ).status_code

        uploads = [upload("mic-1", value) for value in (3, 4, 5)]
        reconnect, answer = chunked_post(
            port, "/recordings_stream?listener_id=mic-1", [frames_of(wav_bytes(1.0, value=6))]
        )
        other = upload("mic-2", 7)
    assert (first, second, uploads, reconnect, other) == (200, 200, [200, 200, 429], 429, 200)
    assert len(list(settings.recordings_dir.glob("mic-1_*.wav"))) == 4


def test_streams_that_never_complete_a_frame_lose_their_slot_after_the_first_frame_deadline(tmp_path):
    """Without auth, made-up listeners each dripping a byte: cut header_timeout_s after they opened, so a real
    listener finds a slot; a real stream that pauses after its first frame is not."""
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, header_timeout_s=1, max_open_streams=4)
    big_frame = encode_frame(1, bytes(400_000))  # an audio page that a byte at a time never completes
    with serving(settings) as port:
        drips = []
        for number in range(4):
            sock = socket.create_connection((LOOPBACK, port), timeout=20)
            sock.sendall(
                f"POST /recordings_stream?listener_id=fake-{number} HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + chunk(big_frame[:1])
            )
            drips.append(sock)
        time.sleep(0.3)  # the four are admitted
        full, _ = chunked_post(port, "/recordings_stream?listener_id=mic-1", [frames_of(wav_bytes(1.0))])
        assert full == 503
        cut_after: list[float] = []
        started, dripped = time.monotonic(), 1
        while len(cut_after) < 4 and time.monotonic() - started < 10:
            for sock in drips:
                try:
                    sock.sendall(chunk(big_frame[dripped : dripped + 1]))  # a byte every 0.2 s: never a whole frame
                    cut = bool(select.select([sock], [], [], 0.05)[0])  # an answer, or the end of the connection
                except OSError:
                    cut = True
                if cut:
                    cut_after.append(time.monotonic() - started)
                    sock.close()
            drips, dripped = [sock for sock in drips if sock.fileno() != -1], dripped + 1
        assert len(cut_after) == 4 and max(cut_after) < 4
        status, summary = chunked_post(port, "/recordings_stream?listener_id=mic-1", [frames_of(wav_bytes(1.0))])
        assert status == 200 and summary["recordings_closed"] == 1


def stream_two_recordings(port: int, token: str | None, between, value: int) -> tuple[bytes, int]:
    """One stream: a recording, then `between()`, then a second recording: (the answer, its status)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        sock.sendall(
            f"POST /recordings_stream?listener_id=mic-1 HTTP/1.1\r\nHost: x\r\n{auth}"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunk(frames_of(wav_bytes(1.0, value=value)))
        )
        time.sleep(0.3)
        between()
        try:
            sock.sendall(chunk(frames_of(wav_bytes(1.0, value=value + 1))) + b"0\r\n\r\n")
        except OSError:
            pass
        answer = answer_of(sock, 10)
    return answer, int(answer.split()[1])


def test_a_stream_ends_at_its_next_recording_once_its_token_is_revoked_or_it_is_too_old(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, ingest_auth="on", max_stream_lifetime_s=2)
    tokens = ListenerTokens(settings.listener_tokens_file)
    token = tokens.add("mic-1")
    with serving(settings) as port:
        revoked_answer, revoked = stream_two_recordings(port, token, lambda: tokens.revoke("mic-1"), 1)
        kept = len(list(settings.recordings_dir.glob("mic-1_*.wav")))
        old_answer, too_old = stream_two_recordings(port, tokens.add("mic-1"), lambda: time.sleep(2.1), 3)
    assert (revoked, kept) == (401, 1) and b"recordings_closed" in revoked_answer  # the first recording kept
    assert too_old == 503 and b"reconnect" in old_answer
    assert len(list(settings.recordings_dir.glob("mic-1_*.wav"))) == 2
