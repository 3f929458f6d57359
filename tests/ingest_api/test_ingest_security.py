"""Bad input and hostile clients against the ingest API over real HTTP: each gets its status, touches no
file (inside or outside the data directory) and costs a listener sending at the same time nothing."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile

from birdflow.core.listener_tokens import ListenerTokens
from birdflow.ingest_api.framing import encode_frame
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK
from tests.ingest_client import (
    GOOD,
    chunked_post,
    frames_of,
    header,
    serving,
    stream_in_real_time,
    upload_claiming,
    wav_bytes,
)


def wav_file(rate: int, bits: int, seconds: float = 1.0) -> bytes:
    return header(rate, bits) + bytes(int(rate * seconds) * bits // 8)


@dataclass(frozen=True)
class Client:
    port: int
    tokens: dict[str, str]

    def bearer(self, listener: str | None) -> dict:
        return {"Authorization": f"Bearer {self.tokens[listener]}"} if listener else {}

    def stream(self, listener_query: str, body: bytes, token_of: str | None = "mic-1") -> tuple[int, str]:
        status, summary = chunked_post(
            self.port, f"/recordings_stream?listener_id={listener_query}", [body], headers=self.bearer(token_of)
        )
        return status, str(summary)

    def upload(self, name: str, content: bytes, listener_id: str | None = None, token_of: str | None = "mic-1"):
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


def wav_with_fmt_of(size: int) -> bytes:
    """A RIFF/WAVE file whose fmt chunk is `size` bytes long (a real one has 16 or more)."""
    chunks = b"fmt " + struct.pack("<I", size) + bytes(size) + b"data" + struct.pack("<I", 960) + bytes(960)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def silence_flac(seconds: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * 48000), np.int16), 48000, format="FLAC")
    return buffer.getvalue()


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
    (
        "stream: header 1000 Hz 8-bit",
        415,
        lambda c: c.stream("mic-1", encode_frame(0, header(1000, 8)) + encode_frame(1, bytes(40000))),
    ),
    ("stream: header 48 kHz 8-bit", 415, lambda c: c.stream("mic-1", encode_frame(0, header(48000, 8)))),
    ("stream: header 4 kHz 16-bit", 415, lambda c: c.stream("mic-1", encode_frame(0, header(4000, 16)))),
    ("stream: header 384 kHz", 415, lambda c: c.stream("mic-1", encode_frame(0, header(384000, 16)))),
    ("stream: header of float samples", 415, lambda c: c.stream("mic-1", encode_frame(0, header(48000, 32, tag=3)))),
    (
        "stream: frame length beyond the limit",
        400,
        lambda c: c.stream("mic-1", b"\x01\x00\x00\xff\xff\xff" + bytes(64)),
    ),
    (
        "stream: 10,000 seq=0 frames",
        429,
        lambda c: c.stream("mic-2", encode_frame(0, header(48000, 16)) * 10_000, token_of="mic-2"),
    ),
    ("stream: 40 recordings of 0.1 s", 429, lambda c: c.stream("mic-2", _short_recordings(40), token_of="mic-2")),
    ("upload: file name ../../x.wav", 400, lambda c: c.upload("../../mic-1_x.wav", wav_bytes(1.0))),
    (
        "upload: listener_id with a trailing newline",
        400,
        lambda c: c.upload("a.wav", wav_bytes(1.0), listener_id="mic-1\n"),
    ),
    ("upload: listener_id ../x", 400, lambda c: c.upload("a.wav", wav_bytes(1.0), listener_id="../x")),
    ("upload: text named .wav", 415, lambda c: c.upload("mic-1_x.wav", b"hello, not audio" * 100)),
    ("upload: 8-bit WAV", 415, lambda c: c.upload("mic-1_x.wav", wav_file(48000, 8))),
    ("upload: 4 kHz WAV", 415, lambda c: c.upload("mic-1_x.wav", wav_file(4000, 16))),
    (
        "upload: corrupt MP3",
        415,
        lambda c: c.upload("mic-1_x.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(3000)),
    ),
    ("upload: a WAV whose fmt chunk is 2 bytes", 415, lambda c: c.upload("mic-1_x.wav", wav_with_fmt_of(2))),
    (
        "upload: a file name dated 20251341T256161Z",
        400,
        lambda c: c.upload("mic-1_20251341T256161Z.wav", wav_bytes(1.0)),
    ),
    (
        "upload: a file name dated 29991231T235959Z",
        400,
        lambda c: c.upload("mic-1_29991231T235959Z.wav", wav_bytes(1.0)),
    ),
    ("upload: FLAC longer than max_upload_duration_s", 422, lambda c: c.upload("mic-1_x.flac", silence_flac(61))),
    (
        "upload: POST /recordings_upload/ with Host: evil.example (no redirect built from it)",
        404,
        lambda c: c.raw(b"POST /recordings_upload/ HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"),
    ),
    ("upload: empty file", 400, lambda c: c.upload("mic-1_x.wav", b"")),
    ("upload: .exe", 415, lambda c: c.upload("mic-1_x.exe", wav_bytes(1.0))),
    ("upload: Content-Length 10 GB, 1 KiB sent", 413, lambda c: c.raw(upload_claiming(10 << 30, c.tokens["mic-1"]))),
    ("upload: no token", 401, lambda c: c.upload("mic-1_x.wav", wav_bytes(1.0), token_of=None)),
    ("upload: another listener's token", 403, lambda c: c.upload("mic-1_x.wav", wav_bytes(1.0), token_of="mic-2")),
    (
        "upload: not multipart",
        400,
        lambda c: (lambda r: (r.status_code, r.text))(
            httpx.post(f"http://{LOOPBACK}:{c.port}/recordings_upload", content=b"x" * 100, headers=c.bearer("mic-1"))
        ),
    ),
    (
        "metrics: without the metrics token",
        401,
        lambda c: (lambda r: (r.status_code, r.text))(httpx.get(f"http://{LOOPBACK}:{c.port}/metrics")),
    ),
]


def files_under(root: Path) -> dict[str, int]:
    """Every file below root (but the good listener's and the token database) with its size."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file() and GOOD not in path.name and "state" not in path.parts
    }


