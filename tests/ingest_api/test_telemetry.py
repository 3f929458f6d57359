"""Listener health over UDP through the real ingest: good datagrams become gauges and, after maintenance, rows
of listener_health that `birdflow sql` reads; malformed ones and a flood are counted and bounded."""

from __future__ import annotations

import json
import socket
import time

from prometheus_client import REGISTRY

from birdflow.core.ledger import ProcessedLedger
from birdflow.core.sql import query, station_tables
from birdflow.settings import Settings
from birdflow_tools.testbed import free_port, wait_until
from tests.ingest_client import LOOPBACK, serving


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_health_datagrams_are_checked_counted_bounded_and_tabled(tmp_path, monkeypatch):
    from birdflow.flows import run_resources
    from birdflow.flows.maintenance import write_listener_health
    from birdflow.flows.run_resources import use_run_resources

    health_port = free_port()
    settings = Settings(
        station_id="telemetry",
        data_dir=tmp_path / "data",
        health_port=health_port,
        health_min_interval_s=30,
        health_max_listeners=40,
    )
    refused = lambda reason: sample("birdflow_listener_health_refused_total", station="telemetry", reason=reason)  # noqa: E731
    taken = lambda: sample("birdflow_listener_health_reports_total", station="telemetry")  # noqa: E731
    reasons = (
        "not_json",
        "schema",
        "listener_id",
        "too_large",
        "rate_limited",
        "too_many_listeners",
        "unknown_listener",
    )
    before = {reason: refused(reason) for reason in reasons}
    # no token asked for and no one registered: the station knows the listeners it has recordings of
    ledger = ProcessedLedger(settings.processed_record_file)
    for listener in ("probe", "mic-1", "mic-2", "mic-3", *(f"mic-{number}" for number in range(10, 60))):
        ledger.record(f"{listener}_20250601T000000Z_abababab", "a1")
    with serving(settings), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:

        def send(body):
            udp.sendto(body if isinstance(body, bytes) else json.dumps(body).encode(), (LOOPBACK, health_port))

        wait_until(lambda: (send({"listener_id": "probe", "uptime_s": 1}), taken() >= 1)[1], 10, "the UDP receiver")
        send({"listener_id": "mic-1", "battery_v": 3.9, "rssi_dbm": -61, "firmware": "1.2.0"})
        send({"listener_id": "mic-2", "battery_v": 3.4, "temperature_c": 8.5})
        send(b"password=hunter2")
        send({"listener_id": "mic-3", "battery_v": 3.9, "secret": "x"})
        send({"listener_id": "../../etc", "battery_v": 3.9})
        send(b"{" + b" " * 600 + b"}")
        wait_until(lambda: taken() >= 3 and refused("too_large") > before["too_large"], 10, "the first datagrams")
        # a flood: 2000 datagrams, from 50 of the station's listeners and 50 made-up ids, as fast as the socket goes
        at_flood = {reason: refused(reason) for reason in before}
        taken_at_flood = taken()
        started = time.monotonic()
        for number in range(2000):
            listener = f"mic-{10 + number % 50}" if number % 2 else f"made-up-{number % 100}"
            send({"listener_id": listener, "battery_v": 3.0})
        flood_s = time.monotonic() - started
        accounted = lambda: taken() - taken_at_flood + sum(refused(reason) - at_flood[reason] for reason in before)  # noqa: E731
        settled = []
        wait_until(lambda: settled.append(accounted()) or settled[-5:] == [settled[-1]] * 5, 20, "the flood handled")
    # UDP: the kernel may drop what the receiver could not read in time; what was read is all accounted for
    flood_seen = settled[-1]
    assert 200 <= flood_seen <= 2000, flood_seen
    assert flood_s < 10
    assert sample("birdflow_listener_battery_v", station="telemetry", listener="mic-1") == 3.9
    assert sample("birdflow_listener_rssi_dbm", station="telemetry", listener="mic-1") == -61
    assert (
        sample("birdflow_listener_health_last_seen_timestamp_seconds", station="telemetry", listener="mic-2")
        > time.time() - 60
    )
    assert refused("not_json") - before["not_json"] == 1 and refused("schema") - before["schema"] == 1
    assert refused("listener_id") - before["listener_id"] == 1 and refused("too_large") - before["too_large"] == 1
    # made-up ids kept nowhere; at most 40 listeners tracked, each once per 30 s: the flood adds at most 37
    flood_taken = taken() - taken_at_flood
    assert 1 <= flood_taken <= 37 and refused("unknown_listener") - at_flood["unknown_listener"] >= 100
    flood_refused = sum(refused(reason) - at_flood[reason] for reason in reasons)
    assert flood_refused == flood_seen - flood_taken
    # the ingest closed its spool when it stopped; maintenance makes it the table listener_health
    monkeypatch.setattr(run_resources, "_current", None)
    use_run_resources(settings)
    assert write_listener_health.fn(settings)["reports"] == taken()
    assert not list(settings.health_spool_dir.iterdir())
    rows = query(
        "SELECT listener_id, battery_v, firmware FROM listener_health"
        " WHERE listener_id IN ('mic-1', 'mic-2') ORDER BY 1",
        station_tables(settings.table_folders),
    ).to_pylist()
    assert rows == [
        {"listener_id": "mic-1", "battery_v": 3.9, "firmware": "1.2.0"},
        {"listener_id": "mic-2", "battery_v": 3.4, "firmware": None},
    ]
    made_up = query(
        "SELECT count(*) AS n FROM listener_health WHERE listener_id LIKE 'made-up-%'",
        station_tables(settings.table_folders),
    )
    assert made_up.to_pylist() == [{"n": 0}]


