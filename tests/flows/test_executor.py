"""`birdflow execute` on its own: it talks to the Prefect API its settings name, and when it cannot work it
exits with the reason (its supervisor restarts it) instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from prefect.client.orchestration import get_client

from birdflow.core.recordings import remove_recording
from birdflow_tools.testbed import free_port


def run_execute(tmp_path, **settings) -> subprocess.CompletedProcess:
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), **settings}))
    # the Prefect API comes from the settings file alone, and no temporary server may stand in for it
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    return subprocess.run(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "execute"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_executor_that_cannot_load_its_model_exits_with_the_reason(prefect_server, tmp_path):
    # asked of a new interpreter: this one may hold the test suite's tflite_runtime alias (birdflow_tools.reference)
    if subprocess.run([sys.executable, "-c", "import tflite_runtime"], capture_output=True).returncode == 0:
        pytest.skip("tflite-runtime is installed here, so it cannot stand for a missing backend")
    executor = run_execute(
        tmp_path, station_id="no-model", prefect_api_url=prefect_server.api_url, birdnet_backend="tflite-runtime"
    )
    assert executor.returncode == 1, executor.stderr[-3000:]
    assert "BirdNET backend 'tflite-runtime' is not installed" in executor.stderr
    assert "executor stopped: a flow-run thread could not start" in executor.stderr
    assert "executor ready" not in executor.stderr
    with get_client(sync_client=True) as client:  # it registered its deployment on the configured server
        assert client.read_deployment_by_name("process-recording/no-model").name == "no-model"


def test_executor_without_a_reachable_prefect_api_says_so(tmp_path):
    api_url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    executor = run_execute(tmp_path, station_id="no-api", prefect_api_url=api_url)
    assert executor.returncode == 1
    assert f"executor stopped: cannot reach the Prefect API at {api_url}" in executor.stderr
    assert "Traceback" not in executor.stderr


def test_runs_left_running_after_their_recording_was_processed_are_completed(prefect_server, tmp_path, monkeypatch):
    """The Prefect server away just as a run ended: the recording was processed and its file removed, but the
    server still shows the run Running, and no scan takes it over. The executor's check sets it Completed; runs
    whose recording is not processed, or still in the folder, or being run here, it leaves alone."""
    from datetime import timedelta

    from birdflow.deployments.registration import register_deployments
    from birdflow.flows import run_resources
    from birdflow.flows.engine import create_running
    from birdflow.flows.executor import Executor
    from birdflow.settings import Settings
    from tests.flows.test_failures import published

    monkeypatch.setattr(run_resources, "_current", None)  # this test's resources go with it
    settings = Settings(station_id=f"left-{time.monotonic_ns()}", data_dir=tmp_path / "data")
    executor = Executor(settings, register_deployments(settings))
    analysis = executor.resources.params.analysis_id

    def running(info) -> str:
        with get_client(sync_client=True) as client:
            parameters = {"recording": info.model_dump(mode="json")}
            flow_run, _ = create_running(
                client, executor.deployment_id, parameters, info.run_name, [], info.recording_id
            )
            return str(flow_run.id)

    infos = [published(settings, listener_id=f"mic{number}") for number in range(4)]
    runs = [running(info) for info in infos]
    for info in infos[:3]:
        executor.resources.ledger.record(info.recording_id, analysis)
    for info in (infos[0], infos[2]):
        remove_recording(settings.recordings_dir / info.file_name)
    executor._in_flight.add(infos[2].recording_id)  # processed and gone, but its run is still being ended here
    with get_client(sync_client=True) as client:
        assert executor.complete_runs_left_running(client) == 0  # too young: a run may take minutes
        assert executor.complete_runs_left_running(client, older_than=timedelta(0)) == 1
        states = [client.read_flow_run(run).state for run in runs]
    assert [state.type.value for state in states] == ["COMPLETED", "RUNNING", "RUNNING", "RUNNING"]
    assert "could not say so then" in states[0].message
