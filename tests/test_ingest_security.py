"""Bad input and hostile clients against the ingest API over real HTTP: each gets its status, touches no
file (inside or outside the data directory) and costs a listener sending at the same time nothing."""

from __future__ import annotations

import hashlib
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx
import yaml

from birdflow.listener_tokens import ListenerTokens
from birdflow.settings import Settings
from birdflow.testbed import LOOPBACK, free_port, wait_until
from birdflow.wav import WavFormat, build_header
from ingest_api.framing import encode_frame
from tests.ingest_client import chunked_post, frames_of, serving, wav_bytes

GOOD = "good-1"


def header(rate: int, bits: int, tag: int = 1) -> bytes:
    raw = bytearray(build_header(WavFormat(rate, 1, bits)).raw)
    struct.pack_into("<H", raw, 20, tag)
    return bytes(raw)


def wav_file(rate: int, bits: int, seconds: float = 1.0) -> bytes:
    return header(rate, bits) + bytes(int(rate * seconds) * bits // 8)


@dataclass(frozen=True)
class Client:
    port: int
    tokens: dict[str, str]

    def bearer(self, listener: Optional[str]) -> dict:
        return {"Authorization": f"Bearer {self.tokens[listener]}"} if listener else {}

    def stream(self, listener_query: str, body: bytes, token_of: Optional[str] = "mic-1") -> tuple[int, str]:
        status, summary = chunked_post(
            self.port, f"/recordings_stream?listener_id={listener_query}", [body], headers=self.bearer(token_of)
        )
        return status, str(summary)

    def upload(self, name: str, content: bytes, listener_id: Optional[str] = None, token_of: Optional[str] = "mic-1"):
        response = httpx.post(
            f"http://{LOOPBACK}:{self.port}/recordings_upload",
            files={"file": (name, content)},
            data={"listener_id": listener_id} if listener_id is not None else {},
            headers=self.bearer(token_of),
            timeout=20,
        )
        return response.status_code, response.text

    def raw(self, request: bytes) -> tuple[int, str]:
        """A request written by hand (a lying Content-Length): the answer is read, the rest never sent."""
        with socket.create_connection((LOOPBACK, self.port), timeout=20) as sock:
            sock.sendall(request)
            answer = sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")


def _upload_claiming(length: int, token: str) -> bytes:
    return (
        f"POST /recordings_upload HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + b"--b\r\n" + b"x" * 1024


def _short_recordings(count: int) -> bytes:
    """Recordings shorter than the minimum, one after another: many starts for few bytes."""
    return b"".join(encode_frame(0, header(48000, 16) + bytes(9600)) for _ in range(count))


CASES: list[tuple[str, int, Callable[[Client], tuple[int, str]]]] = [
    ("stream: id with a trailing newline (x%0A)", 400, lambda c: c.stream("mic-1%0A", frames_of(wav_bytes(1.0)))),
    ("stream: id ../etc", 400, lambda c: c.stream("..%2Fetc", frames_of(wav_bytes(1.0)))),
    ("stream: id with NUL", 400, lambda c: c.stream("mic%00", frames_of(wav_bytes(1.0)))),
    ("stream: id with _", 400, lambda c: c.stream("mic_1", frames_of(wav_bytes(1.0)))),
    ("stream: no token", 401, lambda c: c.stream("mic-1", frames_of(wav_bytes(1.0)), token_of=None)),
    ("stream: a revoked token", 401, lambda c: c.stream("mic-1", frames_of(wav_bytes(1.0)), token_of="revoked")),
    ("stream: another listener's token", 401, lambda c: c.stream("mic-1", frames_of(wav_bytes(1.0)), token_of="mic-2")),
    ("stream: header 1000 Hz 8-bit", 415, lambda c: c.stream("mic-1", encode_frame(0, header(1000, 8)) + encode_frame(1, bytes(40000)))),
    ("stream: header 48 kHz 8-bit", 415, lambda c: c.stream("mic-1", encode_frame(0, header(48000, 8)))),
    ("stream: header 4 kHz 16-bit", 415, lambda c: c.stream("mic-1", encode_frame(0, header(4000, 16)))),
    ("stream: header 384 kHz", 415, lambda c: c.stream("mic-1", encode_frame(0, header(384000, 16)))),
    ("stream: header of float samples", 415, lambda c: c.stream("mic-1", encode_frame(0, header(48000, 32, tag=3)))),
    ("stream: frame length beyond the limit", 400, lambda c: c.stream("mic-1", b"\x01\x00\x00\xff\xff\xff" + bytes(64))),
    ("stream: 10,000 seq=0 frames", 429, lambda c: c.stream("mic-1", encode_frame(0, header(48000, 16)) * 10_000)),
    ("stream: 40 recordings of 0.1 s", 429, lambda c: c.stream("mic-1", _short_recordings(40))),
    ("upload: file name ../../x.wav", 400, lambda c: c.upload("../../mic-1_x.wav", wav_bytes(1.0))),
    ("upload: listener_id with a trailing newline", 400, lambda c: c.upload("a.wav", wav_bytes(1.0), listener_id="mic-1\n")),
    ("upload: listener_id ../x", 400, lambda c: c.upload("a.wav", wav_bytes(1.0), listener_id="../x")),
    ("upload: text named .wav", 415, lambda c: c.upload("mic-1_x.wav", b"hello, not audio" * 100)),
    ("upload: 8-bit WAV", 415, lambda c: c.upload("mic-1_x.wav", wav_file(48000, 8))),
    ("upload: 4 kHz WAV", 415, lambda c: c.upload("mic-1_x.wav", wav_file(4000, 16))),
    ("upload: corrupt MP3", 415, lambda c: c.upload("mic-1_x.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(3000))),
    ("upload: empty file", 400, lambda c: c.upload("mic-1_x.wav", b"")),
    ("upload: .exe", 415, lambda c: c.upload("mic-1_x.exe", wav_bytes(1.0))),
    ("upload: Content-Length 10 GB, 1 KiB sent", 413, lambda c: c.raw(_upload_claiming(10 << 30, c.tokens["mic-1"]))),
    ("upload: no token", 401, lambda c: c.upload("mic-1_x.wav", wav_bytes(1.0), token_of=None)),
    ("upload: another listener's token", 403, lambda c: c.upload("mic-1_x.wav", wav_bytes(1.0), token_of="mic-2")),
    ("upload: not multipart", 400, lambda c: (lambda r: (r.status_code, r.text))(
        httpx.post(f"http://{LOOPBACK}:{c.port}/recordings_upload", content=b"x" * 100, headers=c.bearer("mic-1")))),
    ("metrics: without the metrics token", 401, lambda c: (lambda r: (r.status_code, r.text))(
        httpx.get(f"http://{LOOPBACK}:{c.port}/metrics"))),
]


def files_under(root: Path) -> dict[str, int]:
    """Every file below root (but the good listener's and the token database) with its size."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file() and GOOD not in path.name and "state" not in path.parts
    }


def stream_in_real_time(port: int, token: str, recordings: int, seconds: float, result: dict) -> None:
    """A well-behaved listener: header, pages at (twice) real-time pace, a pause, the next recording."""
    body = []
    for number in range(recordings):
        wav = wav_bytes(seconds, value=1000 + number)  # each its own audio, as in the field
        body.append(encode_frame(0, wav[:44]))
        body += [encode_frame(seq, wav[offset : offset + 9600]) for seq, offset in enumerate(range(44, len(wav), 9600), 1)]
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        sock.sendall(
            f"POST /recordings_stream?listener_id={GOOD}&token={token} HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for frame in body:
            sock.sendall(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            time.sleep(0.05)  # 0.1 s of audio every 0.05 s
        sock.sendall(b"0\r\n\r\n")
        result["answer"] = sock.recv(65536)


def test_bad_input_gets_its_status_and_changes_nothing_while_a_listener_streams(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data", min_duration_s=0.5, max_upload_bytes=4 << 20, ingest_auth="on",
        metrics_token="scrape-secret",
    )
    store = ListenerTokens(settings.listener_tokens_file)
    tokens = {listener: store.add(listener) for listener in ("mic-1", "mic-2", GOOD)}
    tokens["revoked"] = store.add("mic-1")
    assert store.revoke("mic-1", hashlib.sha256(tokens["revoked"].encode()).hexdigest()[:8]) == 1
    (tmp_path / "outside").mkdir()
    with serving(settings) as port:
        client = Client(port, tokens)
        good: dict = {}
        listener = threading.Thread(target=stream_in_real_time, args=(port, tokens[GOOD], 5, 1.0, good))
        listener.start()
        outcomes = []
        for name, expected, send in CASES:
            before = files_under(tmp_path)
            status, body = send(client)
            outcomes.append((name, expected, status))
            assert status == expected, (name, body[:300])
            assert files_under(tmp_path) == before, name
            assert str(tmp_path) not in body and "partial" not in body, (name, body[:300])  # no server paths
        listener.join(120)
        # the same server still takes what is right
        assert client.stream("mic-1", frames_of(wav_bytes(1.0)), token_of=None)[0] == 401
        assert client.upload("mic-1_20250101T000000Z.wav", wav_bytes(1.0))[0] == 200
        assert httpx.get(f"http://{LOOPBACK}:{port}/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics", headers={"Authorization": "Bearer scrape-secret"}).text
    assert b" 200 " in good["answer"].split(b"\r\n")[0] and b'"recordings_closed":5' in good["answer"]
    assert len(list(settings.recordings_dir.glob(f"{GOOD}_*.wav"))) == 5
    assert 'reason="unauthorized"' in metrics and 'reason="too_many_recordings"' in metrics
    print("\n".join(f"{status} (expected {expected}) {name}" for name, expected, status in outcomes))


def test_exempt_listeners_send_without_a_token_while_the_others_need_one(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5, ingest_auth="on", ingest_auth_exempt=["old-1"])
    with serving(settings) as port:
        client = Client(port, {})
        assert client.stream("old-1", frames_of(wav_bytes(1.0)), token_of=None)[0] == 200
        assert client.upload("old-1_20250101T000000Z.wav", wav_bytes(1.0, value=7), token_of=None)[0] == 200
        assert client.stream("mic-1", frames_of(wav_bytes(1.0)), token_of=None)[0] == 401
        assert client.upload("mic-1_20250101T000000Z.wav", wav_bytes(1.0), token_of=None)[0] == 401
        # /metrics without a metrics token: loopback only, which this client is
        assert httpx.get(f"http://{LOOPBACK}:{port}/metrics").status_code == 200
    assert len(list(settings.recordings_dir.glob("old-1_*.wav"))) == 2
    assert not list(settings.recordings_dir.glob("mic-1_*"))


class HostileConnections:
    """Idle sockets, headers dripped a byte a second, and streams that send headers and nothing more."""

    def __init__(self, port: int, idle: int, slow: int, silent_streams: int):
        self.selector = selectors.DefaultSelector()
        self.opened: dict[socket.socket, float] = {}
        self.lifetimes: list[float] = []
        self.slow: list[socket.socket] = []
        for number in range(idle + slow + silent_streams):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            sock.setblocking(False)
            if idle <= number < idle + slow:
                sock.send(f"POST /recordings_stream?listener_id=slow-{number} HTTP/1.1\r\n".encode())
                self.slow.append(sock)
            elif number >= idle + slow:
                sock.send(
                    f"POST /recordings_stream?listener_id=silent-{number} HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode()
                )
            self.opened[sock] = time.monotonic()
            self.selector.register(sock, selectors.EVENT_READ)

    def watch(self, until: Callable[[], bool], timeout_s: float) -> None:
        """Drip the slow headers and note when the server closes each connection."""
        deadline = time.monotonic() + timeout_s
        next_drip = 0.0
        while self.opened and not until() and time.monotonic() < deadline:
            if time.monotonic() >= next_drip:
                for sock in [sock for sock in self.slow if sock in self.opened]:
                    try:
                        sock.send(b"X")
                    except OSError:
                        self._closed(sock)
                next_drip = time.monotonic() + 1.0
            for key, _ in self.selector.select(timeout=0.2):
                try:
                    if key.fileobj.recv(65536):
                        continue  # an answer (503) before the close
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._closed(key.fileobj)

    def _closed(self, sock: socket.socket) -> None:
        if sock in self.opened:
            self.lifetimes.append(time.monotonic() - self.opened.pop(sock))
            self.selector.unregister(sock)
            sock.close()

    def close(self) -> None:
        for sock in list(self.opened):
            sock.close()


def test_600_hostile_connections_cost_a_listener_nothing_with_1024_open_files(tmp_path, sample_48k):
    """The ingest runs with systemd's default open-file limit and ingest_auth on (the README's advice)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port = free_port()
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "ingest_host": LOOPBACK, "ingest_port": port, "min_duration_s": 0.5,
        "header_timeout_s": 8.0, "ingest_auth": "on",
    }))
    token = ListenerTokens(Settings(data_dir=tmp_path / "data").listener_tokens_file).add(GOOD)
    limit_open_files = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # noqa: E731
    ingest = subprocess.Popen(
        [sys.executable, "-m", "birdflow.cli", "--settings", str(settings_file), "ingest"],
        preexec_fn=limit_open_files, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    hostile = None
    try:
        wait_until(lambda: httpx.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200, 60, "ingest API")
        hostile = HostileConnections(port, idle=150, slow=150, silent_streams=300)
        attack_began = time.monotonic()
        good: dict = {}
        listener = threading.Thread(target=stream_in_real_time, args=(port, token, 3, 1.0, good))
        listener.start()
        hostile.watch(until=lambda: not listener.is_alive(), timeout_s=30)
        health = [httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=5).status_code for _ in range(5)]
        upload = httpx.post(
            f"http://{LOOPBACK}:{port}/recordings_upload", files={"file": (f"{GOOD}_20250101T000000Z.wav", sample_48k.read_bytes())},
            headers={"Authorization": f"Bearer {token}"},
        )
        served_within_s = time.monotonic() - attack_began
        still_open = len(hostile.opened)
        hostile.watch(until=lambda: False, timeout_s=30)
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
    finally:
        if hostile:
            hostile.close()
        ingest.terminate()
        ingest.wait(30)
    assert b" 200 " in good["answer"].split(b"\r\n")[0] and b'"recordings_closed":3' in good["answer"]
    assert health == [200] * 5 and upload.status_code == 200
    # all that while, the hostile connections were open; then the server closed every one of them
    assert still_open == 600, f"{600 - still_open} hostile connections closed within {served_within_s:.1f} s"
    assert not hostile.opened and len(hostile.lifetimes) == 600
    assert max(hostile.lifetimes) < 8.0 + 5.0
    assert 'birdflow_connections_timed_out_total{stage="headers",station="station01"} 300.0' in metrics
    # the silent streams were refused (401) at their headers, then closed when they stayed silent
    assert 'birdflow_requests_rejected_total{reason="unauthorized",station="station01"} 300.0' in metrics
    print(f"listener served within {served_within_s:.1f} s of 600 hostile connections; "
          f"they were closed after {min(hostile.lifetimes):.1f}-{max(hostile.lifetimes):.1f} s")


