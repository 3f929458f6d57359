"""`birdflow execute` on its own: it talks to the Prefect API its settings name, and when it cannot work it
exits with the reason (its supervisor restarts it) instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client

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
