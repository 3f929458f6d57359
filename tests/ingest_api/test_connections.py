"""Hostile connections against the ingest API: every stage of a request has a deadline, streams are capped,
and a listener keeps working while hundreds of connections try to exhaust the server."""

from __future__ import annotations

import json
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import cast

import httpx
import yaml

from birdflow.core.listener_tokens import ListenerTokens
from birdflow.ingest_api.framing import encode_frame
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until
from tests.ingest_client import GOOD, chunked_post, frames_of, header, serving, stream_in_real_time, upload_claiming


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
                sock = cast(socket.socket, key.fileobj)
                try:
                    if sock.recv(65536):
                        continue  # an answer (503) before the close
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        if sock in self.opened:
            self.lifetimes.append(time.monotonic() - self.opened.pop(sock))
            self.selector.unregister(sock)
            sock.close()

    def close(self) -> None:
        for sock in list(self.opened):
            sock.close()


def test_600_hostile_connections_cost_a_listener_nothing_with_1024_open_files(tmp_path, sample_48k):
    """The ingest runs with systemd's default open-file limit and ingest_auth on (docs/security.md's advice)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port = free_port()
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "ingest_host": LOOPBACK,
                "ingest_port": port,
                "min_duration_s": 0.5,
                "header_timeout_s": 8.0,
                "ingest_auth": "on",
            }
        )
    )
    token = ListenerTokens(Settings(data_dir=tmp_path / "data").listener_tokens_file).add(GOOD)
    limit_open_files = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # noqa: E731
    ingest = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "ingest"],
        preexec_fn=limit_open_files,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
            f"http://{LOOPBACK}:{port}/recordings_upload",
            files={"file": (f"{GOOD}_20250101T000000Z.wav", sample_48k.read_bytes())},
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
    print(
        f"listener served within {served_within_s:.1f} s of 600 hostile connections; "
        f"they were closed after {min(hostile.lifetimes):.1f}-{max(hostile.lifetimes):.1f} s"
    )


def _open_stream(port: int, listener: str) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(
        f"POST /recordings_stream?listener_id={listener} HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
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
        except TimeoutError:
            continue
        except OSError:
            break
    sock.close()
    return time.monotonic() - began


def test_stream_caps_answer_503_and_each_stage_of_a_request_has_a_deadline(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        min_duration_s=0.5,
        header_timeout_s=1.5,
        body_timeout_s=2.0,
        max_open_streams=3,
        max_streams_per_listener=1,
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
        stalled_upload.sendall(upload_claiming(1 << 20, "unused"))
        stalled = _seconds_until_closed(stalled_upload)
        refused = _open_stream(port, "bad_id")  # answered 400 at once; what it goes on sending is not waited for
        refused_sending = _seconds_until_closed(refused, keep_sending=True)
    print(
        f"closed after: silent stream {silent_stream:.1f} s, stalled upload {stalled:.1f} s, "
        f"refused stream still sending {refused_sending:.1f} s"
    )
    # the server counts from the headers it read, a moment before the client starts its clock
    assert 1.3 <= silent_stream < 3.5 and 1.8 <= stalled < 4.0 and 1.3 <= refused_sending < 3.5


def stream_and_read(
    port: int, audio: bytes, seconds: float, on_the_way: Callable[[], None] = lambda: None
) -> tuple[bytes, str]:
    """A listener streaming in real time that also reads its socket; `on_the_way` runs after 2 s. Returns what
    it read and how the connection ended ("" while it was still open at the end)."""
    frames = frames_of(audio)
    page = 32768 + 6
    read, ended, started = b"", "", time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(
            f"POST /recordings_stream?listener_id={GOOD} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.setblocking(False)
        done_on_the_way = False
        for offset in range(0, len(frames), page):
            if time.monotonic() - started > seconds:
                break
            chunk = frames[offset : offset + page]
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                time.sleep(0.34)
                if not done_on_the_way and time.monotonic() - started > 2:
                    done_on_the_way = True
                    on_the_way()
                data = sock.recv(65536)
                if not data:
                    return read, "closed"
                read += data
            except BlockingIOError:
                continue
            except OSError as exc:
                return read, f"reset ({exc})"
    return read, ended


def test_a_listener_whose_stream_the_station_cuts_reads_come_back_later_not_a_reset(tmp_path, sample_48k):
    # the disk floor: the station answers 507 and reads on for a while, so the answer gets there
    # a station id of its own: the counters of this process are shared with the other tests
    with serving(Settings(station_id="cut-off", data_dir=tmp_path / "floor", min_free_disk_mb=10**9)) as port:
        read, ended = stream_and_read(port, sample_48k.read_bytes(), 5)
    assert read.startswith(b"HTTP/1.1 507 ") and b"retry-after: 300" in read.lower(), (read, ended)
    # the ingest stopping (SIGTERM): the recording in progress is kept and the listener told 503
    port = free_port()
    (tmp_path / "settings.yaml").write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "stop"),
                "ingest_host": LOOPBACK,
                "ingest_port": port,
                "health_port": free_port(),
            }
        )
    )
    ingest = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(tmp_path / "settings.yaml"), "ingest"],
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: httpx.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200, 30, "the ingest API")
        read, ended = stream_and_read(port, sample_48k.read_bytes(), 9.5, on_the_way=ingest.terminate)
    finally:
        ingest.wait(30)
    assert read.startswith(b"HTTP/1.1 503 ") and b"retry-after: 30" in read.lower(), (read, ended)
    kept = list((tmp_path / "stop" / "recordings").glob("good-1_*.wav"))  # what it had sent is kept
    # and the answer lists it, as the disk floor's 507 does, so that a listener resends only what came after
    answer = json.loads(read.partition(b"\r\n\r\n")[2].split(b"\r\n", 1)[-1].rsplit(b"\r\n0", 1)[0])
    assert kept and answer["recordings"] == [path.stem for path in kept], answer
    assert "stopping" in answer["error"]
