"""`birdflow up`'s supervision: each child restarts on its own back-off, and a dead child's gauges go."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from birdflow.app.children import Child, restart_when_due
from birdflow.settings import Settings
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import wait_until


def test_a_crash_looping_child_does_not_hold_another_one_down(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.metrics_dir.mkdir(parents=True)
    env = dict(os.environ)
    crashing = Child("crashing", [sys.executable, "-c", "raise SystemExit(3)"], restarts=5)  # failed 5 times already
    steady = Child("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    for child in (crashing, steady):
        child.start(env)
    crashing.process.wait()
    restart_when_due(crashing, env, settings)  # found dead: it waits 32 s
    first_pid = steady.process.pid
    steady.process.kill()
    steady.process.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 8 and not steady.alive():
        for child in (crashing, steady):
            restart_when_due(child, env, settings)
        time.sleep(0.1)
    assert steady.alive() and steady.process.pid != first_pid
    assert time.monotonic() - killed < 2.5  # its own 1 s back-off, not the other child's 32 s
    assert not crashing.alive() and crashing.restart_at > time.monotonic()
    steady.kill()


def test_the_gauges_of_a_dead_child_stop_counting(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.metrics_dir.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(settings.metrics_dir)}
    # a child that holds two streams open and dies without closing them (kill -9)
    dies_with_two_streams = (
        "from birdflow.runtime import metrics; metrics.OPEN_STREAMS.labels('s').inc(2); "
        "import os; os.kill(os.getpid(), 9)"
    )
    child = Child("ingest", [sys.executable, "-c", dies_with_two_streams])
    child.start(env)
    child.process.wait()

    def open_streams() -> str:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(settings.metrics_dir))
        return generate_latest(registry).decode()

    assert 'birdflow_open_streams{station="s"} 2.0' in open_streams()
    restart_when_due(child, env, settings)
    assert "birdflow_open_streams{" not in open_streams()


def test_up_cannot_be_doubled_and_its_children_end_with_it_even_when_it_is_killed(tmp_path, sample_48k):
    stack = Stack(
        tmp_path / "first", station_id="single", env={"PREFECT_API_AUTH_STRING": "birdflow:only-the-server-checks-it"}
    )
    # a second `up` on the same data folder, on other ports
    second = Stack(tmp_path / "second", station_id="single", settings={"data_dir": str(stack.places.data_dir)})
    for each in (stack, second):
        each.root.mkdir()
    try:
        stack.start()
        children = [stack.child(role) for role in ("ingest", "executor", "server")]
        assert all(children)
        # the server's auth string and database URL are the server's alone
        server_secrets = [b"PREFECT_SERVER_API_AUTH_STRING=" in environment(pid) for pid in children]
        assert server_secrets == [False, False, True]
        with pytest.raises(RuntimeError):
            second.start(timeout_s=60)
        assert "birdflow up already runs on" in second.log_tail() and str(stack.process.pid) in second.log_tail()
        # nor can a second executor start beside the first
        executor = stack.cli("execute", timeout_s=60)
        assert executor.returncode == 1 and "an executor already runs on" in executor.stderr
        # kill -9 of `up` alone: its children go too, and the data folder is free again once they have
        os.kill(stack.process.pid, signal.SIGKILL)
        stack.process.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in children)
        data, database = stack.places.data_dir, stack.places.prefect_database_file
        data.chmod(0o755), database.chmod(0o644)  # as an older version left them
        second.start(timeout_s=120)
        assert second.completed_runs() == 0  # a working station again
        httpx.post(
            f"{second.url}/recordings_upload",
            files={"file": ("mic1_20250601T053000Z.wav", sample_48k.read_bytes())},
            timeout=60,
        ).raise_for_status()
        wait_until(lambda: second.completed_runs() == 1, 120, "the recording analysed")
        # closed to other users: the database holds the key to the stored secrets
        assert (mode(data), mode(database)) == (0o700, 0o600)
        written = [
            path
            for folder in ("archive", "state", "detections")
            for path in (data / folder).rglob("*")
            if path.is_file()
        ]
        assert written and all(mode(path) & 0o077 == 0 for path in written), {
            str(path): oct(mode(path)) for path in written
        }
    finally:
        for each in (stack, second):
            each.stop()


def environment(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def alive(pid: int) -> bool:
    """Running (a zombie its parent has not reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
