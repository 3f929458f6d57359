"""A client of the listener protocol for the tests: the ingest API served by uvicorn on loopback, chunked
POSTs written byte by byte, WAV files and their frames."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from birdflow.core.wav import WavFormat, build_header
from birdflow.ingest_api.app import create_app
from birdflow.ingest_api.connections import server_config
from birdflow.ingest_api.framing import encode_frame
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until


@contextmanager
def serving(settings: Settings):
    """The ingest API on loopback (its UDP health port too) in a thread of this process."""
    settings.ingest.ingest_host = LOOPBACK
    port = free_port()
    server = uvicorn.Server(server_config(create_app(settings), settings, LOOPBACK, port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: httpx.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200, 20, "ingest API")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def chunked_post(
    port: int, path: str, chunks: list[bytes], finish: bool = True, timeout: float = 20, headers: dict | None = None
) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked, one HTTP chunk per item; finish=False vanishes mid-body."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{extra}Transfer-Encoding: chunked\r\n\r\n".encode())
        for chunk in chunks:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if not finish:
            sock.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            return 0, {}
        sock.sendall(b"0\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response or not _complete(response):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, json.loads(body or b"{}")


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    lowered = head.lower()
    if b"content-length:" in lowered:
        length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
        return len(body) >= length
    return body.endswith(b"0\r\n\r\n")


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def wav_bytes(seconds: float, sample_rate: int = 48000, value: int = 1000) -> bytes:
    frames = int(seconds * sample_rate)
    return build_header(WavFormat(sample_rate, 1, 16), frames * 2).raw + struct.pack("<h", value) * frames


def frames_of(wav: bytes, page: int = 32768) -> bytes:
    header, audio = wav[:44], wav[44:]
    return encode_frame(0, header) + b"".join(
        encode_frame(seq, audio[offset : offset + page])
        for seq, offset in enumerate(range(0, len(audio), page), start=1)
    )


GOOD = "good-1"


def header(rate: int, bits: int, tag: int = 1) -> bytes:
    raw = bytearray(build_header(WavFormat(rate, 1, bits)).raw)
    struct.pack_into("<H", raw, 20, tag)
    return bytes(raw)


def upload_claiming(length: int, token: str) -> bytes:
    return (
        (
            f"POST /recordings_upload HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        + b"--b\r\n"
        + b"x" * 1024
    )


def stream_in_real_time(port: int, token: str, recordings: int, seconds: float, result: dict) -> None:
    """A well-behaved listener: header, pages at (twice) real-time pace, a pause, the next recording."""
    body = []
    for number in range(recordings):
        wav = wav_bytes(seconds, value=1000 + number)  # each its own audio, as in the field
        body.append(encode_frame(0, wav[:44]))
        body += [
            encode_frame(seq, wav[offset : offset + 9600]) for seq, offset in enumerate(range(44, len(wav), 9600), 1)
        ]
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        sock.sendall(
            f"POST /recordings_stream?listener_id={GOOD}&token={token} HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for frame in body:
            sock.sendall(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            time.sleep(0.05)  # 0.1 s of audio every 0.05 s
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while not (b"\r\n\r\n" in answer and _complete(answer)) and (data := sock.recv(65536)):
            answer += data
        result["answer"] = answer
