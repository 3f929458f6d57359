"""Real servers on loopback for the drills and the tests: SeaweedFS as the S3 archive, an InfluxDB 3
line-protocol endpoint (no InfluxDB 3 server is installable everywhere), and a proxy that takes a
server down and brings it back, to rehearse an outage of the archive or a sink.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready within {timeout_s} s")


def prefect_post(api_url: str, path: str, body, attempts: int = 5):
    """POST to a Prefect API; a 503 (its SQLite busy with another writer) is tried again."""
    import httpx

    for attempt in range(attempts):
        response = httpx.post(f"{api_url}/{path}", json=body, timeout=30)
        if response.status_code != 503 or attempt == attempts - 1:
            response.raise_for_status()
            return response.json()
        time.sleep(0.5 * 2**attempt)


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left (SeaweedFS ignores SIGTERM for a long time)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@dataclass
class Mosquitto:
    """A real Mosquitto broker on loopback, persistent across restarts (a QoS 1 session and its queued messages
    survive one) unless `persistent` is off (a restart forgets every retained message), with users from a
    password file and a TLS listener when asked."""

    folder: Path
    users: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    persistent: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    def _configure(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "user root",  # its files are in the caller's folder, which its own user may not read
            f"persistence {'true' if self.persistent else 'false'}",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            f"log_dest file {self.folder / 'mosquitto.log'}",
            f"allow_anonymous {'false' if self.users else 'true'}",
        ]
        if self.users:
            passwords = self.folder / "passwords"
            passwords.write_text("".join(f"{user}:{password}\n" for user, password in self.users.items()))
            passwords.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True)
            lines.append(f"password_file {passwords}")
        if self.tls:
            self._certificates()
            lines += [
                f"cafile {self.ca_file}",
                f"certfile {self.folder / 'server.crt'}",
                f"keyfile {self.folder / 'server.key'}",
            ]
        config = self.folder / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _certificates(self) -> None:
        """A CA of its own and a server certificate for 127.0.0.1 (openssl, once)."""
        if (self.folder / "server.crt").exists():
            return
        run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.folder)  # noqa: E731
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=birdflow test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        )
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={LOOPBACK}",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        )
        (self.folder / "san.cnf").write_text(f"subjectAltName=IP:{LOOPBACK}\n")
        run(
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            "server.crt",
        )

    def start(self) -> Mosquitto:
        config = self._configure()
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )

        def listening() -> bool:
            with socket.create_connection((LOOPBACK, self.port), timeout=1):
                return True

        wait_until(listening, 30, "mosquitto")
        return self

    def stop(self) -> None:
        """SIGTERM: it saves its persistent state (sessions, queued messages) before it exits."""
        if self.process:
            stop_process(self.process, grace_s=10)


@dataclass
class SeaweedS3:
    data: Path
    access_key: str = "birdflow-test"
    secret_key: str = "birdflow-test-secret"
    s3_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("weed") or (Path(sys.executable).parent / "weed").exists())

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def start(self, log: Path, attempts: int = 3) -> SeaweedS3:
        """Start `weed server -s3`; when it exits early (one of its eight ports was taken between being chosen
        and being bound, e.g. by one of its own outgoing connections), start again on new ports."""
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.s3_port = free_port()
            command = [
                weed,
                f"-logdir={self.data}",
                "server",
                f"-dir={self.data}",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                # each bucket (collection) grows its own volumes: room for several buckets, kept small
                "-volume.max=64",
                "-master.volumeSizeLimitMB=64",
                f"-master.port={free_port()}",
                f"-master.port.grpc={free_port()}",
                f"-volume.port={free_port()}",
                f"-volume.port.grpc={free_port()}",
                f"-filer.port={free_port()}",
                f"-filer.port.grpc={free_port()}",
                "-s3",
                f"-s3.port={self.s3_port}",
                f"-s3.port.grpc={free_port()}",
                # its Iceberg and Lance listeners default to fixed ports: a second server would exit on them
                f"-s3.port.iceberg={free_port()}",
                f"-s3.port.lance={free_port()}",
            ]
            with open(log, "ab") as output:
                self.process = subprocess.Popen(
                    command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    self.client().list_buckets()
                    return self
                except Exception:
                    time.sleep(0.25)
            self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not start in {attempts} attempts; see {log}")

    def create_bucket(self, name: str) -> None:
        wait_until(lambda: self.client().create_bucket(Bucket=name) is not None, 60, f"bucket {name}")

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, grace_s=3)


class WebhookReceiver:
    """A loopback HTTP server that keeps the JSON body of every POST: a notification channel to watch."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.messages: list[dict] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LineProtocolServer:
    """An HTTP server that accepts InfluxDB 3 writes (/api/v3/write_lp and /api/v2/write) and keeps the lines.

    `unavailable` answers every write with 503 (an outage); `fail_next` only that many."""

    def __init__(self, token: str):
        self.token = token
        self.lines: list[str] = []
        self.requests: list[dict] = []
        self.fail_next = 0
        self.unavailable = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                server.requests.append(
                    {"path": url.path, "query": parse_qs(url.query), "auth": self.headers.get("Authorization")}
                )
                if url.path not in ("/api/v3/write_lp", "/api/v2/write"):
                    return self._reply(404, b'{"error":"not found"}')
                if self.headers.get("Authorization") not in (f"Token {server.token}", f"Bearer {server.token}"):
                    return self._reply(401, b'{"error":"unauthorized"}')
                if server.unavailable or server.fail_next:
                    server.fail_next = max(0, server.fail_next - 1)
                    return self._reply(503, b'{"error":"try again"}')
                server.lines.extend(line for line in body.decode().splitlines() if line.strip())
                self._reply(204, b"")

            def _reply(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def start(self) -> LineProtocolServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """(measurement, tags, fields, timestamp) of one line-protocol line (escaped spaces/commas honoured)."""

    def split(text: str, separator: str) -> list[str]:
        parts, current, escaped, quoted = [], "", False, False
        for char in text:
            if escaped:
                current += char
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = not quoted
                current += char
            elif char == separator and not quoted:
                parts.append(current)
                current = ""
            else:
                current += char
        parts.append(current)
        return parts

    series, fields_text, timestamp = split(line, " ")
    measurement, *tag_parts = split(series, ",")
    tags = dict(part.split("=", 1) for part in tag_parts)
    fields = dict(part.split("=", 1) for part in split(fields_text, ","))
    return measurement, tags, fields, int(timestamp)


class FaultProxy:
    """A TCP proxy on loopback in front of a real server. `down()` refuses new connections and cuts the
    open ones, as a server that died or a network that broke; `up()` serves again on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def up(self) -> FaultProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)  # shutdown() first: a bare close() would not wake the thread blocked in accept()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # taken down
            try:
                server = socket.create_connection((LOOPBACK, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections -= {source, sink}
            _close(source)
            _close(sink)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
