"""`birdflow bench --quick`: one real run of every phase, its JSON keys, and that it cleans up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from birdflow.flows.process_recording import RECORDING_TASKS
from birdflow.runtime.folder_watch import FolderWatch
from birdflow.settings.sections import default_interpreters
from birdflow_tools.bench import drain_at_recording_length, full_duty_listeners, percentile
from birdflow_tools.stack import pin_threads

pytestmark = pytest.mark.e2e

KEYS = {
    "raw_chunks_per_s_per_core",
    "birdnetlib_chunks_per_s",
    "inference_speedup_vs_birdnetlib",
    "drain_audio_s_per_s",
    "aggregator_cpu_s_per_10s_recording",
    "server_cpu_s_per_recording",
    "latency_p50_s",
    "latency_p95_s",
    "flow_run_overhead_s",
    "stream_listeners",
    "ingest_cpu_share_of_one_core",
    "peak_rss_mb",
    "executor_peak_rss_mb",
    "drain_cpu_busy_share",
}
STORAGE_KEYS = {"prefect_db_bytes", "birdflow_state_bytes", "detections_bytes", "files", "archive_bytes"}


def test_quick_bench_measures_every_phase_and_leaves_nothing_behind(tmp_path, sample_48k, sample_44k1):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["TMPDIR"] = str(scratch)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "bench",
            "--quick",
            "--json",
            "--no-tflite",
            "--file",
            str(sample_48k),
            "--other-rate-file",
            str(sample_44k1),
            "--recordings",
            "8",
            "--listeners",
            "10",
            "--stream-seconds",
            "10",
            "--fleet",
            "--workers",
            "3",
            # a short one: the hour-long test (tests/flows/test_long_recordings.py) holds the memory bound
            "--long-recording-s",
            "36",
            "--mqtt",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert KEYS <= set(report)
    assert all(isinstance(report[key], (int, float)) and math.isfinite(report[key]) for key in KEYS)
    # both runtimes measured, the station on the one its start-up check found faster
    assert {"onnxruntime", "ai-edge-litert"} <= set(report["raw_model"]) and report["backend"] in report["raw_model"]
    assert report["prefect_database"] == "sqlite"
    assert report["executor_workers"] == 3 and report["interpreters"] == default_interpreters(os.cpu_count() or 1)
    assert 0 <= report["interpreter_mb"] < report["model_with_one_interpreter_mb"]  # the weights held once
    listeners = report["listeners"]
    assert listeners["recording_s"] == 20 and listeners["drain_audio_s_per_s"] > report["drain_audio_s_per_s"]
    for place in ("this_machine", "four_cores"):
        assert 0 < listeners[place]["at_80_percent"] < listeners[place]["full_duty"]
    assert report["stream"]["analysis_keeps_up"] is None  # 10 s of streaming cannot tell
    assert report["detections_match_birdnetlib"] is True
    assert report["drain"]["recordings"] == 8 and report["drain"]["completed_runs"] >= 8
    # a recording's run is created Running and ends with one state change: no claim, read back or update of it
    # (before: 2 state changes, a read and an update per recording; a maintenance run may add a few calls here)
    calls = report["drain"]["api_calls_per_recording"]
    # one create per recording; the maintenance run's, or a create sent again after a 503, may add one in 8
    assert 1 <= calls["POST /api/deployments/<id>/create_flow_run"] < 1.5
    assert 1 <= calls["POST /api/flow_runs/<id>/set_state"] < 1.5
    assert calls.get("GET /api/flow_runs/<id>", 0) < 0.5 and calls.get("PATCH /api/flow_runs/<id>", 0) < 0.5
    rows = report["drain"]["prefect_rows_per_recording"]
    assert rows["flow_run"] == pytest.approx(1, abs=0.25) and rows["flow_run_state"] < 2.5
    assert rows["task_run"] == pytest.approx(len(RECORDING_TASKS), abs=0.5)
    storage = report["storage_per_recording"]
    assert set(storage) == STORAGE_KEYS and all(value > 0 for value in storage.values())
    assert storage["archive_bytes"] < 0.6 * sample_48k.stat().st_size  # archived as FLAC
    assert report["drain_audio_s_per_s"] > 0 and report["raw_chunks_per_s_per_core"] > 0
    assert 0 < report["drain_cpu_busy_share"] <= 1.05  # of all cores, over the drain's wall time
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"]
    latency = report["latency"]
    assert 0 < latency["run_start_after_close_s"] < report["latency_p95_s"]
    assert 0 < latency["task_run_time_s"] < latency["run_wall_s"]  # the tasks run inside the run
    assert 0 < report["flow_run_overhead_s"] < latency["run_wall_s"]
    assert report["stream_listeners"] == 10 and report["ingest_cpu_share_of_one_core"] > 0
    real_time_mb_per_s = 10 * 96_000 / 1e6  # ten listeners at 48 kHz, 16-bit, paced in real time
    assert 0.4 * real_time_mb_per_s < report["stream"]["mb_per_s"] <= 1.05 * real_time_mb_per_s
    memory = report["memory"]
    assert memory["other_rate_recordings"] == 6  # 44.1 kHz recordings analysed before the peaks were read
    assert 100 < report["executor_peak_rss_mb"] < report["peak_rss_mb"]  # the model is loaded in the executor
    assert report["peak_rss_mb"] == pytest.approx(
        memory["executor_peak_rss_mb"] + memory["ingest_peak_rss_mb"] + memory["supervisor_peak_rss_mb"]
    )
    assert memory["server_peak_rss_mb"] > 100
    long_recording = report["long_recording"]  # analysed a block at a time
    assert long_recording["seconds"] == 36 and 0 < long_recording["stored_after_s"] < 600
    assert 100 < long_recording["executor_rss_before_mb"] <= long_recording["executor_rss_highest_mb"]
    # the fleet layout: the aggregator alone on one core, the server on the other
    assert report["fleet"]["recordings"] == 8 and report["fleet"]["completed_runs"] >= 8
    assert report["fleet_drain_ratio_to_raw_limit_per_core"] > 0 and report["fleet_server_cpu_s_per_recording"] > 0
    # every detection published, with its species' state and Home Assistant's configs: about 5 per recording
    # a detection or more, its species' and the station's latest state; each discovery config once, not per recording
    assert report["mqtt"]["waiting"] == 0 and 2 <= report["mqtt"]["messages_per_recording"] <= 6
    assert report["mqtt"]["publisher_cpu_ms_per_recording"] > 0  # its threads found by name
    assert list(scratch.iterdir()) == []  # the stack's folder is removed


def test_pinned_threads_run_on_the_given_core():
    worker = threading.Thread(target=time.sleep, args=(2,))
    worker.start()
    before = os.sched_getaffinity(0)
    try:
        pin_threads([os.getpid()], {0})
        assert os.sched_getaffinity(worker.native_id) == {0} and os.sched_getaffinity(0) == {0}
    finally:
        pin_threads([os.getpid()], before)
        worker.join()


def test_percentile_and_listener_estimate():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 100.0], 0.95) == 100.0
    # 60 audio-s/s of analysis on 2 cores, ingest free: 60 listeners; ingest at 1 % of a core each: fewer
    assert full_duty_listeners(60.0, 0.0, 2) == 60
    assert full_duty_listeners(60.0, 0.01, 2) == int(60 / 1.3)
    # 10 s recordings at 0.2 CPU-s each, half of it per audio second: 20 s ones cost 0.3, 1.33x the audio per CPU-s
    drain = {"recording_s": 10.0, "audio_s_per_s": 60.0, "aggregator_cpu_s_per_recording": 0.15}
    drain["server_cpu_s_per_recording"] = 0.05
    assert drain_at_recording_length(drain, 0.01, 20.0) == pytest.approx(60.0 * 0.02 / 0.015)
    assert drain_at_recording_length(drain, 0.01, 10.0) == pytest.approx(60.0)


def test_folder_watch_wakes_on_a_file_moved_in(tmp_path):
    folder, outside = tmp_path / "recordings", tmp_path / "partial.wav"
    folder.mkdir()
    watch = FolderWatch(folder)
    try:
        assert watch.wait(0.05) is False
        outside.write_bytes(b"RIFF")
        threading.Timer(0.2, lambda: outside.rename(folder / "a.wav")).start()
        assert watch.wait(5.0) is True
    finally:
        watch.close()
