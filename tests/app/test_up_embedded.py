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

from birdflow.app.postgres import postgres_program
from birdflow.core.flac import flac_identity
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
    settings_file.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data_root / "data"),
                "ingest_host": LOOPBACK,
                "ingest_port": ingest_port,
                "prefect_port": prefect_port,
                "poll_interval_s": 0.5,
                "prefect_database": database,
                "postgres_port": free_port(),
                # Prefect's own auth, which every process must send
                "prefect_api_auth_string": "birdflow:up-test-secret",
            }
        )
    )
    log = open(tmp_path / "up.log", "wb")
    # without the session's PREFECT_* variables, which would point `up` at the fixture's server
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: httpx.get(f"http://{LOOPBACK}:{ingest_port}/healthz").status_code == 200, 120, "ingest API")
        assert httpx.get(f"http://{LOOPBACK}:{prefect_port}/api/health").status_code == 200
        secrets_query = {"include_secrets": True}
        api = f"http://{LOOPBACK}:{prefect_port}/api"
        assert httpx.post(f"{api}/block_documents/filter", json=secrets_query).status_code == 401
        assert (
            httpx.post(
                f"{api}/block_documents/filter", json=secrets_query, auth=("birdflow", "up-test-secret")
            ).status_code
            == 200
        )
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
        if database == "postgres":
            assert postgres_refuses_strangers_and_prefect_is_no_superuser(data_root / "data", settings_file)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    said = (tmp_path / "up.log").read_text()
    assert code == 0, said[-3000:]
    assert not port_open(prefect_port) and not port_open(ingest_port)
    assert "Warning:" not in said and "Traceback" not in said, said[-3000:]  # a start and a stop without alarms


def postgres_refuses_strangers_and_prefect_is_no_superuser(data: Path, settings_file: Path) -> bool:
    """Without the password nobody gets in (not even as the superuser); with it, Prefect's role cannot run a program."""
    import asyncio
    import json

    import asyncpg

    port = yaml.safe_load(settings_file.read_text())["postgres_port"]
    secret = data / "prefect" / "postgres.secret"
    assert secret.stat().st_mode & 0o077 == 0
    made = json.loads(secret.read_text())

    async def check() -> None:
        for user in ("postgres", "prefect", made["user"]):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(
                    host=LOOPBACK, port=port, user=user, database="postgres", password="guess", timeout=10
                )
        connection = await asyncpg.connect(
            host=LOOPBACK,
            port=port,
            user=made["user"],
            password=made["password"],
            database=made["database"],
            timeout=10,
        )
        try:
            assert await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute("COPY (SELECT 1) TO PROGRAM 'id'")
        finally:
            await connection.close()

    asyncio.run(check())
    return True


def test_a_cluster_of_an_earlier_version_that_trusted_everyone_asks_for_a_password_after_provisioning(data_root):
    """An earlier `up` made its cluster with --auth=trust and the `prefect` superuser: the next one gives that role a
    password and the cluster scram-sha-256 everywhere."""
    import asyncio

    import asyncpg

    from birdflow.app.postgres import credentials, provision_now, trusts_connections

    try:
        initdb, postgres = postgres_program("initdb"), postgres_program("postgres")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    cluster = data_root / "prefect" / "postgres"
    cluster.mkdir(parents=True)
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(cluster, user, user)
    subprocess.run(
        [initdb, "-D", str(cluster), "-U", "prefect", "--auth=trust"],
        check=True,
        capture_output=True,
        user=user,
        group=user,
    )
    assert trusts_connections(cluster)
    port = free_port()
    server = subprocess.Popen(
        [postgres, "-D", str(cluster), "-h", LOOPBACK, "-p", str(port), "-k", str(cluster)],
        user=user,
        group=user,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 30, "the old cluster")
        made = credentials(data_root / "prefect" / "postgres.secret", cluster)
        assert (made.user, made.database) == ("prefect", "postgres")  # the old cluster's own role and database
        provision_now(port, made, cluster)
        provision_now(port, made, cluster)  # (again: nothing to do)

        async def check() -> None:
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(host=LOOPBACK, port=port, user="prefect", database="postgres", timeout=10)
            connection = await asyncpg.connect(
                host=LOOPBACK, port=port, user="prefect", database="postgres", password=made.password, timeout=10
            )
            await connection.close()

        asyncio.run(check())
        assert not trusts_connections(cluster)
    finally:
        server.terminate()
        server.wait(30)
