"""The embedded Postgres' credentials: password authentication, and a role for Prefect that is not a superuser.

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
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

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
