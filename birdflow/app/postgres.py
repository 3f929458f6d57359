"""The embedded Postgres (the cluster `up` runs for a station with prefect_database: postgres) and its
credentials: password authentication, and a role for Prefect that is not a superuser.

A cluster made by an earlier version trusted every connection from 127.0.0.1 and gave Prefect its superuser:
any local user could read Prefect's encryption key and the secrets of its blocks, and run programs as the
Postgres user (COPY ... TO PROGRAM). A new cluster asks for passwords (scram-sha-256) and Prefect's database
belongs to `birdflow_prefect`, an ordinary role; an existing one is switched to passwords at the next `up`
(its role stays the superuser it was made: docs/operating.md, "Upgrade notes"). The passwords live in
prefect/postgres.secret (0600).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from birdflow.app.children import Child
from birdflow.settings import Settings

SUPERUSER = "postgres"
APP_ROLE = "birdflow_prefect"
APP_DATABASE = "prefect"


@dataclass(frozen=True)
class PostgresCredentials:
    user: str
    password: str
    database: str
    superuser: str
    superuser_password: str

    def url(self, port: int) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{port}/{self.database}"


def credentials(secret_file: Path, cluster: Path) -> PostgresCredentials:
    """The cluster's credentials, made on first use: for a new cluster its own roles, for one made before
    passwords (it has a PG_VERSION and no secret) its `prefect` superuser, which gets a password."""
    if secret_file.exists():
        return PostgresCredentials(**json.loads(secret_file.read_text()))
    if (cluster / "PG_VERSION").exists():
        password = secrets.token_urlsafe(24)
        made = PostgresCredentials("prefect", password, "postgres", "prefect", password)
    else:
        made = PostgresCredentials(
            APP_ROLE, secrets.token_urlsafe(24), APP_DATABASE, SUPERUSER, secrets.token_urlsafe(24)
        )
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    partial = secret_file.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(made)))
    partial.chmod(0o600)
    partial.replace(secret_file)
    return made


def trusts_connections(cluster: Path) -> bool:
    """A cluster of an earlier version: its pg_hba.conf trusts connections."""
    hba = cluster / "pg_hba.conf"
    return hba.exists() and any(
        line.split()[-1:] == ["trust"] for line in hba.read_text().splitlines() if not line.startswith("#")
    )


async def provision(port: int, made: PostgresCredentials, cluster: Path) -> None:
    """Make the running cluster what `made` says: a password for a trusting one (then passwords only), Prefect's
    role and database for a new one. Idempotent."""
    import asyncpg

    trusting = trusts_connections(cluster)
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=made.superuser,
        database="postgres",
        password=None if trusting else made.superuser_password,
        timeout=30,
    )
    try:
        if trusting:
            await connection.execute(f'ALTER ROLE "{made.superuser}" PASSWORD {_literal(made.superuser_password)}')
            hba = cluster / "pg_hba.conf"
            hba.write_text("\n".join(_scram(line) for line in hba.read_text().splitlines()) + "\n")
            await connection.execute("SELECT pg_reload_conf()")
        if made.user != made.superuser:
            if not await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", made.user):
                await connection.execute(
                    f'CREATE ROLE "{made.user}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                    f"PASSWORD {_literal(made.password)}"
                )
            if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", made.database):
                await connection.execute(f'CREATE DATABASE "{made.database}" OWNER "{made.user}"')
    finally:
        await connection.close()


def provision_now(port: int, made: PostgresCredentials, cluster: Path) -> None:
    asyncio.run(provision(port, made, cluster))


def _scram(line: str) -> str:
    fields = line.split()
    if line.startswith("#") or not fields or fields[-1] != "trust":
        return line
    return line.rsplit("trust", 1)[0] + "scram-sha-256"


def _literal(text: str) -> str:
    """A string literal for the few statements that take no parameters (our own random token: no quotes)."""
    return "'" + text.replace("'", "''") + "'"


POSTGRES = "postgres"


def postgres_cluster(settings: Settings) -> Path:
    return (settings.prefect_home / "postgres").resolve()


def postgres_credentials(settings: Settings) -> PostgresCredentials:
    return credentials(settings.prefect_home / "postgres.secret", postgres_cluster(settings))


def postgres_program(name: str) -> str:
    """initdb/postgres from PATH or from Debian's versioned folder (which is not on PATH)."""
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise RuntimeError(
            f"prefect_database is postgres but `{name}` is not installed (Debian: apt install postgresql)"
        )
    return str(found)


def embedded_postgres(settings: Settings, keep_fds: tuple[int, ...] = ()) -> Child:
    """A Postgres cluster under data_dir for the embedded Prefect server, created on first use.

    Postgres refuses to run as root, so as root it runs as the `postgres` user that the Debian package
    creates. Commits are not flushed one by one (synchronous_commit=off): a power cut can lose the
    last few hundred milliseconds of run history, never a recording, and each state change is cheaper.
    """
    folder = postgres_cluster(settings)
    user = "postgres" if os.geteuid() == 0 else None
    folder.mkdir(parents=True, exist_ok=True)
    if user:  # the Postgres user passes through the folders birdflow keeps to itself (umask 077) to its own
        for own in (settings.data_dir, settings.prefect_home):
            own.chmod(own.stat().st_mode | 0o011)
    if not (folder / "PG_VERSION").exists():
        made = postgres_credentials(settings)
        password_file = folder.parent / "postgres.initdb-password"  # read by initdb (as its user), then gone
        password_file.write_text(made.superuser_password + "\n")
        if user:
            shutil.chown(folder, user, user)
            shutil.chown(password_file, user, user)
        try:
            result = subprocess.run(
                [
                    postgres_program("initdb"),
                    "-D",
                    str(folder),
                    "-U",
                    made.superuser,
                    "--auth=scram-sha-256",
                    f"--pwfile={password_file}",
                    "-E",
                    "UTF8",
                ],
                capture_output=True,
                text=True,
                user=user,
                group=user,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            hint = f" (the {user} user must be able to reach {folder.parent})" if user else ""
            raise RuntimeError(f"initdb failed{hint}: {result.stderr.strip()[-500:]}")
    command = [
        postgres_program("postgres"),
        "-D",
        str(folder),
        "-h",
        "127.0.0.1",
        "-p",
        str(settings.prefect.postgres_port),
        "-k",
        str(folder),
        "-c",
        "synchronous_commit=off",
        "-c",
        "max_connections=60",
        "-c",
        "shared_buffers=64MB",
    ]
    # SIGINT to the postmaster alone is Postgres' "fast" shutdown
    return Child(
        POSTGRES, command, user=user, stop_signal=signal.SIGINT, signal_group=False, keep_fds=keep_fds, serves=2
    )
