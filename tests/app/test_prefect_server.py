"""The embedded server's SQLite transactions: a transaction that reads, then writes, must wait for a concurrent
writer instead of failing (the race behind the 503s on "create run" under a backlog)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from prefect.server.database.configurations import AioSqliteConfiguration

from birdflow.app.prefect_server import WriteLockFirstSqliteConfiguration


async def read_then_write_while_another_writes(configuration: AioSqliteConfiguration) -> list[int]:
    """Transaction A reads; meanwhile B inserts and commits; then A inserts. Returns the rows at the end."""
    engine = await configuration.engine()
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY)"))
    other_started = asyncio.Event()

    async def other_writer() -> None:
        session = await configuration.session(engine)
        async with session, configuration.begin_transaction(session):
            other_started.set()
            await session.execute(sa.text("INSERT INTO runs (id) VALUES (2)"))

    session = await configuration.session(engine)
    async with session:
        async with configuration.begin_transaction(session):
            await session.execute(sa.text("SELECT count(*) FROM runs"))
            other = asyncio.create_task(other_writer())
            await other_started.wait()
            await asyncio.sleep(0.3)  # B has written and committed, or is waiting for the lock
            await session.execute(sa.text("INSERT INTO runs (id) VALUES (1)"))
        await other
    async with engine.connect() as connection:
        rows = [row[0] for row in await connection.execute(sa.text("SELECT id FROM runs ORDER BY id"))]
    await engine.dispose()
    return rows


def test_a_transaction_that_reads_then_writes_waits_for_a_concurrent_writer(tmp_path):
    configuration = WriteLockFirstSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'ours.db'}")
    assert asyncio.run(read_then_write_while_another_writes(configuration)) == [1, 2]


def test_prefects_own_sqlite_configuration_fails_that_race(tmp_path):
    """What the configuration above exists for: the stock one answers "database is locked" at once."""
    configuration = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'stock.db'}")
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        asyncio.run(read_then_write_while_another_writes(configuration))
