"""Listener health datagrams: what is taken, what is refused and why, the rate limit, the spool and the table."""

from __future__ import annotations

import json

import pytest

from birdflow.core.health import (
    MAX_DATAGRAM_BYTES,
    HealthRefused,
    HealthReport,
    RateLimit,
    closed_spool_files,
    health_table,
    parse_datagram,
    read_spool,
)

GOOD = {
    "listener_id": "mic-1",
    "battery_v": 3.92,
    "rssi_dbm": -67,
    "temperature_c": 11.5,
    "free_storage_mb": 28000,
    "uptime_s": 86400,
    "firmware": "1.4.2-esp32",
}


def test_a_good_report_is_taken_with_every_field():
    report = parse_datagram(json.dumps(GOOD).encode(), 1000.0)
    assert report == HealthReport("mic-1", 1000.0, 3.92, -67.0, 11.5, 28000.0, 86400.0, "1.4.2-esp32")
    assert parse_datagram(b'{"listener_id": "mic-2", "battery_v": 4}', 1.0).battery_v == 4.0  # any subset


@pytest.mark.parametrize(
    "datagram, reason",
    [
        (b"x" * (MAX_DATAGRAM_BYTES + 1), "too_large"),
        (b"\xff\xfe not utf-8", "not_json"),
        (b"battery=3.9", "not_json"),
        (b"[1, 2]", "schema"),
        (json.dumps({**GOOD, "password": "x"}).encode(), "schema"),
        (json.dumps({**GOOD, "battery_v": 900}).encode(), "schema"),
        (json.dumps({**GOOD, "rssi_dbm": "strong"}).encode(), "schema"),
        (json.dumps({**GOOD, "battery_v": True}).encode(), "schema"),
        (b'{"listener_id": "mic-1", "battery_v": NaN}', "schema"),
        (json.dumps({**GOOD, "firmware": "1.0; rm -rf"}).encode(), "schema"),
        (json.dumps({"listener_id": "mic-1"}).encode(), "schema"),
        (json.dumps({**GOOD, "listener_id": "../etc"}).encode(), "listener_id"),
        (json.dumps({**GOOD, "listener_id": 7}).encode(), "listener_id"),
        (json.dumps({key: value for key, value in GOOD.items() if key != "listener_id"}).encode(), "listener_id"),
    ],
)
def test_anything_else_is_refused_with_its_reason(datagram, reason):
    with pytest.raises(HealthRefused) as refused:
        parse_datagram(datagram, 1.0)
    assert refused.value.reason == reason


def test_one_report_per_interval_per_listener_and_a_bounded_number_of_listeners():
    limit = RateLimit(min_interval_s=10, max_listeners=2)
    limit.admit("a", 0.0)
    with pytest.raises(HealthRefused, match="rate_limited"):
        limit.admit("a", 5.0)
    limit.admit("a", 10.0)
    limit.admit("b", 10.0)
    with pytest.raises(HealthRefused, match="too_many_listeners"):
        limit.admit("c", 11.0)  # both tracked ones reported recently
    limit.admit("c", 200.0)  # "a" and "b" went quiet long ago: the longest silent one makes room
    assert limit.tracked == 2


def test_closed_spool_files_become_the_listener_health_table(tmp_path):
    closed, open_now = tmp_path / "1-1.jsonl", tmp_path / "2-1.jsonl.partial"
    reports = [
        HealthReport("mic-1", 1000.0, battery_v=3.9),
        HealthReport("mic-2", 1001.0, rssi_dbm=-70.0, firmware="x"),
    ]
    closed.write_text("".join(report.to_line() + "\n" for report in reports) + '{"listener_id": "cut by a cra')
    open_now.write_text(reports[0].to_line() + "\n")
    assert closed_spool_files(tmp_path, now=open_now.stat().st_mtime + 10) == [closed]
    assert closed_spool_files(tmp_path, now=open_now.stat().st_mtime + 7200) == [closed, open_now]  # left by a crash
    table = health_table(read_spool([closed]), "north")
    assert table.num_rows == 2 and table.column("station_id").to_pylist() == ["north", "north"]
    assert table.column("battery_v").to_pylist() == [3.9, None] and table.column("firmware").to_pylist() == [None, "x"]
