"""`birdflow up` on embedded defaults: it starts its own Prefect server (on SQLite, or on a Postgres it starts
itself), processes a recording, and Ctrl-C stops all."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import yaml

from birdflow.core.flac import flac_identity
from birdflow.app.supervisor import postgres_program
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until

pytestmark = pytest.mark.e2e


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


@pytest.fixture
def data_root():
    """A folder the `postgres` user can reach too (Postgres runs as that user when the tests run as root)."""
    root = Path(tempfile.mkdtemp(prefix="birdflow-up-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_up_with_embedded_prefect_processes_an_upload_and_stops_on_ctrl_c(database, tmp_path, data_root, sample_48k):
    if database == "postgres":
        try:
            postgres_program("postgres")
        except RuntimeError as exc:
            pytest.skip(str(exc))
    ingest_port, prefect_port = free_port(), free_port()
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({
        "data_dir": str(data_root / "data"), "ingest_host": LOOPBACK, "ingest_port": ingest_port,
        "prefect_port": prefect_port, "poll_interval_s": 0.5,
        "prefect_database": database, "postgres_port": free_port(),
        "prefect_api_auth_string": "birdflow:up-test-secret",  # Prefect's own auth, which every process must send
    }))
    log = open(tmp_path / "up.log", "wb")
    # without the session's PREFECT_* variables, which would point `up` at the fixture's server
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "up"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: httpx.get(f"http://{LOOPBACK}:{ingest_port}/healthz").status_code == 200, 120, "ingest API")
        assert httpx.get(f"http://{LOOPBACK}:{prefect_port}/api/health").status_code == 200
        secrets_query = {"include_secrets": True}
        api = f"http://{LOOPBACK}:{prefect_port}/api"
        assert httpx.post(f"{api}/block_documents/filter", json=secrets_query).status_code == 401
        assert httpx.post(f"{api}/block_documents/filter", json=secrets_query, auth=("birdflow", "up-test-secret")).status_code == 200
        response = httpx.post(
            f"http://{LOOPBACK}:{ingest_port}/recordings_upload",
            files={"file": ("mic-1_20250601T053000Z.wav", sample_48k.read_bytes())},
        )
        recording_id = response.json()["recording_id"]
        detections = data_root / "data" / "detections"
        wait_until(lambda: list(detections.rglob(f"{recording_id}__*.parquet")), 120, "detections stored")
        # the archive task runs right after the detections are written: a FLAC copy, sample for sample
        wait_until(lambda: list((data_root / "data" / "archive").rglob(f"{recording_id}.flac")), 60, "audio archived")
        [archived] = (data_root / "data" / "archive").rglob(f"{recording_id}.flac")
        assert flac_identity(archived) == hashlib.sha256(sample_48k.read_bytes()).hexdigest()
        assert np.array_equal(soundfile.read(archived, dtype="int16")[0], soundfile.read(sample_48k, dtype="int16")[0])
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert not port_open(prefect_port) and not port_open(ingest_port)