def test_bad_input_gets_its_status_and_changes_nothing_while_a_listener_streams(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        min_duration_s=0.5,
        max_upload_bytes=4 << 20,
        max_upload_duration_s=60,
        ingest_auth="on",
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
        assert (
            httpx.get(
                f"http://{LOOPBACK}:{port}/metrics", headers={"Authorization": "Bearer scrape-secret"}
            ).status_code
            == 200
        )
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics", headers={"Authorization": "Bearer scrape-secret"}).text
    assert b" 200 " in good["answer"].split(b"\r\n")[0] and b'"recordings_closed":5' in good["answer"]
    assert len(list(settings.recordings_dir.glob(f"{GOOD}_*.wav"))) == 5
    assert 'reason="unauthorized"' in metrics and 'reason="too_many_recordings"' in metrics
    print("\n".join(f"{status} (expected {expected}) {name}" for name, expected, status in outcomes))


def test_an_upload_naming_no_listener_is_told_how_to_name_one(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path / "data", min_duration_s=0.5)
    with serving(settings) as port, caplog.at_level(logging.WARNING, logger="birdflow.ingest"):
        client = Client(port, {})
        status, body = client.upload("recording.wav", wav_bytes(1.0), token_of=None)
        assert status == 400 and "no listener id" in body and "listener_id form field" in body, body
        # the log names the sender's address, not "listener None"
        assert f"rejected request from {LOOPBACK} (before its listener id)" in caplog.text, caplog.text
        assert "None" not in caplog.text
        assert client.upload("recording.wav", wav_bytes(1.0), listener_id="mic-1", token_of=None)[0] == 200
    assert [path.name.split("_")[0] for path in settings.recordings_dir.glob("*.wav")] == ["mic-1"]


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


def send_until_closed(port: int, head: bytes, piece: bytes, most: int) -> tuple[int, bytes]:
    """Send `head`, then `piece` until `most` bytes went or the server closed: (bytes sent, its answer)."""
    sent = 0
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        try:
            sock.sendall(head)
            while sent < most:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:  # closed by the server, the answer waiting
            pass
        try:
            return sent, sock.recv(65536)
        except OSError:
            return sent, b""


def twenty_senders(port: int, head: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """20 connections at once, each sending `head` and then up to 40 MiB: (bytes sent and answer of each, the
    status of a health check made while they send)."""
    results: list[tuple[int, bytes]] = []
    senders = [
        threading.Thread(target=lambda: results.append(send_until_closed(port, head, b"a" * (256 << 10), 40 << 20)))
        for _ in range(20)
    ]
    for sender in senders:
        sender.start()
    health = httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=10).status_code
    for sender in senders:
        sender.join(60)
    return results, health


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def test_huge_headers_get_431_after_64_kib_and_cost_no_memory(tmp_path):
    """20 connections each offering a 40 MiB header value, without a token: each is answered 431 and closed
    after its first 64 KiB, and the ingest (in this process) grows by no more than a few MB."""
    settings = Settings(data_dir=tmp_path / "data", ingest_auth="on")
    head = b"POST /recordings_upload HTTP/1.1\r\nHost: station\r\nX-Padding: "
    with serving(settings) as port:
        before = resident_mb()
        results, health = twenty_senders(port, head)
        grown = resident_mb() - before
        assert health == 200 and httpx.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200
    print(
        f"20 x 40 MiB headers: sent at most {max(sent for sent, _ in results) >> 10} KiB each; ingest RSS +{grown:.0f} "
        "MB"
    )
    assert len(results) == 20 and all(sent < 8 << 20 for sent, _ in results)
    assert sum(answer.startswith(b"HTTP/1.1 431") for _, answer in results) >= 15  # (a reset may hide a few)
    assert grown < 40


def test_endless_chunked_trailers_without_a_token_are_cut_after_64_kib_and_cost_no_memory(tmp_path):
    """A chunked upload without a token whose last chunk is followed by a trailer line without end (the parser
    holds a trailer whole): 20 connections, each cut once what is no body passes 64 KiB, the ingest (in this
    process) a few MB larger and answering its health check meanwhile."""
    settings = Settings(data_dir=tmp_path / "data", ingest_auth="on")
    head = b"POST /recordings_upload HTTP/1.1\r\nHost: station\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: "
    with serving(settings) as port:
        before = resident_mb()
        started = time.monotonic()
        results, health = twenty_senders(port, head)
        took = time.monotonic() - started
        grown = resident_mb() - before
    print(
        f"20 x 40 MiB trailers: sent at most {max(sent for sent, _ in results) >> 10} KiB each in {took:.1f} s; "
        f"ingest RSS +{grown:.0f} MB"
    )
    assert health == 200 and len(results) == 20 and all(sent < 8 << 20 for sent, _ in results)
    assert grown < 40 and took < 20


def test_a_multipart_boundary_longer_than_rfc_2046_allows_is_a_400_like_any_malformed_form(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with serving(settings) as port:
        for length in (71, 300, 5000):
            answer = httpx.post(
                f"http://{LOOPBACK}:{port}/recordings_upload",
                content=b"--x\r\n",
                headers={"Content-Type": f"multipart/form-data; boundary={'b' * length}"},
                timeout=10,
            )
            assert answer.status_code == 400 and f"a boundary of {length} characters" in answer.json()["error"]
    assert not settings.recordings_dir.exists() or not any(settings.recordings_dir.iterdir())  # nothing kept


def test_the_ingest_serves_no_api_documentation_to_strangers(tmp_path):
    with serving(Settings(data_dir=tmp_path / "data", ingest_auth="on")) as port:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert httpx.get(f"http://{LOOPBACK}:{port}{path}", timeout=10).status_code == 404, path
        assert httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=10).status_code == 200
