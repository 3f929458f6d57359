"""The embedded Prefect server: Prefect's own `prefect server start`, with SQLite transactions that take
the write lock when they begin.

Prefect's server begins SQLite transactions DEFERRED: creating a flow run from a deployment reads the
deployment, then inserts. When any other write commits in between (a state change, the task-run
recorder's batch), SQLite cannot upgrade the read to a write and answers SQLITE_BUSY at once, without
waiting on its busy timeout; the API answers 503 and the client sends the whole request again. Under a
backlog of 10 s recordings a third of all run creations failed this way (measured with the server's
access log). SQLite allows one writer at a time in any case, so beginning every transaction IMMEDIATE
(wait for the write lock, up to Prefect's busy timeout, then read and write) loses no concurrency and
fails nothing. Postgres is left as Prefect configures it.

Run as `python -m birdflow.app.prefect_server start --host H --port P` (the arguments of
`prefect server start`).
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator

from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction


class WriteLockFirstSqliteConfiguration(AioSqliteConfiguration):
    """Prefect's SQLite configuration, with every transaction begun IMMEDIATE."""

    @asynccontextmanager
    async def begin_transaction(
        self, session: AsyncSession, with_for_update: bool = False
    ) -> AsyncIterator[AsyncSessionTransaction]:
        token = SQLITE_BEGIN_MODE.set("IMMEDIATE")
        try:
            async with session.begin() as transaction:
                yield transaction
        finally:
            SQLITE_BEGIN_MODE.reset(token)


def use_write_lock_first_sqlite() -> None:
    """Install the configuration above through Prefect's database dependency, when the database is SQLite."""
    from prefect.server.database.dependencies import MODELS_DEPENDENCIES
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if url and url.startswith("sqlite"):
        MODELS_DEPENDENCIES["database_config"] = WriteLockFirstSqliteConfiguration(connection_url=url)


def main() -> None:
    use_write_lock_first_sqlite()
    from prefect.cli import app

    sys.argv = ["prefect", "server", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
