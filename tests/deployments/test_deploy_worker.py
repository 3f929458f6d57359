"""prefect.yaml deployed with `prefect deploy --all`, run by the in-process `birdflow` worker type.

Two stations, two work pools: a backfill run for station a is executed by a's worker (processing an
"SD-card dump" as a child process-recording run and saving a summary artifact); b's run is never
picked up by a's worker. A second, dry run finds the recording already processed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.sorting import ArtifactSort

from birdflow_tools.testbed import LOOPBACK, prefect_post, wait_until
from tests.conftest import PROJECT, require_sample
from tests.review_story import SOUNDSCAPE, Shape, Subscriber, run_review_story
from tests.servers import PrefectServer

pytestmark = pytest.mark.e2e
PREFECT = [sys.executable, "-m", "prefect"]


def prefect_cli(env, *args) -> str:
    result = subprocess.run(PREFECT + list(args), env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def summary_row(client) -> list[int]:
    """found, skipped, refused, processed, handed to the station, failed, would process: from the newest
    backfill-summary artifact."""
    artifact = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["backfill-summary"])),
        sort=ArtifactSort.CREATED_DESC,
        limit=1,
    )[0]
    row = re.search(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", artifact.data, re.MULTILINE)
    assert row, artifact.data
    return [int(value) for value in row.groups()]


def test_deploy_all_and_the_station_worker_runs_only_its_pool(prefect_server, tmp_path, sample_48k):
    base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    base.update(prefect_server.env(), BIRDFLOW_HOME=str(PROJECT))
    for station in ("a", "b"):
        prefect_cli(base, "work-pool", "create", f"birdflow-{station}", "--type", "birdflow", "--overwrite")
        prefect_cli({**base, "STATION_ID": station}, "--no-prompt", "deploy", "--all")
    prefect_cli(base, "work-pool", "set-concurrency-limit", "birdflow-a", "2")

    sdcard = tmp_path / "sdcard" / "2025-06-01"
    sdcard.mkdir(parents=True)
    shutil.copy(sample_48k, sdcard / "mic1_20250601T053000Z.wav")
    data = tmp_path / "data-a"
    settings_file = tmp_path / "a.yaml"
    # a backfill reads only the folders the station allows (docs/security.md)
    settings_file.write_text(
        yaml.safe_dump({"station_id": "a", "data_dir": str(data), "backfill_roots": [str(sdcard.parent)]})
    )
    worker_env = {**base, "BIRDFLOW_SETTINGS": str(settings_file)}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "worker"],
        env=worker_env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("birdflow-a")
            assert pool.type == "birdflow" and pool.concurrency_limit == 2
            runs = {}
            for station in ("a", "b"):
                deployment = client.read_deployment_by_name(f"backfill/{station}-backfill")
                assert deployment.work_pool_name == f"birdflow-{station}"
                runs[station] = client.create_flow_run_from_deployment(
                    deployment.id, parameters={"source": str(sdcard.parent), "dry_run": False, "allow_unknown": True}
                )
            wait_until(lambda: client.read_flow_run(runs["a"].id).state.is_final(), 240, "station a's backfill run")
            assert client.read_flow_run(runs["a"].id).state.is_completed(), (tmp_path / "worker.log").read_text()[
                -3000:
            ]
            assert (
                f"worker of station a on pool birdflow-a, settings from {settings_file}"
                in (tmp_path / "worker.log").read_text()
            )
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[runs["a"].id]))
            )
            assert [child.name for child in children] == ["mic1-20250601T053000Z"]
            assert children[0].state.is_completed()
            assert summary_row(client) == [1, 0, 0, 1, 0, 0, 0]
            assert list((data / "detections").rglob("*.parquet"))
            assert (sdcard / "mic1_20250601T053000Z.wav").is_file()  # the source is never deleted
            assert client.read_flow_run(runs["b"].id).state.is_scheduled()  # not station a's work

            deployment = client.read_deployment_by_name("backfill/a-backfill")
            # without allow_unknown: mic1 is known now (a recording of it was processed), so it is skipped, not refused
            again = client.create_flow_run_from_deployment(
                deployment.id, parameters={"source": str(sdcard.parent), "dry_run": True}
            )
            wait_until(lambda: client.read_flow_run(again.id).state.is_final(), 120, "the dry run")
            assert summary_row(client) == [1, 1, 0, 0, 0, 0, 0]
            time.sleep(1)
            assert client.read_flow_run(runs["b"].id).state.is_scheduled()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "entrypoint",
    [
        "evil.py:flow",
        "/tmp/payload.py:anything",
        "flows/../payload.py:run",
        "os.system",
        "flows.engine.run_in_process",
        "birdflow.flows.engine.run_in_process",
        "birdflow.app.cli.main",
        "flows/process_recording.py:run_resources",
    ],
)
def test_the_worker_runs_birdflows_own_flows_and_nothing_else(entrypoint):
    from birdflow.flows.worker import NotOurFlow, flow_for

    with pytest.raises(NotOurFlow):
        flow_for(entrypoint)
    assert flow_for("flows/process_recording.py:process_recording").name == "process-recording"
    assert flow_for("flows.backfill.backfill") is flow_for("flows/backfill.py:backfill")  # as stations deployed it
    assert flow_for("birdflow.flows.backfill.backfill") is flow_for("flows/backfill.py:backfill")


def test_reviews_on_a_fleet_of_deployments_run_by_the_station_worker(tmp_path, seaweed, mosquitto):
    """docs/fleet.md's path: a plain Prefect server, `central-setup`, `prefect deploy --all`, `birdflow worker`, the
    backfill deployment run over a folder; the review runs it opens wait in the central UI (never Crashed), and the
    story runs there, its clips in the S3 archive."""
    require_sample(SOUNDSCAPE)
    central = PrefectServer(tmp_path / "central", plain=True).start(tmp_path / "central.log")
    station, sdcard = tmp_path / "station", tmp_path / "sdcard" / "2025-06-01"
    station.mkdir()
    sdcard.mkdir(parents=True)
    shutil.copy(SOUNDSCAPE, sdcard / "mic1_20250601T053000Z.mp3")
    seaweed.create_bucket("fleet-c")
    (station / "settings.yaml").write_text(
        yaml.safe_dump(
            {
                "station_id": "fleet-c",
                "backfill_roots": [str(sdcard.parent)],
                "archive_backend": "s3",
                "s3_bucket": "fleet-c",
                "s3_endpoint_url": seaweed.endpoint_url,
                "aws_access_key_id": seaweed.access_key,
                "mqtt_host": LOOPBACK,
                "mqtt_port": mosquitto.port,
            }
        )
    )
    (station / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={seaweed.secret_key}\n")
    base = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "BIRDFLOW_"))}
    env = {**base, "PREFECT_API_URL": central.api_url}

    def birdflow(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "birdflow.app.cli", *args],
            env=env,
            cwd=station,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    birdflow("central-setup", "--stations", "fleet-c")
    prefect_cli({**env, "STATION_ID": "fleet-c", "BIRDFLOW_HOME": str(PROJECT)}, "--no-prompt", "deploy", "--all")
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "worker"],
        env=env,
        cwd=station,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    subscriber = Subscriber(mosquitto, "fleet-c")
    try:
        deployment = httpx.get(f"{central.api_url}/deployments/name/backfill/fleet-c-backfill", timeout=30).json()
        parameters = {"source": str(sdcard.parent), "dry_run": False, "allow_unknown": True}
        backfill = prefect_post(
            central.api_url, f"deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
        )
        shape = Shape(
            station_id="fleet-c",
            ui_url=central.api_url.removesuffix("/api"),
            cli=birdflow,
            export_dir=(str(tmp_path / "exports"), tmp_path / "exports"),
            subscriber=subscriber,
            profile=tmp_path / "browser",
        )
        run_review_story(shape, lambda: log.read_text()[-3000:])
        assert (
            httpx.get(f"{central.api_url}/flow_runs/{backfill['id']}", timeout=30).json()["state_type"] == "COMPLETED"
        )
    finally:
        subscriber.close()
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        central.stop()
    # stopped with SIGTERM, the worker says so in a line, without tracebacks, and exits 0
    assert worker.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-5000:]
    assert "birdflow.worker: worker stopped" in log.read_text() and "messages wait" not in log.read_text()
