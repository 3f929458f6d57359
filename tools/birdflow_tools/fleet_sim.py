"""The rest of a fleet, simulated: what `count` more stations that keep their own run history send the central
Prefect, at compressed time (`birdflow bench --stations N --history own --simulate 98`).

Each simulated station is birdflow's own relay (flows/relay.py) over a station folder of its own: every
simulated hour its species record is given the hour (each of `listeners` listeners hears a few of the station's
common species; now and then one a rare one, from a pool the stations share, so that some are confirmed across
stations), its ledger the hour's recordings, and the relay does what it does on a real station: sends the rare
events, matches them against the central event store, and runs the closed hour's station-hour run with its
artifact. Only the audio is missing: none of it reaches the central side in this mode. The simulated hours lie
in the past, one every `hour_s` real seconds; the central side's CPU and database growth over them is what a
station-hour costs it.

Their metrics, in real time (the rate is the scrape interval's, not compressible): one Prometheus agent scrapes
every simulated station's /metrics (a real station's, under the simulated station's name) and remote-writes
them to a central Prometheus, whose CPU over `metrics_s` is what the stations' metrics cost it.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import httpx
import pyarrow as pa
import yaml

from birdflow.core.rarity import hour_of
from birdflow.settings import Settings
from birdflow_tools.central import HISTORY_TABLES, CentralPrefect
from birdflow_tools.stack import cpu_seconds, process_tree
from birdflow_tools.testbed import LOOPBACK, free_port, prefect_post, stop_process, wait_until

COMMON_SPECIES = 40  # a station's common species (each listener hears `species_per_listener` of them an hour)
CONFIDENCE = 0.8


@dataclass
class SimulatedStations:
    count: int = 98
    listeners: int = 30
    recording_s: float = 20.0
    hours: int = 3
    hour_s: float = 36.0  # real seconds per simulated hour
    species_per_listener: int = 6
    rare_share: float = 0.2  # of station-hours, those with a rare species
    rare_species: int = 12  # shared by the fleet: a station hearing one is told it is rare, the first time
    seed: int = 7
    # when the relays match a sighting after sending it (None: as a station's relay does, CONFIRM_CHECKS_S); the
    # simulation ends once the first check of the last hour's sightings is done
    confirm_checks_s: tuple[float, ...] | None = None
    metrics_s: float = 60.0  # real seconds of the stations' metrics remote-written centrally; 0: none
    scrape_interval_s: int = 15  # prometheus_scrape_interval_s, as stations have it

    @property
    def recordings_per_station_hour(self) -> float:
        return self.listeners * 3600 / self.recording_s


def species(number: int, rare: bool = False) -> tuple[str, str]:
    """(scientific, common) names as long as real ones."""
    kind = "rara" if rare else "communis"
    return f"Avis {kind} {number:03d}", f"Simulated {'Rare' if rare else 'Common'} Bird {number:03d}"


def hour_of_station(station: str, hour: int, listeners: int, per_listener: int, rare: int | None, draw) -> pa.Table:
    """A station's hour as its recordings' detections would add it to the species record (one row per listener and
    species heard)."""
    rows = []
    for number in range(listeners):
        heard = [species(item) for item in draw.sample(range(COMMON_SPECIES), per_listener)]
        if rare is not None and number == 0:
            heard.append(species(rare, rare=True))
        listener = f"mic{number + 1:02d}"
        moment = datetime.fromtimestamp(hour + 60 * number % 3600, timezone.utc)
        rows += [
            {
                "time": moment,
                "station_id": station,
                "listener_id": listener,
                "recording_id": f"{station}-{hour}",
                "scientific_name": scientific,
                "common_name": common,
                "confidence": CONFIDENCE,
            }
            for scientific, common in heard
        ]
    return pa.Table.from_pylist(rows)


class SimulatedStation:
    """A station folder with its relay, registered on the central server as a real station's is."""

    def __init__(self, root: Path, station: str, api_url: str, pool: str, checks: tuple[float, ...] | None):
        from birdflow.flows.relay import Relay

        self.settings = Settings.model_validate(
            {
                "data_dir": root / station,
                "station_id": station,
                "central_api_url": api_url,
                "work_pool": pool,
                "hourly_settle_s": 0,
            }
        )
        self.relay = Relay(self.settings)
        self.relay.confirm_checks_s = checks or self.relay.confirm_checks_s
        self.deployment: UUID = self.relay.register()

    def hear(self, table: pa.Table, hour: int, listeners: int) -> int:
        """The hour's detections and recordings; its rare sightings queued for the central server as a run
        queues them. Returns the rare sightings."""
        from birdflow.flows.announce import rare_event_fields

        resources = self.relay.resources
        tally = resources.species.tally(table)
        for sighting in tally.rare:
            fields = rare_event_fields(sighting, f"{sighting.station_id}/{sighting.recording_id}.flac", None)
            self.relay.link.rare(fields, once_for=f"{sighting.recording_id}:{sighting.scientific_name}")
        stamp = datetime.fromtimestamp(hour, timezone.utc)
        for number in range(listeners):
            resources.ledger.record(f"mic{number + 1:02d}_{stamp:%Y%m%dT%H%M%S}Z_{number:08x}", "simulated")
        return len(tally.rare)

    def relay_hour(self, client, now: float) -> set[str]:
        """What the relay does in its loop: events sent, sightings matched, closed hours summarised. Returns the
        ids of the confirmed events it sent (another station may send the same one: the server keeps one)."""
        from birdflow.flows.run_resources import use_run_resources

        use_run_resources(self.settings)  # the station-hour run reads this station's folder
        self.relay.send_events(client)
        confirmed = {event["id"] for event in self.relay.confirm_due(client)}
        self.relay.summarize(client, self.deployment, now=now)
        return confirmed


def simulate(sim: SimulatedStations, central: CentralPrefect, root: Path, say: Callable[[str], None]) -> dict:
    """The simulated stations' hours at compressed time; what the central side spent on them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from birdflow.flows.engine import engine_context

    draw = random.Random(sim.seed)
    first_hour = hour_of(time.time()) - (sim.hours + 2) * 3600
    with temporary_settings({PREFECT_API_URL: central.api_url(0)}):
        say(f"simulated stations: {sim.count}, each registering its station-hour deployment")
        stations = []
        for number in range(sim.count):
            station = f"sim{number + 1:03d}"
            prefect_post(central.api_url(0), "work_pools/", {"name": f"birdflow-{station}", "type": "process"})
            simulated = SimulatedStation(root, station, central.api_url(0), f"birdflow-{station}", sim.confirm_checks_s)
            # the station's common species heard three days ago: not rare in the simulated hours
            simulated.relay.resources.species.tally(
                hour_of_station(station, first_hour - 3 * 86400, 1, COMMON_SPECIES, None, draw)
            )
            stations.append(simulated)
        cpu0, history0 = central.cpu(), central.history()
        rare, confirmed, behind = 0, set(), 0.0
        with engine_context() as client:
            for number in range(sim.hours):
                hour = first_hour + number * 3600
                say(f"simulated hour {number + 1} of {sim.hours}: {datetime.fromtimestamp(hour, timezone.utc):%H}:00")
                tick = time.monotonic()
                for simulated in stations:
                    heard_rare = draw.randrange(sim.rare_species) if draw.random() < sim.rare_share else None
                    table = hour_of_station(
                        simulated.settings.station_id, hour, sim.listeners, sim.species_per_listener, heard_rare, draw
                    )
                    rare += simulated.hear(table, hour, sim.listeners)
                    confirmed |= simulated.relay_hour(client, now=hour + 3600)
                behind = max(behind, time.monotonic() - tick - sim.hour_s)
                time.sleep(max(0.0, tick + sim.hour_s - time.monotonic()))
            # the last hours' sightings are matched too, at each check they are due for
            while due := [item[1] for simulated in stations for item in simulated.relay.to_confirm]:
                time.sleep(max(0.0, min(due) - time.monotonic()))
                for simulated in stations:
                    confirmed |= simulated.relay_hour(client, now=first_hour + sim.hours * 3600)
        time.sleep(
            stations[0].relay.confirm_checks_s[0]
        )  # Prefect's event persister and task-run recorder write in batches
        cpu, history = central.cpu(), central.history()
    station_hours = sim.count * sim.hours
    spent = {role: cpu[role] - cpu0[role] for role in cpu}
    grown = history["database_bytes"] - history0["database_bytes"]
    return {
        "stations": sim.count,
        "hours": sim.hours,
        "station_hours": station_hours,
        "recordings_represented": station_hours * sim.recordings_per_station_hour,
        "rare_events": rare,
        "confirmed_events": len(confirmed),
        "seconds_behind_compressed_time": behind,
        "central_cpu_s_per_station_hour": sum(spent.values()) / station_hours,
        "central_cpu_s_per_station_hour_by_role": {role: value / station_hours for role, value in spent.items()},
        "database_bytes_per_station_hour": grown / station_hours,
        "rows_per_station_hour": {
            table: (history[table] - history0[table]) / station_hours for table in HISTORY_TABLES
        },
    }


def fleet_projection(
    simulated: dict, metrics: dict, listeners: int, recording_s: float, stations: int = 100, history_days: int = 14
) -> dict:
    """A fleet of `stations` x `listeners` from the cost of a station-hour (and of a station-day's metrics): central
    cores, disk for the run history, and what that is per recording."""
    per_hour = listeners * 3600 / recording_s
    cpu, size = simulated["central_cpu_s_per_station_hour"], simulated["database_bytes_per_station_hour"]
    metrics_cpu = metrics.get("central_cpu_s_per_station_day", 0.0) / 24
    return {
        "stations": stations,
        "listeners": listeners,
        "recordings_per_s": stations * per_hour / 3600,
        "central_cpu_s_per_recording": (cpu + metrics_cpu) / per_hour,
        "central_database_bytes_per_recording": size / per_hour,
        "central_cores": stations * (cpu + metrics_cpu) / 3600,
        "prometheus_cores": stations * metrics_cpu / 3600,
        "central_database_bytes": stations * 24 * history_days * size,
        "history_days": history_days,
        "central_cpu_s_per_station_day": 24 * (cpu + metrics_cpu),
        "database_bytes_per_station_day": 24 * size,
    }


def projection_rows(projection: dict, simulated: dict, metrics: dict) -> list[tuple[str, str]]:
    rows = [
        (
            "simulated stations",
            f"{simulated['stations']} x {simulated['hours']} hours at compressed time "
            f"({simulated['seconds_behind_compressed_time']:.0f} s behind at most): "
            f"{simulated['rare_events']} rare events, {simulated['confirmed_events']} confirmed",
        ),
        (
            "central per station-hour",
            f"{simulated['central_cpu_s_per_station_hour']:.3f} CPU-s ("
            + ", ".join(f"{r} {v:.3f}" for r, v in simulated["central_cpu_s_per_station_hour_by_role"].items())
            + f"), {simulated['database_bytes_per_station_hour'] / 1024:.1f} KB, rows "
            + ", ".join(f"{t} {n:.1f}" for t, n in simulated["rows_per_station_hour"].items() if n),
        ),
        (
            f"fleet of {projection['stations']} x {projection['listeners']} listeners",
            f"{projection['recordings_per_s']:.0f} recordings/s; central "
            f"{projection['central_cpu_s_per_recording'] * 1000:.3f} ms CPU and "
            f"{projection['central_database_bytes_per_recording']:.2f} B of database per recording; "
            f"{projection['central_cores']:.3f} central cores (Prometheus {projection['prometheus_cores']:.3f}); "
            f"{projection['history_days']} days of history {projection['central_database_bytes'] / 1e9:.2f} GB",
        ),
        (
            "per station and day",
            f"{projection['central_cpu_s_per_station_day']:.1f} central CPU-s, "
            f"{projection['database_bytes_per_station_day'] / 1e6:.2f} MB of central database",
        ),
    ]
    if "samples_per_s" in metrics:
        rows.append(
            (
                "stations' metrics",
                f"{metrics['stations']} stations x {metrics['series_per_station']} series every "
                f"{metrics['scrape_interval_s']} s: {metrics['samples_per_s']:.0f} samples/s remote-written, "
                f"{metrics['central_cpu_s_per_station_day']:.1f} CPU-s of the central Prometheus per station-day",
            )
        )
    return rows


class StationsMetrics:
    """Serves a real station's /metrics text under each simulated station's name, at /metrics/<station>."""

    def __init__(self, text: str, station: str):
        self.text, self.station = text, station
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                body = re.sub(f'station="{re.escape(outer.station)}"', f'station="{name}"', outer.text).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


def remote_write(sim: SimulatedStations, metrics_text: str, station: str, root: Path, say) -> dict:
    """`sim.count` stations' metrics remote-written to a central Prometheus for `sim.metrics_s` real seconds; its
    CPU and the samples it took."""
    binary = shutil.which("prometheus")
    if not binary:
        return {"skipped": "no prometheus binary (Debian: apt install prometheus)"}
    root.mkdir(parents=True, exist_ok=True)
    served = StationsMetrics(metrics_text, station)
    central_port, agent_port = free_port(), free_port()
    (root / "central.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1h"}}))
    names = [f"sim{number + 1:03d}" for number in range(sim.count)]
    agent = {
        "global": {"scrape_interval": f"{sim.scrape_interval_s}s"},
        "scrape_configs": [
            {
                "job_name": f"birdflow-{name}",  # one scrape config per station, each its own job
                "metrics_path": f"/metrics/{name}",
                "static_configs": [{"targets": [served.address], "labels": {"station": name}}],
            }
            for name in names
        ],
        "remote_write": [{"url": f"http://{LOOPBACK}:{central_port}/api/v1/write"}],
    }
    (root / "agent.yml").write_text(yaml.safe_dump(agent))
    logs = [open(root / "central.log", "wb"), open(root / "agent.log", "wb")]
    central = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'central.yml'}",
            f"--storage.tsdb.path={root / 'central'}",
            f"--web.listen-address={LOOPBACK}:{central_port}",
            "--web.enable-remote-write-receiver",
        ],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    agent_process = subprocess.Popen(
        [
            binary,
            "--enable-feature=agent",
            f"--config.file={root / 'agent.yml'}",
            f"--storage.agent.path={root / 'agent'}",
            f"--web.listen-address={LOOPBACK}:{agent_port}",
        ],
        stdout=logs[1],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def appended() -> float:
        text = httpx.get(f"http://{LOOPBACK}:{central_port}/metrics", timeout=5).text
        found = re.findall(r"^prometheus_tsdb_head_samples_appended_total(?:\{[^}]*\})? (\S+)$", text, re.M)
        return sum(float(value) for value in found)  # float and histogram samples

    try:
        wait_until(lambda: appended() > 0, 120, "the stations' metrics in the central Prometheus")
        say(f"metrics: {sim.count} stations remote-writing to a central Prometheus for {sim.metrics_s:.0f} s")
        cpu0, samples0, wall0 = cpu_seconds(process_tree(central.pid)), appended(), time.monotonic()
        time.sleep(sim.metrics_s)
        cpu, samples, wall = cpu_seconds(process_tree(central.pid)), appended(), time.monotonic() - wall0
    finally:
        for process in (agent_process, central):
            stop_process(process, grace_s=10)
        for log in logs:
            log.close()
        served.close()
    series = len([line for line in metrics_text.splitlines() if line and not line.startswith("#")])
    return {
        "stations": sim.count,
        "series_per_station": series,
        "scrape_interval_s": sim.scrape_interval_s,
        "seconds": wall,
        "samples_per_s": (samples - samples0) / wall,
        "central_cpu_s_per_station_day": (cpu - cpu0) / wall * 86400 / sim.count,
    }
