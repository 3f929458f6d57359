"""A whole station (`birdflow up`) in a temporary folder on loopback ports, for the bench and the drills:
started, measured (CPU and memory of its processes, from /proc), asked through its Prefect API, stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import yaml

from birdflow.settings import Settings
from birdflow_tools.testbed import free_port, prefect_post

# filters of the Prefect API
RECORDING_RUNS = {"flows": {"name": {"any_": ["process-recording"]}}}


COMPLETED = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
# the embedded Prefect server logs each request it serves at this level (uvicorn's access log)
ACCESS_LOG = {"PREFECT_SERVER_LOGGING_LEVEL": "INFO"}
ACCESS_LINE = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) (/api/[^ ?]*)')
AN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            pass
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and of their reaped children."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def pin_threads(pids: list[int], cores: set[int]) -> None:
    """Every thread of these processes onto `cores` (threads started later inherit it from their creator)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cores)
            except OSError:
                continue  # a thread that has just ended


def _status_mb(pids: list[int], field: str) -> float:
    """The sum of one memory field of /proc/<pid>/status (kB) over the processes still there, in MB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def peak_rss_mb(pids: list[int]) -> float:
    return _status_mb(pids, "VmHWM")


def restart_peak(pid: int) -> None:
    """From now on, peak_rss_mb counts from what the process holds now (Linux: clear_refs 5), so that a peak
    measures one piece of work and not the process's start."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def resident_mb(pid: int) -> float:
    """What a process holds now (its peak is peak_rss_mb)."""
    return _status_mb([pid], "VmRSS")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environment_without_settings() -> dict[str, str]:
    """This process's environment without Prefect's and birdflow's settings: a child started from it is
    configured by what it is given alone."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "BIRDFLOW_"))}


def _epoch(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


@dataclass
class Stack:
    """`birdflow up` in a temporary folder (also its working directory), on loopback ports, with its own
    embedded Prefect server."""

    root: Path
    prefect_database: str = "sqlite"
    station_id: str = "bench"
    settings: dict = field(default_factory=dict)  # more settings for settings.yaml
    env: dict = field(default_factory=dict)  # more environment (secrets)
    process: subprocess.Popen | None = None
    ingest_port: int = field(default_factory=free_port)
    prefect_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)  # UDP; a free TCP port number is as good as any
    python: str = sys.executable  # the interpreter whose birdflow runs (another virtualenv's, say)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def api_url(self) -> str:
        """The Prefect API the station uses: a central one when its settings name one, else its embedded server."""
        return self.settings.get("prefect_api_url") or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def recording_runs(self) -> dict:
        """Filter of this station's recording runs (its process-recording deployment is named after it)."""
        return {**RECORDING_RUNS, "deployments": {"name": {"any_": [self.station_id]}}}

    @cached_property
    def places(self) -> Settings:
        """Where the stack keeps what (its data_dir under root; the rest as birdflow's settings derive it)."""
        return Settings(data_dir=self.root / "data")

    @property
    def log_path(self) -> Path:
        return self.root / "up.log"

    def start(self, timeout_s: float = 180) -> None:
        settings = {
            "station_id": self.station_id,
            "data_dir": str(self.places.data_dir),
            "ingest_host": "127.0.0.1",
            "ingest_port": self.ingest_port,
            "prefect_port": self.prefect_port,
            "prefect_database": self.prefect_database,
            "postgres_port": free_port(),
            "health_port": self.health_port,
            # benches and drills send each listener's recordings faster than real time
            "max_recordings_per_minute": 1_000_000,
            **self.settings,
        }
        settings_file = self.root / "settings.yaml"
        settings_file.write_text(yaml.safe_dump(settings))
        # the stack under test is configured by its settings file alone
        env = {**environment_without_settings(), **self.env}
        start = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "birdflow.app.cli", "--settings", str(settings_file), "up"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout_s
        while "executor ready" not in self.log_path.read_bytes()[start:].decode(errors="replace"):
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start; its log ends:\n{self.log_tail()}")
            time.sleep(0.25)

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """`birdflow <args>` with the stack's settings (and nothing of this process's Prefect environment)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        return subprocess.run(
            [self.python, "-m", "birdflow.app.cli", "--settings", str(self.root / "settings.yaml"), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**env, **self.env},
            cwd=self.root,
        )

    def upload(self, name: str, body, timeout_s: float = 60) -> dict:
        """A recording (bytes or an open file) sent to the ingest API as a listener uploads one; its reply."""
        import httpx

        response = httpx.post(f"{self.url}/recordings_upload", files={"file": (name, body)}, timeout=timeout_s)
        if response.status_code != 200:
            raise AssertionError(f"upload of {name}: {response.status_code} {response.text}")
        return response.json()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def up(self) -> subprocess.Popen:
        """The `birdflow up` process (RuntimeError before start())."""
        if self.process is None:
            raise RuntimeError("the stack has not been started")
        return self.process

    def child(self, role: str) -> int | None:
        """The process id of `up`'s child: "ingest", "executor", "relay" or "server" (the Prefect server)."""
        module, word = {
            "ingest": ("birdflow.app.cli", "ingest"),
            "executor": ("birdflow.app.cli", "execute"),
            "relay": ("birdflow.app.cli", "relay"),
            "server": ("birdflow.app.prefect_server", "start"),
        }[role]
        for pid in _children(self.up.pid):
            command = command_line(pid).split()  # python -m <module> <command> ...
            if module in command[:3] and word in command[3:]:
                return pid
        return None

    def required_child(self, role: str) -> int:
        """The child's process id; RuntimeError, with the stack's log, when it is not running."""
        pid = self.child(role)
        if pid is None:
            raise RuntimeError(f"up runs no {role} process; log:\n{self.log_tail()}")
        return pid

    def groups(self) -> dict[str, list[int]]:
        """Process ids by role: aggregator (supervisor, ingest, executor), server, database, ingest alone."""
        groups: dict[str, list[int]] = {"aggregator": [self.up.pid], "server": [], "database": [], "ingest": []}
        for child in _children(self.up.pid):
            command = command_line(child)
            tree = process_tree(child)
            if "birdflow.app.prefect_server" in command:
                groups["server"] += tree
            elif "postgres" in command:
                groups["database"] += tree
            else:
                groups["aggregator"] += tree
                if command.rstrip().endswith(" ingest"):
                    groups["ingest"] += tree
        return groups

    def cpu(self) -> dict[str, float]:
        return {role: cpu_seconds(pids) for role, pids in self.groups().items()}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def age_runs(self, days: float) -> None:
        """Make the runs that ended, and every event, `days` older, as if time had passed (the embedded SQLite
        server's)."""
        with closing(sqlite3.connect(self.places.prefect_database_file, timeout=60)) as database:
            with database:
                database.execute(
                    f"UPDATE flow_run SET start_time = datetime(start_time, '-{days} days'), "
                    f"end_time = datetime(end_time, '-{days} days') WHERE end_time IS NOT NULL"
                )
                for table in ("events", "event_resources"):
                    database.execute(f"UPDATE {table} SET occurred = datetime(occurred, '-{days} days')")

    def stored_times(self) -> dict[str, float]:
        """recording id -> when its detections file was written (wall clock)."""
        stored = {}
        for path in self.places.detections_dir.rglob("*.parquet"):
            stored[path.name.split("__", 1)[0]] = path.stat().st_mtime
        return stored

    def ingest_health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def api_calls(self, since: int) -> Counter[str]:
        """Requests the embedded Prefect server served since that byte of the log, by method and route (ids as
        <id>); the stack must run with ACCESS_LOG in its environment."""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        return Counter(
            f"{found.group(1)} {AN_ID.sub('<id>', found.group(2))}"
            for line in lines
            if (found := ACCESS_LINE.search(line))
        )

    def prefect_rows(self) -> dict[str, int]:
        """Rows per table of the embedded Prefect server's SQLite database (empty on Postgres)."""
        if self.prefect_database != "sqlite":
            return {}
        with closing(sqlite3.connect(self.places.prefect_database_file, timeout=60)) as database:
            tables = [name for (name,) in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {table: database.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables}

    def api(self, path: str, body: dict):
        """POST to the station's Prefect API."""
        return prefect_post(self.api_url, path, body)

    def get(self, path: str):
        """GET from the station's Prefect API."""
        import httpx

        response = httpx.get(f"{self.api_url}/{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def unfinished_runs(self) -> int:
        """Runs of any of the station's deployments not in a final state yet (the maintenance run it starts with)."""
        final = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
        return int(self.api("flow_runs/count", {"flow_runs": {"state": {"type": {"not_any_": final}}}}))

    def completed_runs(self) -> int:
        """Completed runs of recordings (the maintenance deployment's are not counted)."""
        return int(self.api("flow_runs/count", {**self.recording_runs, **COMPLETED}))

    def run_timings(self, recording_ids: set[str]) -> dict[str, dict]:
        """recording id -> its completed run's start and end (epoch seconds) and its task runs' run time."""
        runs = self.api(
            "flow_runs/filter",
            {**self.recording_runs, **COMPLETED, "sort": "START_TIME_DESC", "limit": 200},
        )
        runs = {run["id"]: run for run in runs if run["parameters"]["recording"]["recording_id"] in recording_ids}
        tasks = self.api("task_runs/filter", {"flow_runs": {"id": {"any_": list(runs)}}, "limit": 200}) if runs else []
        timings = {
            run["parameters"]["recording"]["recording_id"]: {
                "start": _epoch(run["start_time"]),
                "end": _epoch(run["end_time"]),
                "tasks": 0,
                "tasks_s": 0.0,
            }
            for run in runs.values()
        }
        for task in tasks:
            if task["state_type"] == "COMPLETED":
                timing = timings[runs[task["flow_run_id"]]["parameters"]["recording"]["recording_id"]]
                timing["tasks"] += 1
                timing["tasks_s"] += task["total_run_time"]
        return timings


@contextmanager
def temporary_stack(prefect_database: str, keep: bool = False, settings: dict | None = None) -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="birdflow-bench-"))
    root.chmod(0o755)  # an embedded Postgres runs as its own user when we are root
    # no maintenance run during the bench: it would merge the detection files the bench times
    stack = Stack(root, prefect_database, settings={"maintenance_interval_s": 86400, **(settings or {})})
    try:
        yield stack
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
