"""The station a fault drill runs on: `birdflow up` in a temporary folder with an S3 archive (SeaweedFS)
behind a proxy that can be taken down and an InfluxDB 3 stand-in that can refuse writes, plus what the
drills count with (what went in, what came out). Over 300 lines because DrillStation is one thing: a
station and every fault it can be made to suffer, each a few lines beside the others."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from birdflow.app.simulated_listeners import run_listeners
from birdflow.core.disk import MB
from birdflow.core.recordings import AUDIO_EXTENSIONS, parse_stream_partial
from birdflow.core.sinks import read_detections
from birdflow.core.wav import parse_header
from birdflow.runtime.folder_watch import FolderWatch
from birdflow_tools.bench import distinct_uploads
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import FaultProxy, LineProtocolServer, SeaweedS3, parse_line

BUCKET = "drill"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


INFLUX_TOKEN = "drill-token"


@dataclass
class DrillOptions:
    sample: Path
    uploads: int = 8  # recordings uploaded in each upload drill
    listeners: int = 3  # listeners streaming in each stream drill
    outage_s: float = 180.0  # how long the archive or the sink stays down
    settle_timeout_s: float = 600.0  # how long the station may take to process everything afterwards
    redrive_delays_s: tuple[float, ...] = (10.0, 20.0, 30.0, 60.0)
    task_retries: int = 1
    retry_delay_s: float = 1.0
    # the year drill: a card of 1/100 of 32 GB, days of recordings compressed into minutes
    card_mb: int = 327
    year_days: int = 30
    recordings_per_day: int = 100  # 1.6 MB of history a day: the budget, not the 14-day retention, binds
    history_budget_mb: float = 0.0  # 0: the card's share (5 %, at least 10 MB), as on a station left at its defaults

    @classmethod
    def quick(cls, **overrides) -> DrillOptions:
        """Outages and re-drives of seconds instead of minutes (the test suite's drills)."""
        values = dict(
            uploads=6,
            outage_s=12.0,
            settle_timeout_s=150.0,
            redrive_delays_s=(2.0, 4.0, 8.0),
            retry_delay_s=0.5,
            # ~0.5 MB of history a day against a 2.5 MB budget: full on day 2 of 6, then flat
            card_mb=200,
            year_days=6,
            recordings_per_day=30,
            history_budget_mb=2.5,
        )
        return cls(**{**values, **overrides})


@dataclass
class DrillResult:
    name: str
    accepted: int = 0  # "in"
    processed: int = 0  # "out"
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    executed_twice: int = 0
    refused: int = 0
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what the drill checked beyond the counts

    def row(self) -> dict:
        return {
            "drill": self.name,
            "in": self.accepted,
            "out": self.processed,
            "lost": len(self.lost),
            "duplicated": self.duplicated,
            "twice at once": self.executed_twice,
            "refused": self.refused,
            "notes": "; ".join(self.notes),
        }


class Arrivals:
    """Every recording published into the recordings folder, seen as it lands (inotify), whoever removes
    it afterwards: the executor once processed, or the ledger check as a re-sent duplicate."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        self._watch = FolderWatch(folder)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="drill-arrivals", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            for name in self._watch.landed(0.5):
                if name.lower().endswith(AUDIO_EXTENSIONS):
                    self.ids.add(Path(name).stem)

    def since(self, before: set[str]) -> set[str]:
        return set(self.ids) - before

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._watch.close()


class DrillStation:
    """The station the drills run on, and what they count with."""

    def __init__(
        self,
        root: Path,
        options: DrillOptions,
        say: Callable[[str], None],
        stack_root: Path | None = None,
        settings_more: dict | None = None,
    ):
        """`stack_root`: where the station keeps its data (a disk of its own), else under `root`;
        `settings_more`: more settings of the station."""
        self.root = root
        self.options = options
        self.say = say
        # a floor 3 GB below the free space at the start: out of reach until the disk drill fills the disk
        self.floor_mb = max(0, shutil.disk_usage(root).free // MB - 3072)
        self.influx = LineProtocolServer(token=INFLUX_TOKEN).start()
        self.s3: SeaweedS3 | None = None
        self.s3_proxy: FaultProxy | None = None
        settings = {
            "influx_enabled": True,
            "influx_host": self.influx.url,
            "influx_database": "drill",
            "task_retries": options.task_retries,
            "retry_delay_s": options.retry_delay_s,
            "redrive_delays_s": list(options.redrive_delays_s),
            "poll_interval_s": 0.5,
            "min_free_disk_mb": self.floor_mb,
        }
        # the retention drill ages the run history by 20 days; the server's vacuum looks every 5 s, not hourly
        env = {"INFLUX_TOKEN": INFLUX_TOKEN, "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "5"}
        if SeaweedS3.available():
            self.s3 = SeaweedS3(root / "seaweed").start(root / "seaweed.log")
            self.s3.create_bucket(BUCKET)
            self.s3_proxy = FaultProxy(self.s3.s3_port).up()
            settings.update(
                archive_backend="s3",
                s3_bucket=BUCKET,
                s3_prefix="archive",
                s3_endpoint_url=self.s3_proxy.url,
                aws_access_key_id=self.s3.access_key,
            )
            env["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_key
        self.stack = Stack(
            stack_root or root / "station", station_id="drill", settings={**settings, **(settings_more or {})}, env=env
        )
        self.places = self.stack.places
        self.arrivals = Arrivals(self.places.recordings_dir)
        self._next_upload = 0

    def start(self) -> None:
        self.say("starting the drill station")
        self.stack.start()

    def close(self) -> None:
        self.arrivals.close()
        self.stack.stop()
        self.influx.stop()
        if self.s3_proxy:
            self.s3_proxy.down()
        if self.s3:
            self.s3.stop()

    # --- feeding -----------------------------------------------------------------------------------

    def next_uploads(self, count: int) -> list[tuple[str, bytes]]:
        """Distinct recordings never sent before (each drill's are its own)."""
        uploads = distinct_uploads(self.options.sample, count, first=self._next_upload)
        self._next_upload += count
        return uploads

    def upload(self, uploads: list[tuple[str, bytes]], spacing_s: float = 0.0, deadline_s: float = 300.0) -> int:
        """POST each recording until it is accepted (as a listener would: a 5xx or a lost connection is
        tried again a second later); returns how many answers were 507."""
        refused = 0
        give_up_at = time.monotonic() + deadline_s
        with httpx.Client(timeout=60) as client:
            for name, body in uploads:
                while True:
                    try:
                        response = client.post(f"{self.stack.url}/recordings_upload", files={"file": (name, body)})
                        if response.status_code == 200:
                            break
                        refused += response.status_code == 507
                        if response.status_code < 500:
                            raise RuntimeError(f"upload refused: {response.status_code} {response.text[:200]}")
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > give_up_at:
                        raise RuntimeError(f"{name} was not accepted within {deadline_s:.0f} s")
                    time.sleep(1.0)
                time.sleep(spacing_s)
        return refused

    @contextmanager
    def streaming(self, prefix: str) -> Iterator[list]:
        """Listeners streaming in real time (their reports fill in) until the block ends."""
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        reports: list = []

        async def listen() -> None:
            reports.extend(
                await run_listeners(
                    self.stack.url,
                    self.options.sample,
                    listeners=self.options.listeners,
                    interval_s=0.0,
                    recordings=0,
                    prefix=prefix,
                    stop=stop,
                    distinct=True,
                )
            )

        thread = threading.Thread(target=loop.run_until_complete, args=(listen(),), daemon=True)
        thread.start()
        try:
            yield reports
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(30)
            # the connections are gone: the station closes and publishes what they sent
            deadline = time.monotonic() + 30
            while self.stream_partials(0.0) and time.monotonic() < deadline:
                time.sleep(0.2)

    # --- faults ------------------------------------------------------------------------------------

    def kill(self, role: str) -> int:
        """kill -9 one of up's children; returns its pid (up restarts it)."""
        pid = self.wait_for_child(role)
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_after_ready(self, role: str, previous_pid: int) -> int:
        """kill -9 the child that replaced `previous_pid` once it has run for a moment; returns its pid."""
        pid = self.wait_for_child(role, other_than=previous_pid)
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_for_child(self, role: str, other_than: int = 0, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.stack.child(role)
            if pid and pid != other_than:
                return pid
            time.sleep(0.2)
        raise RuntimeError(f"up did not restart its {role} within {timeout_s:.0f} s:\n{self.stack.log_tail()}")

    def wait_for_ingest(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.stack.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the ingest API did not come back")

    def stream_partials(self, min_duration_s: float = 3.0) -> list[tuple[str, float]]:
        """(listener, seconds of audio) of the stream partial files long enough to be kept."""
        found = []
        for path in self.places.partial_dir.glob("stream_*.wav"):
            stream = parse_stream_partial(path.name)
            try:  # it may be published (moved away) while this looks at it
                data = path.read_bytes()
                header = parse_header(data[:4096])
            except (ValueError, OSError):
                continue
            seconds = (len(data) - header.size) / header.format.byte_rate
            if stream and seconds >= min_duration_s:
                found.append((stream[0], seconds))
        return found

    def metric(self, name: str, labels: str) -> float:
        text = httpx.get(f"{self.stack.url}/metrics", timeout=10).text
        match = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def age(self, days: float) -> None:
        """Make everything the station has done `days` older: run ends, cached results, detection files."""
        seconds = days * 86400
        self.stack.age_runs(days)
        with closing(sqlite3.connect(self.places.results_file, timeout=60)) as database:
            with database:
                database.execute("UPDATE results SET written_at = written_at - ?", (int(seconds),))
        for path in self.places.detections_dir.rglob("*.parquet"):
            stamp = path.stat().st_mtime - seconds
            os.utime(path, (stamp, stamp))

    def start_maintenance(self) -> None:
        """A maintenance run now, as the UI's Quick run makes one; the station's executor runs it."""
        [deployment] = self.stack.api(
            "deployments/filter",
            {"flows": {"name": {"any_": ["maintenance"]}}, "deployments": {"name": {"any_": [self.stack.station_id]}}},
        )
        self.stack.api(f"deployments/{deployment['id']}/create_flow_run", {})

    def footprint(self, day: int, before: set[str]) -> dict:
        """What the station keeps that is not audio, and its disk, after `day` days."""
        from birdflow.app.prefect_server import state_bytes
        from birdflow.core.budget import sqlite_bytes_in_use

        database = self.places.prefect_database_file
        return {
            "day": day,
            "runs_made": len(self.arrivals.since(before)),
            "runs_kept": self.recording_runs(),
            "prefect_db_bytes": sqlite_bytes_in_use(database),
            "prefect_db_file_bytes": database.stat().st_size,
            "state_bytes": state_bytes(self.places),
            "free_bytes": shutil.disk_usage(database.parent).free,
        }

    def recording_runs(self) -> int:
        return int(self.stack.api("flow_runs/count", self.stack.recording_runs))

    # --- counting ----------------------------------------------------------------------------------

    def processed_ids(self) -> set[str]:
        """Recorded as processed (after its detections were written and its audio archived), and archived."""
        ledger = self.places.processed_record_file
        recorded = recorded_ids(ledger) if ledger.exists() else set()
        return recorded & self.archived_ids()

    def archived_ids(self) -> set[str]:
        if self.s3:
            client = self.s3.client()  # straight to SeaweedFS: the count must not depend on the proxy
            keys = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="archive/"):
                keys += [item["Key"] for item in page.get("Contents", [])]
            return {Path(key).stem for key in keys}
        return {path.stem for path in self.places.local_archive_dir.rglob("*") if path.is_file()}

    def settle(self, accepted: set[str], timeout_s: float) -> set[str]:
        """Wait until every accepted recording is processed and archived (or the time is up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = accepted & self.processed_ids()
            if done == accepted or time.monotonic() > deadline:
                return done
            time.sleep(1.0)

    def count(self, name: str, before: set[str], refused: int = 0) -> DrillResult:
        accepted = self.arrivals.since(before)
        processed = self.settle(accepted, self.options.settle_timeout_s)
        rows = read_detections(self.places.detections_dir)
        keys = Counter(
            zip(
                *(
                    rows.column(column).to_pylist()
                    for column in ("recording_id", "analysis_id", "start_s", "scientific_name")
                )
            )
        )
        with_rows = {key[0] for key in keys} & processed
        in_influx = {parse_line(line)[1].get("recording_id") for line in list(self.influx.lines)}
        missing_in_influx = with_rows - in_influx
        return DrillResult(
            name,
            accepted=len(accepted),
            processed=len(processed - missing_in_influx),
            lost=sorted((accepted - processed) | missing_in_influx),
            refused=refused,
            duplicated=sum(number - 1 for key, number in keys.items() if key[0] in accepted and number > 1),
            executed_twice=self.executed_twice_at_once(accepted),
            facts={"runs_run_again": self.runs_run_again(accepted)},
        )

    def recordings_runs(self, recording_ids: set[str]) -> list[dict]:
        runs = self.stack.api(
            "flow_runs/filter", {**self.stack.recording_runs, "sort": "EXPECTED_START_TIME_DESC", "limit": 200}
        )
        return [run for run in runs if run["parameters"].get("recording", {}).get("recording_id") in recording_ids]

    def executed_twice_at_once(self, recording_ids: set[str]) -> int:
        """How many of these recordings' runs were started again while an attempt was still running: in the
        run's state history, a second Running with no final state (Completed, Failed, Crashed, Cancelled)
        since the first."""
        doubled = 0
        for run in self.recordings_runs(recording_ids):
            history = self.stack.get(f"flow_run_states/?flow_run_id={run['id']}")
            running = False
            for state in sorted(history, key=lambda state: state["timestamp"]):
                if state["type"] == "RUNNING":
                    if running:
                        doubled += 1
                        break
                    running = True
                elif state["type"] in FINAL_STATES:
                    running = False
        return doubled

    def runs_run_again(self, recording_ids: set[str]) -> int:
        """How many of these recordings' runs ran more than once (re-driven or taken over)."""
        return sum(1 for run in self.recordings_runs(recording_ids) if run["run_count"] > 1)


def recorded_ids(ledger: Path) -> set[str]:
    """The processed record read only: the drill never repairs a damaged one itself (the station must); while it
    is damaged, nothing counts as processed yet."""
    try:
        with closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)) as database:
            return {row[0] for row in database.execute("SELECT recording_id FROM processed")}
    except sqlite3.DatabaseError:
        return set()
