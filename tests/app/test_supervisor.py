"""`birdflow up`'s supervision: each child restarts on its own back-off, and a dead child's gauges go."""

from __future__ import annotations

import os
import sys
import time

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from birdflow.settings import Settings
from birdflow.app.supervisor import Child, restart_when_due


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
    dies_with_two_streams = "from birdflow.app import metrics; metrics.OPEN_STREAMS.labels('s').inc(2); import os; os.kill(os.getpid(), 9)"
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