def test_a_flood_of_made_up_ids_leaves_the_stations_listeners_their_place_and_makes_no_gauges(tmp_path):
    from birdflow.core.listener_tokens import ListenerTokens

    health_port = free_port()
    settings = Settings(
        station_id="made-up",
        data_dir=tmp_path / "data",
        health_port=health_port,
        ingest_auth="on",
        health_min_interval_s=1,
        health_max_listeners=100,
    )
    for listener in ("mic-1", "mic-2"):
        ListenerTokens(settings.listener_tokens_file).add(listener)

    def taken():
        return sample("birdflow_listener_health_reports_total", station="made-up")

    def unknown():
        return sample("birdflow_listener_health_refused_total", station="made-up", reason="unknown_listener")

    def last_seen(listener):
        return sample("birdflow_listener_health_last_seen_timestamp_seconds", station="made-up", listener=listener)

    with serving(settings), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        send = lambda body: udp.sendto(json.dumps(body).encode(), (LOOPBACK, health_port))  # noqa: E731
        wait_until(
            lambda: (send({"listener_id": "mic-1", "battery_v": 3.9}), last_seen("mic-1") > 0)[1], 10, "mic-1 heard"
        )
        before_flood = taken()
        for round_ in range(2):  # 1000 made-up ids, twice
            for number in range(1000):
                send({"listener_id": f"fake-{round_}-{number}", "battery_v": 1.0})
                if number % 100 == 0:
                    time.sleep(0.01)  # (so that the kernel keeps most of them)
        flooded = taken()
        send({"listener_id": "mic-2", "battery_v": 3.5})
        wait_until(lambda: last_seen("mic-2") > 0, 10, "mic-2 heard after the flood")
        time.sleep(1.1)
        send({"listener_id": "mic-1", "battery_v": 3.8})
        wait_until(
            lambda: sample("birdflow_listener_battery_v", station="made-up", listener="mic-1") == 3.8, 10, "mic-1 again"
        )
    assert unknown() > 50 and flooded == before_flood  # the flood was read, refused and kept nowhere
    gauges = [metric for metric in REGISTRY.collect() if metric.name == "birdflow_listener_battery_v"]
    listeners = {
        sample.labels["listener"]
        for metric in gauges
        for sample in metric.samples
        if sample.labels["station"] == "made-up"
    }
    assert listeners == {"mic-1", "mic-2"}
