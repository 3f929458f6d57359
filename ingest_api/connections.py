"""What one connection may cost: the timeouts uvicorn lacks, and the open-file limit.

uvicorn waits forever for a request's headers and for a body that stops arriving, so idle or slow
connections pile up until the process runs out of file descriptors. The protocol below closes a
connection whose headers take longer than `header_timeout_s`, an upload that sends nothing for
`body_timeout_s`, and a stream whose first frame takes longer than `header_timeout_s` or that then
sends nothing for `stream_idle_timeout_s` (listeners pause between recordings on an open stream).
The body of a refused request is read and dropped for `header_timeout_s` at most, so the client can
read its answer before the connection closes. Headers larger than MAX_HEADER_BYTES get 431 and the connection
closes: the parser would otherwise hold all of them (20 connections sending 40 MiB each took 700 MB).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

import uvicorn

from birdflow.runtime import metrics
from birdflow.runtime.uvicorn_internals import HttpToolsProtocol
from birdflow.settings import Settings

log = logging.getLogger("birdflow.ingest")
STREAM_PATH = "/recordings_stream"
# set in a stream's scope by its route once its first whole frame arrived: until then the first-frame deadline
# holds, however many bytes trickle in (256 streams sending a byte each held every slot for 15 minutes)
FIRST_FRAME_SEEN = "birdflow.first_frame_seen"
WANTED_OPEN_FILES = 65536
MAX_HEADER_BYTES = 64 * 1024  # the protocol's requests carry a few hundred bytes of headers
_TOO_LARGE_BODY = json.dumps({"error": f"request headers exceed {MAX_HEADER_BYTES} bytes"}).encode()
TOO_LARGE_HEADERS = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_TOO_LARGE_BODY)}\r\n\r\n".encode()
    + _TOO_LARGE_BODY
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on every stage of a request."""

    settings: Settings  # set by `guarded_protocol`

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._stage = ""
        self._limit_s = 0.0
        self._last_activity = 0.0
        self._header_bytes = 0
        # a message's bytes that are no body (headers, chunk sizes, trailers), and its body's: the parser holds a
        # header or trailer whole in memory, so what is no body is bounded however the request is framed
        self._framing_bytes = 0
        self._body_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._stage == "headers":
            self._header_bytes += len(data)
        self._framing_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._stage == "headers" and self._header_bytes > MAX_HEADER_BYTES:
            metrics.REQUESTS_REJECTED.labels(self.settings.station_id, "headers_too_large").inc()
            self.transport.write(TOO_LARGE_HEADERS)
            self.transport.close()
        elif self._framing_bytes > MAX_HEADER_BYTES + self._body_bytes // 8:
            # trailers without end, or chunks of a byte: answered if nothing was yet, and closed either way
            metrics.REQUESTS_REJECTED.labels(self.settings.station_id, "framing_too_large").inc()
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(TOO_LARGE_HEADERS)
            self.transport.close()

    def _watch(self, stage: str, limit_s: float) -> None:
        self._stage, self._limit_s = stage, limit_s
        self._header_bytes = 0
        self._last_activity = self.loop.time()
        self._unwatch()
        self._deadline_timer = self.loop.call_later(limit_s, self._check_deadline)

    def _unwatch(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _check_deadline(self) -> None:
        """One timer per connection, moved on by activity rather than re-armed on every chunk."""
        self._deadline_timer = None
        if self.transport.is_closing():
            return
        self._first_frame_seen()
        remaining = self._last_activity + self._limit_s - self.loop.time()
        if remaining > 0 or self.flow.read_paused:  # the client was active, or the app is the slow one
            self._deadline_timer = self.loop.call_later(max(remaining, 1.0), self._check_deadline)
            return
        metrics.CONNECTIONS_TIMED_OUT.labels(self.settings.station_id, self._stage).inc()
        log.info("closed a connection from %s: %s took longer than %.0f s", self.client, self._stage, self._limit_s)
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch("headers", self.settings.ingest.header_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._watch("headers", self.settings.ingest.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.scope.get("path") == STREAM_PATH:
            self._watch("stream first frame", self.settings.ingest.header_timeout_s)
        else:
            self._watch("body", self.settings.ingest.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        self._framing_bytes -= len(body)
        self._body_bytes += len(body)
        super().on_body(body)
        if self._stage == "stream first frame" and not self._first_frame_seen():
            return  # bytes that do not make a frame yet do not move the deadline
        if self._stage != "unread body":
            self._last_activity = self.loop.time()

    def _first_frame_seen(self) -> bool:
        """A stream whose route has read its first frame waits for the next as long as a listener pauses."""
        if self._stage == "stream first frame" and self.scope.get(FIRST_FRAME_SEEN):
            self._stage, self._limit_s = "stream idle", self.settings.ingest.stream_idle_timeout_s
            self._last_activity = self.loop.time()
        return self._stage != "stream first frame"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._watch("unread body", self.settings.ingest.header_timeout_s)  # answered early (a refusal)

    def on_message_complete(self) -> None:
        self._framing_bytes = self._body_bytes = 0
        super().on_message_complete()
        self._unwatch()  # uvicorn's keep-alive timeout takes over once the response is sent

    def connection_lost(self, exc) -> None:
        self._unwatch()
        super().connection_lost(exc)


def guarded_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    return type("StationHttpProtocol", (GuardedHttpProtocol,), {"settings": settings})


def server_config(app, settings: Settings, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The ingest API's uvicorn configuration (the `ingest` command and the tests use the same)."""
    return uvicorn.Config(
        app,
        host=host or settings.ingest.ingest_host,
        port=port or settings.ingest.ingest_port,
        http=guarded_protocol(settings),
        log_level="warning",
        access_log=False,  # a URL may carry a listener's ?token=
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise this process's open-file limit towards `wanted`, as far as the hard limit allows (systemd's
    default soft limit of 1024 is ~500 streams); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft
