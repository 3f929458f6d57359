"""The whole stack: `birdflow up` against a real Prefect server, SeaweedFS S3 and a line-protocol server.

Streams and uploads the field recording, waits for the flow runs and checks the detections, the archived
objects, the Influx rows and the runs' task states in the Prefect API; then reruns one run as the UI does.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest
import soundfile
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.states import Scheduled

from birdflow.core.flac import flac_identity
from birdflow.core.recordings import RecordingStore
from birdflow.flows.process_recording import RECORDING_TASKS
from birdflow_tools.testbed import LOOPBACK, LineProtocolServer, free_port, parse_line, wait_until

pytestmark = pytest.mark.e2e
STATION = "e2e"
TASKS = set(RECORDING_TASKS)


@pytest.fixture(scope="module")
def stack(prefect_server, seaweed, tmp_path_factory, request):
    from tests.conftest import SAMPLE_48K, require_sample

    sample = require_sample(SAMPLE_48K)
    bucket = "birdflow-e2e"
    seaweed.create_bucket(bucket)
    influx = LineProtocolServer(token="e2e-token").start()
    influx.fail_next = 1  # the first write gets a 503: its task must retry, not lose the rows
    root = tmp_path_factory.mktemp("stack")
    port = free_port()
    settings_file = root / "settings.yaml"
    settings = {
        "station_id": STATION,
        "data_dir": str(root / "data"),
        "ingest_host": LOOPBACK,
        "ingest_port": port,
        "prefect_api_url": prefect_server.api_url,
        "poll_interval_s": 0.5,
        "archive_backend": "s3",
        "s3_bucket": bucket,
        "s3_prefix": "archive",
        "s3_endpoint_url": seaweed.endpoint_url,
        "aws_access_key_id": seaweed.access_key,
        "influx_enabled": True,
        "influx_host": influx.url,
        "influx_database": "birds",
        "retry_delay_s": 0.2,
    }
    settings_file.write_text(yaml.safe_dump(settings))
    # A recording left behind by a crash before its run was created: `up` must give it a run.
    store = RecordingStore(root / "data" / "partial", root / "data" / "recordings", STATION)
    partial = store.new_upload_partial(".wav")
    partial.write_bytes(sample.read_bytes())
    seeded = store.publish(
        partial,
        listener_id="seeded",
        start_time=datetime(2025, 6, 1, 5, 0, tzinfo=timezone.utc),
        duration_s=10.0,
        sample_rate=48000,
        channels=1,
        gaps=0,
        source="stream",
    )
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key, "INFLUX_TOKEN": "e2e-token"}
    log = open(root / "up.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "ingest API of birdflow up")
    handle = {
        "url": url,
        "settings_file": settings_file,
        "root": root,
        "seaweed": seaweed,
        "bucket": bucket,
        "influx": influx,
        "sample": sample,
        "seeded": seeded,
        "env": env,
    }
    try:
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "killed"
        influx.stop()
        assert code == 0, (root / "up.log").read_text()[-3000:]


def station_runs():
    """The runs of the station's recordings (not those of its maintenance deployment)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-recording"])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[STATION])),
        )


def wait_for_completed_runs(count: int, timeout_s: float = 180):
    wait_until(
        lambda: sum(run.state and run.state.is_completed() for run in station_runs()) >= count,
        timeout_s,
        f"{count} completed flow runs",
    )
    return [run for run in station_runs() if run.state.is_completed()]