def _open_stream(port: int, listener: str) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(
        f"POST /recordings_stream?listener_id={listener} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    return sock


def _send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _seconds_until_closed(sock: socket.socket, keep_sending: bool = False, limit_s: float = 15) -> float:
    """How long until the server closes the connection (answers before the close are read and dropped)."""
    began = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - began < limit_s:
        try:
            if keep_sending:
                _send_chunk(sock, b"\x00" * 64)
            if sock.recv(65536) == b"":
                break
        except socket.timeout:
            continue
        except OSError:
            break
    sock.close()
    return time.monotonic() - began


def test_stream_caps_answer_503_and_each_stage_of_a_request_has_a_deadline(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data", min_duration_s=0.5, header_timeout_s=1.5, body_timeout_s=2.0,
        max_open_streams=3, max_streams_per_listener=1,
    )
    with serving(settings) as port:
        first = _open_stream(port, "cap-1")
        _send_chunk(first, encode_frame(0, header(48000, 16)) + encode_frame(1, bytes(9600)))
        time.sleep(0.3)
        assert chunked_post(port, "/recordings_stream?listener_id=cap-1", [])[0] == 503  # one per listener here
        others = [_open_stream(port, f"cap-{n}") for n in (2, 3)]
        for sock in others:
            _send_chunk(sock, encode_frame(0, header(48000, 16)) + encode_frame(1, bytes(9600)))
        time.sleep(0.3)
        status, summary = chunked_post(port, "/recordings_stream?listener_id=cap-4", [])
        assert status == 503 and "3 streams are open" in summary["error"]
        for sock in [first, *others]:
            sock.close()
        no_streams = 'birdflow_open_streams{station="station01"} 0.0'
        wait_until(lambda: no_streams in httpx.get(f"http://{LOOPBACK}:{port}/metrics").text, 10, "the streams to end")

        silent_stream = _seconds_until_closed(_open_stream(port, "quiet-1"))  # headers, never a frame
        stalled_upload = socket.create_connection((LOOPBACK, port))
        stalled_upload.sendall(_upload_claiming(1 << 20, "unused"))
        stalled = _seconds_until_closed(stalled_upload)
        refused = _open_stream(port, "bad_id")  # answered 400 at once; what it goes on sending is not waited for
        refused_sending = _seconds_until_closed(refused, keep_sending=True)
    print(f"closed after: silent stream {silent_stream:.1f} s, stalled upload {stalled:.1f} s, "
          f"refused stream still sending {refused_sending:.1f} s")
    assert 1.5 <= silent_stream < 3.5 and 2.0 <= stalled < 4.0 and 1.5 <= refused_sending < 3.5
