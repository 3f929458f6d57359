"""The embedded server's SQLite transactions: a transaction that reads, then writes, must wait for a concurrent
writer instead of failing (the race behind the 503s on "create run" under a backlog). Its run history kept
within the station's disk budget."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing

import pytest
import sqlalchemy as sa
from prefect.server.database.configurations import AioSqliteConfiguration

from birdflow.app.prefect_server import (
    WriteLockFirstSqliteConfiguration,
    give_space_back,
    incremental_auto_vacuum,
    state_bytes,
)
from birdflow.core.budget import MB, SHRINK_TO, sqlite_bytes_in_use
from birdflow_tools.bench import distinct_uploads
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import wait_until


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


def test_deleted_history_gives_its_pages_back_to_the_disk(tmp_path):
    """All the free pages at once (a pragma that Python's execute() would step for one page only)."""
    database = tmp_path / "history.db"
    with closing(sqlite3.connect(database, isolation_level=None)) as connection:
        connection.execute("CREATE TABLE run (body BLOB)")
        connection.executemany("INSERT INTO run VALUES (?)", [(b"x" * 4000,)] * 500)
    incremental_auto_vacuum(database)  # an existing database converted
    with closing(sqlite3.connect(database, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("DELETE FROM run")
    full = database.stat().st_size
    freed = give_space_back(database)
    assert full > 1.9 * MB and freed > 1.9 * MB and database.stat().st_size < full / 10


def test_the_embedded_server_keeps_run_history_within_its_budget_oldest_first(tmp_path, sample_48k):
    """60 runs with their stored events (~6 MB of history on a 1.4 MB database) against a budget of 5 MB: once
    the runs are two days old, Prefect's vacuum deletes the oldest, and the events of their time, until the
    database is back under 90 % of what the budget allows it, and the file gives the space back."""
    budget, RUNS = 5.0 * MB, 60
    stack = Stack(
        tmp_path,
        station_id="budget",
        settings={"history_budget_mb": budget / MB, "history_check_interval_s": 1, "prefect_events_enabled": True},
    )
    database = stack.places.prefect_database_file
    try:
        stack.start()
        for name, body in distinct_uploads(sample_48k, RUNS):
            stack.upload(name, body)
        wait_until(lambda: stack.completed_runs() == RUNS, 180, f"{RUNS} runs")
        assert sqlite_bytes_in_use(database) > budget  # over the budget, but too young for Prefect's vacuum
        ended = {run["name"]: run["end_time"] for run in stack.api("flow_runs/filter", stack.recording_runs)}
        stack.age_runs(days=2)  # (to the second: runs ending within the same second may swap places)
        wait_until(lambda: stack.completed_runs() < RUNS, 60, "the oldest runs deleted")
        # down to 90 % of what the budget leaves the history beside the state, not just under it
        target = SHRINK_TO * (budget - state_bytes(stack.places))
        wait_until(lambda: sqlite_bytes_in_use(database) <= target, 30, "the history within 90 % of its budget")
        kept = {run["name"] for run in stack.api("flow_runs/filter", stack.recording_runs)}
        assert 0 < len(kept) < RUNS
        last_deleted = max(end[:19] for name, end in ended.items() if name not in kept)
        assert last_deleted <= min(ended[name][:19] for name in kept)  # the oldest went, the newest stay
        # the freed pages go back to the disk once the write-ahead log is checkpointed (a pass when it is idle)
        wait_until(lambda: database.stat().st_size <= 1.1 * budget, 30, "the database file shrunk")
        assert "against a budget of 5.0 MB: the oldest" in stack.log_tail(400)
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            about = connection.execute("SELECT DISTINCT resource_id FROM events").fetchall()
        left = {resource for (resource,) in about if resource.startswith("prefect.flow-run.")}  # the stored feed's
        assert left and left <= {f"prefect.flow-run.{run['id']}" for run in stack.api("flow_runs/filter", {})}
    finally:
        stack.stop()
