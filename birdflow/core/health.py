"""Listener health telemetry (seed 004): small JSON datagrams a listener sends over UDP, checked strictly.

A datagram is one JSON object of at most MAX_DATAGRAM_BYTES: `listener_id` (the listener id rules) and any of
battery_v, rssi_dbm, temperature_c, free_storage_mb, uptime_s, firmware, each in its range; nothing else. A
listener is heard at most once per `min_interval_s` (the rest is counted as rate-limited), and at most
`max_listeners` listeners are tracked, so a flood of made-up ids cannot grow memory or metrics. Accepted
reports are spooled as JSON lines by the ingest (which stays free of pyarrow) and become the Arrow table
`listener_health` in the maintenance run.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from birdflow.core.errors import Refused
from birdflow.core.listener_ids import validate_listener_id

MAX_DATAGRAM_BYTES = 512
# field -> (type, low, high); strings carry a length limit and a character rule instead
NUMBERS = {
    "battery_v": (float, 0.0, 60.0),
    "rssi_dbm": (float, -150.0, 0.0),
    "temperature_c": (float, -80.0, 120.0),
    "free_storage_mb": (float, 0.0, 1e9),
    "uptime_s": (float, 0.0, 1e10),
}
FIRMWARE_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_+")
FIRMWARE_MAX = 32
# the reasons a datagram is refused: a bounded label set for the metric
REASONS = ("too_large", "not_json", "schema", "listener_id", "rate_limited", "too_many_listeners")


class HealthRefused(Refused):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class HealthReport:
    listener_id: str
    received_at: float
    battery_v: float | None = None
    rssi_dbm: float | None = None
    temperature_c: float | None = None
    free_storage_mb: float | None = None
    uptime_s: float | None = None
    firmware: str | None = None

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def parse_datagram(data: bytes, received_at: float) -> HealthReport:
    """The report in a datagram, or HealthRefused with its reason."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise HealthRefused("too_large")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HealthRefused("not_json") from None
    if not isinstance(body, dict):
        raise HealthRefused("schema", "not a JSON object")
    unknown = set(body) - set(NUMBERS) - {"listener_id", "firmware"}
    if unknown:
        raise HealthRefused("schema", f"unknown fields {sorted(unknown)}")
    named = body.get("listener_id")
    try:
        listener = validate_listener_id(named if isinstance(named, str) else "")
    except ValueError:
        raise HealthRefused("listener_id") from None
    values: dict[str, Any] = {}
    for name, (_, low, high) in NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise HealthRefused("schema", f"{name} out of range")
        values[name] = float(value)
    firmware = body.get("firmware")
    if firmware is not None:
        if (
            not isinstance(firmware, str)
            or not 0 < len(firmware) <= FIRMWARE_MAX
            or set(firmware) - FIRMWARE_CHARACTERS
        ):
            raise HealthRefused("schema", "firmware")
        values["firmware"] = firmware
    if not values:
        raise HealthRefused("schema", "no measurement")
    return HealthReport(listener, received_at, **values)


class RateLimit:
    """At most one report per listener per `min_interval_s`, and at most `max_listeners` listeners tracked (the
    station's own: the ingest refuses ids it does not know before they get here); a new one takes the place of the
    longest silent one once that one was silent for ten intervals."""

    def __init__(self, min_interval_s: float, max_listeners: int):
        self.min_interval_s = min_interval_s
        self.max_listeners = max_listeners
        self._last: OrderedDict[str, float] = OrderedDict()  # id -> last report, the longest silent first

    def admit(self, listener_id: str, now: float) -> None:
        """Take the report, or raise HealthRefused."""
        last = self._last.get(listener_id)
        if last is not None and now - last < self.min_interval_s:
            raise HealthRefused("rate_limited")
        if last is None and len(self._last) >= self.max_listeners:
            longest_silent = next(iter(self._last))
            if now - self._last[longest_silent] < self.min_interval_s * 10:
                raise HealthRefused("too_many_listeners")
            del self._last[longest_silent]
        self._last[listener_id] = now
        self._last.move_to_end(listener_id)

    @property
    def tracked(self) -> int:
        return len(self._last)


SPOOL_PATTERN = "*.jsonl*"
# the ingest closes its spool file every minute: one still open after this long was left by a crash
ABANDONED_S = 3600.0


def closed_spool_files(folder: Path, now: float) -> list[Path]:
    """Spool files the ingest has closed, and those a crash left open long ago."""
    if not Path(folder).is_dir():
        return []
    found = []
    for path in sorted(Path(folder).glob(SPOOL_PATTERN)):
        if path.suffix == ".jsonl" or now - path.stat().st_mtime > ABANDONED_S:
            found.append(path)
    return found


def read_spool(paths: Iterable[Path]) -> list[HealthReport]:
    """Reports from spool files; a line cut by a crash is skipped."""
    reports = []
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                reports.append(HealthReport(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return reports


def health_schema():
    """The Arrow schema of `listener_health` (built on demand: the ingest never loads pyarrow)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
            pa.field("station_id", pa.string(), nullable=False),
            pa.field("listener_id", pa.string(), nullable=False),
        ]
        + [pa.field(name, pa.float64()) for name in NUMBERS]
        + [pa.field("firmware", pa.string())]
    )


def health_table(reports: list[HealthReport], station_id: str):
    """The Arrow table `listener_health` of these reports."""
    import pyarrow as pa

    return pa.table(
        {
            "time": [datetime.fromtimestamp(report.received_at, timezone.utc) for report in reports],
            "station_id": [station_id] * len(reports),
            "listener_id": [report.listener_id for report in reports],
            **{name: [getattr(report, name) for report in reports] for name in NUMBERS},
            "firmware": [report.firmware for report in reports],
        },
        schema=health_schema(),
    )
