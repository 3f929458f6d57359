"""The UDP side of the ingest: listener health datagrams (birdflow/core/health.py checks them), exported as
gauges per listener and spooled as JSON lines for the maintenance run to table.

A bad datagram is counted by reason and dropped; its content is never logged. The spool file is closed and a
new one begun every minute, so maintenance only ever reads files the ingest has let go.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from birdflow.core.health import HealthRefused, HealthReport, RateLimit, parse_datagram
from birdflow.runtime import metrics
from birdflow.settings import Settings

log = logging.getLogger("birdflow.ingest")
ROTATE_S = 60.0
SPOOL_SUFFIX = ".jsonl"


class HealthSpool:
    """Append-only JSON lines, `<start>-<pid>.jsonl.partial` while written, renamed when closed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._file: TextIO | None = None
        self._path: Path | None = None
        self._opened = 0.0

    def add(self, report: HealthReport) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._opened = time.time()
            self._path = self.folder / f"{int(self._opened * 1000)}-{os.getpid()}{SPOOL_SUFFIX}.partial"
            self._file = open(self._path, "a", buffering=1)
        self._file.write(report.to_line() + "\n")

    def rotate(self, older_than_s: float = ROTATE_S) -> None:
        if self._file is not None and time.time() - self._opened >= older_than_s:
            self.close()

    def close(self) -> None:
        if self._file is not None and self._path is not None:
            self._file.close()
            os.replace(self._path, self._path.with_suffix(""))  # drops ".partial"
            self._file = None


class HealthReceiver(asyncio.DatagramProtocol):
    """Reports of the station's own listeners become gauges and rows of listener_health; those of ids it does not
    know are counted (refused, unknown_listener) and kept nowhere: the metrics, the table and MQTT's retained
    topics stay bounded by the real listeners, whatever ids a flood makes up."""

    def __init__(self, settings: Settings, spool: HealthSpool, known: Callable[[str], bool]):
        self.station = settings.station_id
        self.spool = spool
        self.known = known
        self.limit = RateLimit(settings.ingest.health_min_interval_s, settings.ingest.health_max_listeners)

    def datagram_received(self, data: bytes, addr) -> None:
        now = time.time()
        try:
            report = parse_datagram(data, now)
            if not self.known(report.listener_id):
                raise HealthRefused("unknown_listener")
            self.limit.admit(report.listener_id, now)
        except HealthRefused as refused:
            metrics.HEALTH_REFUSED.labels(self.station, refused.reason).inc()
            return
        metrics.HEALTH_REPORTS.labels(self.station).inc()
        self.spool.add(report)
        metrics.LISTENER_LAST_HEALTH.labels(self.station, report.listener_id).set(now)
        for name, gauge in metrics.LISTENER_HEALTH.items():
            value = getattr(report, name)
            if value is not None:
                gauge.labels(self.station, report.listener_id).set(value)


async def receive_health(settings: Settings, known: Callable[[str], bool]):
    """Listen for health datagrams until cancelled; None (and one log line) when the port cannot be bound."""
    if not settings.ingest.health_port:
        return
    spool = HealthSpool(settings.health_spool_dir)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: HealthReceiver(settings, spool, known),
            local_addr=(settings.ingest.ingest_host, settings.ingest.health_port),
        )
    except OSError as exc:
        log.error(
            "listener health: cannot listen on UDP port %d (%s); recordings are not affected",
            settings.ingest.health_port,
            exc,
        )
        return
    try:
        while True:
            await asyncio.sleep(ROTATE_S / 4)
            spool.rotate()
    finally:
        transport.close()
        spool.close()
