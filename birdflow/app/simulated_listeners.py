"""Simulated listeners speaking the streaming protocol (or uploading), like deployed devices do.

Each listener keeps one chunked POST open, sends frame 0 with the WAV header, then 32 KiB pages at
real-time pace, waits its interval and starts the next recording on the same connection. On a
connection error it reconnects with exponential back-off (2, 4, 8 ... 60 s); a 4xx answer ends it, and what it
says is reported. A recording counts as sent unless the station refused it; with a number of recordings to send,
a listener stops after that many attempts, whether they got through or not.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from birdflow.core.recordings import TIMESTAMP_FORMAT
from birdflow.core.wav import parse_header
from birdflow.ingest_api.framing import encode_frame

PAGE_BYTES = 32768


@dataclass
class ListenerReport:
    listener_id: str
    recordings_sent: int = 0  # not refused (a stream's are confirmed only when its connection ends)
    recordings_refused: int = 0
    attempts_failed: int = 0  # connections that broke off, the recording in them not known to be stored
    bytes_sent: int = 0
    errors: list[str] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)

    def attempts(self) -> int:
        return self.recordings_sent + self.recordings_refused + self.attempts_failed


@dataclass
class Reconnect:
    """The reference client's rule after a failed request: wait 2, 4, 8 ... 60 s and try again. A 4xx is
    the exception: the same request would be refused again, so that listener gives up."""

    on_error: Callable[[str, str], None] = lambda listener, error: None
    max_delay_s: float = 60.0
    delay_s: float = 2.0

    def failed(self, report: ListenerReport, exc: httpx.HTTPError, recordings: int = 1) -> bool:
        """Record the failure of `recordings` (those of a broken stream); False when trying again cannot help."""
        error = _describe(exc)
        report.errors.append(error)
        self.on_error(report.listener_id, error)
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
            report.recordings_refused += recordings
            return False
        report.attempts_failed += recordings
        return True

    async def wait(self) -> None:
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_delay_s)

    def succeeded(self) -> None:
        self.delay_s = 2.0


def split_wav(data: bytes) -> tuple[bytes, bytes, int]:
    """(header, PCM audio, byte rate) of a PCM WAV file."""
    header = parse_header(data)
    data_size = int.from_bytes(header.raw[-4:], "little")
    audio = data[header.size : header.size + data_size] if data_size else data[header.size :]
    return header.raw, audio, header.format.byte_rate


def make_distinct(audio: bytes, number: int) -> bytes:
    """The same audio with its last 16-bit sample set from `number`: inaudible, but a new content hash,
    so load tests exercise the analysis instead of its cache."""
    if len(audio) < 2:
        return audio
    return audio[:-2] + (number & 0xFFFF).to_bytes(2, "little")


async def _recording_frames(header: bytes, audio: bytes, byte_rate: int, pace: float) -> AsyncIterator[bytes]:
    yield encode_frame(0, header)
    page_seconds = PAGE_BYTES / byte_rate
    for seq, offset in enumerate(range(0, len(audio), PAGE_BYTES), start=1):
        if pace > 0:
            await asyncio.sleep(page_seconds / pace)
        yield encode_frame(seq, audio[offset : offset + PAGE_BYTES])


async def stream_listener(
    client: httpx.AsyncClient,
    base_url: str,
    report: ListenerReport,
    wav: bytes,
    *,
    recordings: int,
    interval_s: float,
    pace: float = 1.0,
    on_recording: Callable[[str], None] = lambda listener: None,
    reconnect: Reconnect,
    distinct: bool = False,
) -> None:
    """Send `recordings` recordings (0 = until cancelled) over one long-lived connection; `report`
    fills in as it goes, so it tells what was sent even when cancelled."""
    listener_id = report.listener_id
    header, audio, byte_rate = split_wav(wav)
    salt = zlib.crc32(listener_id.encode()) << 8

    def wanted() -> bool:
        return not recordings or report.attempts() < recordings

    while wanted():
        in_connection = 0  # recordings sent in full on this connection

        async def body() -> AsyncIterator[bytes]:
            nonlocal in_connection
            while wanted():
                pcm = make_distinct(audio, salt + report.attempts()) if distinct else audio
                async for frame in _recording_frames(header, pcm, byte_rate, pace):
                    report.bytes_sent += len(frame)
                    yield frame
                in_connection += 1
                report.recordings_sent += 1
                on_recording(listener_id)
                if wanted():
                    await asyncio.sleep(interval_s)

        try:
            try:
                response = await client.post(
                    f"{base_url}/recordings_stream", params={"listener_id": listener_id}, content=body()
                )
            except httpx.TransportError:
                # a station that refuses a stream answers at once and closes, while this side still sends: the
                # answer is lost in the write error, so it is asked for again with a stream of nothing
                response = await client.post(
                    f"{base_url}/recordings_stream", params={"listener_id": listener_id}, content=b""
                )
                if response.status_code < 400:
                    raise
            report.responses.append({"status": response.status_code, **_json_or_text(response)})
            response.raise_for_status()
            reconnect.succeeded()
        except httpx.HTTPError as exc:
            report.recordings_sent -= in_connection
            if not reconnect.failed(report, exc, max(1, in_connection)) or not wanted():
                return
            await reconnect.wait()


async def upload_listener(
    client: httpx.AsyncClient,
    base_url: str,
    report: ListenerReport,
    data: bytes,
    suffix: str,
    *,
    recordings: int,
    interval_s: float,
    on_recording: Callable[[str], None] = lambda listener: None,
    reconnect: Reconnect,
    distinct: bool = False,
) -> None:
    """POST the file `recordings` times (0 = until cancelled), named like listener01_20250101T120000Z.wav."""
    listener_id = report.listener_id
    salt = zlib.crc32(listener_id.encode()) << 8
    while not recordings or report.attempts() < recordings:
        name = f"{listener_id}_{datetime.now(timezone.utc):{TIMESTAMP_FORMAT}}{suffix}"
        body = make_distinct(data, salt + report.attempts()) if distinct and suffix == ".wav" else data
        try:
            response = await client.post(f"{base_url}/recordings_upload", files={"file": (name, body)})
            report.responses.append({"status": response.status_code, **_json_or_text(response)})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            if not reconnect.failed(report, exc) or (recordings and report.attempts() >= recordings):
                return
            await reconnect.wait()
            continue
        reconnect.succeeded()
        report.recordings_sent += 1
        report.bytes_sent += len(data)
        on_recording(listener_id)
        if not recordings or report.attempts() < recordings:
            await asyncio.sleep(interval_s)


def _describe(exc: httpx.HTTPError) -> str:
    """A refusal in the server's own words ("415: unsupported file type .txt ..."), else the transport error."""
    if isinstance(exc, httpx.HTTPStatusError):
        body = _json_or_text(exc.response)
        return f"{exc.response.status_code}: {body.get('error') or body.get('text') or exc.response.reason_phrase}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (the connection broke off)"


def _json_or_text(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"text": response.text[:200]}
    return body if isinstance(body, dict) else {"body": body}


class HealthSender:
    """What a listener's firmware sends after each recording: one health datagram over UDP (docs/listener-protocol.md,
    "Listener health")."""

    def __init__(self, base_url: str, port: int):
        import socket
        from urllib.parse import urlparse

        self.address = (urlparse(base_url).hostname or "127.0.0.1", port)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.started = time.monotonic()

    def send(self, listener_id: str) -> None:
        uptime = time.monotonic() - self.started
        report = {
            "listener_id": listener_id,
            "battery_v": round(4.15 - uptime / 86400, 3),
            "rssi_dbm": random.randint(-85, -45),
            "temperature_c": round(random.uniform(5, 25), 1),
            "free_storage_mb": 30000.0,
            "uptime_s": round(uptime),
            "firmware": "birdflow-listen",
        }
        try:
            self.socket.sendto(json.dumps(report).encode(), self.address)
        except OSError:
            pass  # telemetry is best effort, as on a listener

    def close(self) -> None:
        self.socket.close()


async def run_listeners(
    base_url: str,
    file: Path,
    *,
    listeners: int,
    interval_s: float,
    recordings: int,
    stagger_s: float = 0.0,
    pace: float = 1.0,
    upload: bool = False,
    prefix: str = "listener",
    on_recording: Callable[[str], None] = lambda listener: None,
    on_error: Callable[[str, str], None] = lambda listener, error: None,
    timeout_s: float | None = None,
    stop: asyncio.Event | None = None,
    distinct: bool = False,
    token: str | None = None,
    health_port: int = 0,
) -> list[ListenerReport]:
    """Run the listeners until each has sent its recordings, `stop` is set or `timeout_s` has passed;
    the reports count what was sent either way. With `health_port`, each sends a health datagram after each
    recording."""
    data = file.read_bytes()
    if health_port:
        health = HealthSender(base_url, health_port)
        counted = on_recording

        def on_recording(listener: str) -> None:
            counted(listener)
            health.send(listener)

    limits = httpx.Limits(max_connections=listeners + 4, max_keepalive_connections=listeners + 4)
    timeout = httpx.Timeout(30.0, read=None)
    reports = [ListenerReport(f"{prefix}{index:02d}") for index in range(1, listeners + 1)]

    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:

        async def one(report: ListenerReport) -> None:
            await asyncio.sleep(random.uniform(0, stagger_s) if stagger_s else 0)
            if upload:
                await upload_listener(
                    client,
                    base_url,
                    report,
                    data,
                    file.suffix.lower(),
                    recordings=recordings,
                    interval_s=interval_s,
                    on_recording=on_recording,
                    reconnect=Reconnect(on_error),
                    distinct=distinct,
                )
            else:
                await stream_listener(
                    client,
                    base_url,
                    report,
                    data,
                    recordings=recordings,
                    interval_s=interval_s,
                    pace=pace,
                    on_recording=on_recording,
                    reconnect=Reconnect(on_error),
                    distinct=distinct,
                )

        tasks = [asyncio.create_task(one(report)) for report in reports]
        all_sent = asyncio.create_task(asyncio.wait(tasks))
        stopped = asyncio.create_task((stop or asyncio.Event()).wait())
        await asyncio.wait([all_sent, stopped], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        all_sent.cancel()
        stopped.cancel()
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
    if health_port:
        health.close()
    return reports
