"""The central side of a fleet on loopback ports, laid out as the Kubernetes manifests lay it out
(docs/fleet.md, "Scaling out"): one Postgres, one Redis carrying Prefect's messages (prefect-redis), K Prefect API
processes (`prefect server start --no-services`) and one process of Prefect's background services. Every
Prefect process gets the settings of the manifests' `prefect-settings` ConfigMap, so what is measured here
is what a cluster runs. Used by `birdflow bench --stations` and the tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from birdflow.app.children import wait_for_port, wait_for_prefect
from birdflow.app.postgres import embedded_postgres, postgres_cluster, postgres_credentials, provision_now
from birdflow.app.prefect_env import database_url
from birdflow.settings import Settings
from birdflow_tools.stack import cpu_seconds, environment_without_settings, process_tree
from birdflow_tools.testbed import LOOPBACK, free_port, stop_process

MANIFEST = Path(__file__).resolve().parents[2] / "deployments" / "kubernetes" / "prefect.yaml"
# the overlay for a fleet whose stations keep their own run history
OWN_HISTORY = MANIFEST.parent / "own-history" / "kustomization.yaml"
# what the official image needs at start, not a setting of a process started from this virtualenv
NOT_SETTINGS = {"EXTRA_PIP_PACKAGES"}
# the run history a fleet keeps: Prefect's tables that grow with every run
HISTORY_TABLES = (
    "flow_run",
    "flow_run_state",
    "task_run",
    "task_run_state",
    "log",
    "artifact",
    "events",
    "event_resources",
)


def manifest_settings(own_history: bool = False) -> dict[str, str]:
    """The Prefect settings of the Kubernetes ConfigMap `prefect-settings`; with `own_history`, as the
    own-history overlay patches them."""
    for document in yaml.safe_load_all(MANIFEST.read_text()):
        if document and document.get("kind") == "ConfigMap" and document["metadata"]["name"] == "prefect-settings":
            found = {key: str(value) for key, value in document["data"].items() if key not in NOT_SETTINGS}
            return {**found, **(overlay_settings() if own_history else {})}
    raise RuntimeError(f"no ConfigMap prefect-settings in {MANIFEST.name}")


def overlay_settings() -> dict[str, str]:
    """The settings the own-history overlay replaces in `prefect-settings` (its JSON patches' replace ops)."""
    replaced = {}
    for patch in yaml.safe_load(OWN_HISTORY.read_text())["patches"]:
        if patch["target"] == {"kind": "ConfigMap", "name": "prefect-settings"}:
            for operation in yaml.safe_load(patch["patch"]):
                replaced[operation["path"].removeprefix("/data/")] = operation["value"]
    return replaced


def redis_program() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("the central side needs `redis-server` (Debian: apt install redis-server)")
    return found


@dataclass
class CentralPrefect:
    """Postgres + Redis + `api_processes` Prefect API processes + Prefect's services, under `root`."""

    root: Path
    api_processes: int = 1
    settings: dict = field(default_factory=dict)  # Prefect settings over the manifest's (e.g. a shorter vacuum)
    own_history: bool = False  # the own-history overlay's settings
    postgres_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    api_ports: list[int] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def places(self) -> Settings:
        """Where its Postgres cluster and that cluster's credentials live (as a station's `up` keeps them)."""
        return Settings.model_validate(
            {"data_dir": self.root / "postgres", "postgres_port": self.postgres_port, "prefect_database": "postgres"}
        )

    @property
    def database_url(self) -> str:
        return database_url(self.places)

    def api_url(self, index: int = 0) -> str:
        return f"http://{LOOPBACK}:{self.api_ports[index % len(self.api_ports)]}/api"

    def environment(self) -> dict[str, str]:
        env = environment_without_settings()
        env.update(manifest_settings(self.own_history))
        env.update(
            PREFECT_HOME=str(self.root / "prefect-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
            PREFECT_REDIS_MESSAGING_HOST=LOOPBACK,
            PREFECT_REDIS_MESSAGING_PORT=str(self.redis_port),
            PREFECT_SERVER_DOCKET_URL=f"redis://{LOOPBACK}:{self.redis_port}/1",
            **self.settings,
        )
        return env

    def start(self, timeout_s: float = 180) -> CentralPrefect:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # Postgres runs as its own user when we are root
        places = self.places
        database = embedded_postgres(places)  # the cluster a station's `up` would start, created here
        # room for every API process's and the services' connection pools
        self._spawn("database", database.command + ["-c", "max_connections=200"], user=database.user)
        wait_for_port(self.postgres_port, 60, lambda: self.processes["database"].poll() is None)
        provision_now(self.postgres_port, postgres_credentials(places), postgres_cluster(places))
        self._spawn(
            "redis",
            [redis_program(), "--bind", LOOPBACK, "--port", str(self.redis_port), "--save", "", "--appendonly", "no"],
        )
        wait_for_port(self.redis_port, 30)
        # the schema once, before any Prefect process starts (the manifests: the services pod's init container)
        upgrade = subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "--yes"],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if upgrade.returncode != 0:
            raise RuntimeError(
                f"prefect server database upgrade failed: {upgrade.stdout[-1000:]}{upgrade.stderr[-1000:]}"
            )
        self.api_ports = [free_port() for _ in range(self.api_processes)]
        for index, port in enumerate(self.api_ports):
            # the UI it serves asks the API at this address (Prefect's default is port 4200)
            self._spawn(
                f"api{index}",
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(port),
                    "--no-services",
                ],
                PREFECT_UI_API_URL=self.api_url(index),
            )
            api = self.processes[f"api{index}"]
            try:
                wait_for_prefect(self.api_url(index), timeout_s, alive=lambda api=api: api.poll() is None)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; its log ends:\n{self.log_tail(f'api{index}')}") from None
        self._spawn(
            "services",
            [sys.executable, "-m", "prefect", "server", "services", "start"],
            PREFECT_API_URL=self.api_url(0),
        )
        return self

    def _spawn(self, name: str, command: list[str], user: str | None = None, **env: str) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env={**self.environment(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=user,
            )

    def log_tail(self, name: str, lines: int = 20) -> str:
        return "\n".join((self.root / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role: api (every API process), services, database, redis."""
        roles: dict[str, list[int]] = {"api": [], "services": [], "database": [], "redis": []}
        for name, process in self.processes.items():
            roles["api" if name.startswith("api") else name] += process_tree(process.pid)
        return roles

    def cpu(self) -> dict[str, float]:
        return {role: cpu_seconds(pids) for role, pids in self.pids().items()}

    def api_cpu(self) -> list[float]:
        """CPU-s of each API process, in order."""
        return [cpu_seconds(process_tree(self.processes[f"api{index}"].pid)) for index in range(self.api_processes)]

    def query(self, statement: str) -> list[tuple]:
        """One SQL statement on the central database (asyncpg comes with Prefect's server)."""
        import asyncpg

        async def run() -> list[tuple]:
            made = postgres_credentials(self.places)
            connection = await asyncpg.connect(
                host=LOOPBACK,
                port=self.postgres_port,
                user=made.user,
                password=made.password,
                database=made.database,
            )
            try:
                return [tuple(row) for row in await connection.fetch(statement)]
            finally:
                await connection.close()

        return asyncio.run(run())

    def history(self) -> dict[str, int]:
        """Rows of the run-history tables, and the database's bytes on disk."""
        counts = self.query(" UNION ALL ".join(f"SELECT '{table}', count(*) FROM {table}" for table in HISTORY_TABLES))
        return {**{table: int(count) for table, count in counts}, "database_bytes": self.database_bytes()}

    def database_bytes(self) -> int:
        return int(self.query("SELECT pg_database_size(current_database())")[0][0])

    def stop(self) -> None:
        database = self.processes.pop("database", None)
        for process in reversed(list(self.processes.values())):
            stop_process(process, grace_s=10)
        if database and database.poll() is None:
            database.send_signal(signal.SIGINT)  # Postgres' fast shutdown, by its postmaster
            try:
                database.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(database.pid, signal.SIGKILL)