def detections(stack) -> list[dict]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "--settings",
            str(stack["settings_file"]),
            "detections",
            "--format",
            "json",
        ],
        env=stack["env"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_streamed_uploaded_and_recovered_recordings_become_completed_flow_runs(stack):
    listen = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "listen",
            "--file",
            str(stack["sample"]),
            "--listeners",
            "2",
            "--recordings",
            "1",
            "--pace",
            "0",
            "--interval",
            "0",
            "--url",
            stack["url"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listen.returncode == 0, listen.stdout + listen.stderr
    upload = httpx.post(
        f"{stack['url']}/recordings_upload",
        files={"file": ("field-1_20250601T053000Z.wav", stack["sample"].read_bytes())},
    )
    assert upload.status_code == 200, upload.text

    runs = wait_for_completed_runs(4)
    by_listener = {run.parameters["recording"]["listener_id"]: run for run in runs}
    assert set(by_listener) == {"listener01", "listener02", "field-1", "seeded"}
    assert by_listener["field-1"].name == "field-1-20250601T053000Z"
    assert by_listener["seeded"].parameters["recording"]["recording_id"] == stack["seeded"].recording_id

    # every run has its tasks, all completed (cached ones count as completed)
    def task_runs_of(client, run) -> list:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))

    def task_names(client, run) -> set[str]:
        return {task.name.rsplit("-", 1)[0] for task in task_runs_of(client, run)}

    def tasks_completed(client, run) -> bool:
        task_runs = task_runs_of(client, run)
        names = {task.name.rsplit("-", 1)[0] for task in task_runs}
        # the run that heard the goldfinch first asks for its review, and cuts that review's clip
        return TASKS <= names <= TASKS | {"review clips"} and all(
            task.state and task.state.is_completed() for task in task_runs
        )

    with get_client(sync_client=True) as client:
        for run in runs:  # task-run states arrive as events, shortly after the flow run's state
            wait_until(lambda run=run: tasks_completed(client, run), 30, f"the tasks of {run.name} completed")
        reviews = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["review-detection"])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[STATION])),
        )
        reviewed = {review.parameters["detection"]["recording_id"] for review in reviews}
        clipped = {
            run.parameters["recording"]["recording_id"] for run in runs if "review clips" in task_names(client, run)
        }
        assert reviewed and clipped == reviewed
        # the write that met the 503 ran twice, and succeeded the second time
        write_attempts = sorted(
            task.run_count
            for run in runs
            for task in task_runs_of(client, run)
            if task.name.startswith("write detections")
        )
        assert write_attempts == [1, 1, 1, 2], write_attempts
    assert stack["influx"].fail_next == 0

    # detections stored, one American Goldfinch per recording at 3 s
    rows = detections(stack)
    goldfinch = [row for row in rows if row["scientific_name"] == "Spinus tristis"]
    assert sorted(row["listener_id"] for row in goldfinch) == sorted(by_listener)  # one each: the retry added none
    for row in goldfinch:
        assert row["start_s"] == 3.0 and 0.3 < row["confidence"] < 0.45

    # raw audio archived in S3 under station/listener/YYYY/MM/DD as FLAC that decodes to the same samples
    s3 = stack["seaweed"].client()
    for run in runs:
        recording = run.parameters["recording"]
        day = datetime.fromisoformat(recording["start_time"])
        key = f"archive/{STATION}/{recording['listener_id']}/{day:%Y/%m/%d}/{recording['recording_id']}.flac"
        assert flac_identity(s3.get_object(Bucket=stack["bucket"], Key=key)["Body"].read()) == recording["content_hash"]
    upload_id = by_listener["field-1"].parameters["recording"]["recording_id"]
    uploaded = s3.get_object(Bucket=stack["bucket"], Key=f"archive/{STATION}/field-1/2025/06/01/{upload_id}.flac")
    decoded, _ = soundfile.read(io.BytesIO(uploaded["Body"].read()), dtype="int16")
    assert np.array_equal(decoded, soundfile.read(stack["sample"], dtype="int16")[0])

    # the same rows reached InfluxDB as line protocol
    influx_rows = [parse_line(line) for line in stack["influx"].lines]
    assert {tags["listener_id"] for _, tags, _, _ in influx_rows if tags["scientific_name"] == "Spinus tristis"} == set(
        by_listener
    )

    # local copies are gone once analyzed and archived
    recordings_dir = stack["root"] / "data" / "recordings"
    wait_until(lambda: not any(recordings_dir.iterdir()), 10, "local recordings cleaned up")

    metrics = httpx.get(f"{stack['url']}/metrics").text
    assert f'birdflow_flow_runs_finished_total{{state="completed",station="{STATION}"}} 4.0' in metrics
    assert f'birdflow_recordings_received_total{{source="stream",station="{STATION}"}} 2.0' in metrics
    assert f'birdflow_sink_write_failures_total{{sink="influxdb3",station="{STATION}"}} 1.0' in metrics


def cached_analysis(client, flow_run_id) -> bool:
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return any(task.name.startswith("analyze") and task.state and task.state.name == "Cached" for task in task_runs)


def artifact_types(client, run_id) -> list[str]:
    return [
        artifact.type
        for artifact in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    ]


def test_rerun_from_the_ui_reuses_the_cache_and_duplicates_nothing(stack):
    runs = wait_for_completed_runs(4)
    before = detections(stack)
    target = next(run for run in runs if run.parameters["recording"]["listener_id"] == "listener01")
    with get_client(sync_client=True) as client:
        assert artifact_types(client, target.id) == ["table"]
        client.set_flow_run_state(target.id, Scheduled(), force=True)  # what the UI's rerun does
        wait_until(
            lambda: (
                client.read_flow_run(target.id).run_count >= 2 and client.read_flow_run(target.id).state.is_completed()
            ),
            120,
            "rerun completed",
        )
        # task-run states reach the server as events, a moment after the flow run's own state
        wait_until(lambda: cached_analysis(client, target.id), 60, "the rerun's analyze task recorded as Cached")
        assert artifact_types(client, target.id) == ["table"]  # the same table, shown once
    assert detections(stack) == before


def test_audio_that_cannot_be_decoded_is_given_up_at_once_and_kept(stack):
    from prefect.client.schemas.filters import FlowRunFilterName

    data = stack["root"] / "data"
    store = RecordingStore(data / "partial", data / "recordings", STATION)
    partial = store.new_upload_partial(".wav")
    partial.write_bytes(b"RIFF" + bytes(4) + b"WAVE" + b"\x13" * 4000)  # a header soundfile rejects
    broken = store.publish(
        partial,
        listener_id="broken",
        start_time=datetime(2025, 6, 2, tzinfo=timezone.utc),
        duration_s=5.0,
        sample_rate=48000,
        channels=1,
        gaps=0,
        source="upload",
    )
    (data / "recordings" / "stray_20250602T000000Z.wav").write_bytes(b"not audio at all")  # dropped in by hand
    failed = data / "failed"
    wait_until(
        lambda: (failed / broken.file_name).exists() and (failed / "stray_20250602T000000Z.wav").exists(),
        60,
        "set aside",
    )
    assert (failed / f"{broken.recording_id}.json").exists()
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[broken.run_name])))
        assert (run.state.name, run.run_count) == ("Unprocessable", 1)  # not retried, not re-driven
        assert "cannot decode audio" in run.state.message
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        assert [artifact.key for artifact in artifacts] == ["given-up-recordings"]
    metrics = httpx.get(f"{stack['url']}/metrics").text
    assert f'birdflow_recordings_given_up_total{{reason="unprocessable",station="{STATION}"}} 1.0' in metrics
    assert f'birdflow_recordings_given_up_total{{reason="unreadable",station="{STATION}"}} 1.0' in metrics
