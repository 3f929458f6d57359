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

It also keeps the run history within the station's disk budget (birdflow/core/budget.py): a service of
its own, run by Prefect's own scheduler of background services, deletes the oldest runs with Prefect's own
vacuum when the database outgrows the budget or the disk nears its floor, and the database file gives the
freed pages back to the disk (SQLite's incremental auto-vacuum).

Run as `python -m birdflow.app.prefect_server start --host H --port P` (the arguments of
`prefect server start`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

from birdflow.core.budget import MB, TRIM_ROUNDS, HistoryBudget, runs_to_delete, sqlite_bytes_in_use
from birdflow.core.local_db import moved_aside_if_damaged, state_file_lock
from birdflow.runtime.prefect_internals import (
    SQLITE_BEGIN_MODE,
    TERMINAL_STATES,
    AioSqliteConfiguration,
    Depends,
    Perpetual,
    PrefectDBInterface,
    perpetual_service,
    prefect_cli,
    provide_database_interface,
    use_database_configuration,
    vacuum_old_events,
    vacuum_old_flow_runs,
)
from birdflow.settings import Settings, SettingsError, load_settings

# a child of Prefect's logger: the server's logging configuration shows it
log = logging.getLogger("prefect.birdflow.history")
# Prefect's vacuum deletes runs older than its retention period, which it requires to exceed an hour
SHORTEST_RETENTION = timedelta(hours=1, seconds=1)
CONVERT_AT_MOST = 256 * MB  # a VACUUM of this much takes seconds on an SD card, well within `up`'s start-up wait


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
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if url and url.startswith("sqlite"):
        use_database_configuration(WriteLockFirstSqliteConfiguration(connection_url=url))


def start_anew_if_damaged(database: Path) -> None:
    """A damaged database (a failing card) moved aside: the server makes a new one, and the executor, which
    keeps every recording until its run completes, runs again what was in flight. Only the history is lost."""
    database.parent.mkdir(parents=True, exist_ok=True)
    with state_file_lock(database):
        kept = moved_aside_if_damaged(database)
    if kept is not None:
        log.error(
            "the Prefect database %s was damaged: moved aside as %s; the run history starts anew (no recording is "
            "lost: those not yet analysed are run again)",
            database,
            kept.name,
        )


def incremental_auto_vacuum(database: Path) -> None:
    """A new database is made with auto_vacuum=INCREMENTAL, so that pages freed by deleting history can go
    back to the disk; an existing one is converted once (VACUUM: it needs its own size free again, and time
    before the server answers, so only up to CONVERT_AT_MOST; a larger one reuses its freed pages)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(database, timeout=60, isolation_level=None)) as connection:
        if connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        size = database.stat().st_size
        if size > CONVERT_AT_MOST or size * 1.2 > shutil.disk_usage(database.parent).free:
            log.warning(
                "the Prefect database (%d MB) is not converted to give freed space back to the disk; it reuses it",
                size // MB,
            )
            return
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("VACUUM")


def give_space_back(database: Path) -> int:
    """Return the database's free pages to the disk, and its write-ahead log (up to 4 MB, kept at its largest
    by SQLite) once checkpointed; the bytes freed from the database."""
    with closing(sqlite3.connect(database, timeout=60, isolation_level=None)) as connection:
        free_pages, page_size = (
            connection.execute(f"PRAGMA {name}").fetchone()[0] for name in ("freelist_count", "page_size")
        )
        if free_pages:
            connection.executescript("PRAGMA incremental_vacuum;")  # (execute() steps it once: one page)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # a busy log is left for the next pass
    return free_pages * page_size


def state_bytes(settings: Settings) -> int:
    """The station's state beside the run history: its SQLite files and Prefect's cached results."""
    files = [*settings.state_dir.glob("*.sqlite"), *(settings.prefect_home / "storage").glob("*")]
    return sum(
        sqlite_bytes_in_use(path) if path.suffix == ".sqlite" else path.stat().st_size
        for path in files
        if path.is_file()
    )


async def trim_history(settings: Settings, db) -> int:
    """One pass: delete the oldest runs (with their task runs, logs, artifacts, and the events of their time)
    through Prefect's own vacuum until the history fits, then give the freed pages back; returns the runs
    deleted."""
    database = settings.prefect_database_file
    budget = settings.history_budget()
    history, state = sqlite_bytes_in_use(database), state_bytes(settings)
    target = budget.trim_target(history, state, shutil.disk_usage(settings.data_dir).free)
    deleted = 0 if target is None else await _delete_oldest_runs(database, db, budget, target, history, state)
    await asyncio.to_thread(give_space_back, database)
    return deleted


async def _delete_oldest_runs(database: Path, db, budget: HistoryBudget, target: int, history: int, state: int) -> int:
    """Delete the oldest runs until the history is down to `target` bytes. A round deletes what the history's
    average size per run says, too few while the database's fixed part is a large share of it (a small
    budget), so up to TRIM_ROUNDS rounds go on down to the target; returns the runs deleted."""
    from prefect.settings import (
        PREFECT_EVENTS_RETENTION_PERIOD,
        PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD,
        temporary_settings,
    )

    deleted = 0
    for _ in range(TRIM_ROUNDS):
        async with db.session_context() as session:
            runs = (
                await session.execute(sa.select(sa.func.count()).select_from(db.FlowRun).where(_ended(db)))
            ).scalar_one()
            wanted = runs_to_delete(history, runs, target)
            oldest = wanted and await _end_of_oldest_runs(session, db, wanted)
        if not oldest:
            break
        doomed, last_end = oldest
        log.info(
            "run history %.1f MB and state %.1f MB against a budget of %.1f MB: the oldest %d of %d runs go",
            history / MB,
            state / MB,
            budget.budget_bytes / MB,
            doomed,
            runs,
        )
        retention = max(datetime.now(timezone.utc) - last_end - timedelta(microseconds=1), SHORTEST_RETENTION)
        with temporary_settings(
            updates={
                PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD: retention,
                PREFECT_EVENTS_RETENTION_PERIOD: retention,
            }
        ):
            await vacuum_old_flow_runs(db=db)
            await vacuum_old_events(db=db)
        deleted += doomed
        history = sqlite_bytes_in_use(database)
    return deleted


def _ended(db):
    """The runs Prefect's vacuum may delete: top-level runs that ended."""
    return sa.and_(
        db.FlowRun.parent_task_run_id.is_(None),
        db.FlowRun.state_type.in_(TERMINAL_STATES),
        db.FlowRun.end_time.is_not(None),
    )


async def _end_of_oldest_runs(session, db, wanted: int) -> tuple[int, datetime] | None:
    """How many of the `wanted` oldest runs may go (the youngest hour is Prefect's vacuum's to keep), and when
    the last of them ended; None when none may."""
    old_enough = (
        await session.execute(
            sa.select(sa.func.count())
            .select_from(db.FlowRun)
            .where(_ended(db), db.FlowRun.end_time < datetime.now(timezone.utc) - SHORTEST_RETENTION)
        )
    ).scalar_one()
    doomed = min(wanted, old_enough)
    if not doomed:
        return None
    last_end = (
        await session.execute(
            sa.select(db.FlowRun.end_time).where(_ended(db)).order_by(db.FlowRun.end_time).offset(doomed - 1).limit(1)
        )
    ).scalar_one()
    return doomed, last_end.astimezone(timezone.utc)


def keep_history_within_budget(settings: Settings) -> None:
    """Register trim_history with Prefect's perpetual services, every history_check_interval_s."""
    every = timedelta(seconds=settings.unattended.history_check_interval_s)

    @perpetual_service(enabled_getter=lambda: True)
    async def keep_run_history_within_budget(
        perpetual: Perpetual = Perpetual(automatic=True, every=every),
        db: PrefectDBInterface = Depends(provide_database_interface),
    ) -> None:
        try:
            await trim_history(settings, db)
        except Exception:
            log.exception("keeping the run history within its budget failed; tried again in %s", every)


def station_settings() -> Settings | None:
    """The settings of the station whose embedded server this is (`up` starts it on the station's own SQLite
    file); None for any other server."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from birdflow.app.prefect_env import database_url

    try:
        settings = load_settings()
    except SettingsError:
        return None  # not a station's server: `up` refuses invalid settings before it starts one
    return settings if PREFECT_API_DATABASE_CONNECTION_URL.value() == database_url(settings) else None


def main() -> None:
    use_write_lock_first_sqlite()
    settings = station_settings()
    if settings is not None and settings.prefect.prefect_database == "sqlite":
        start_anew_if_damaged(settings.prefect_database_file)
        incremental_auto_vacuum(settings.prefect_database_file)
        keep_history_within_budget(settings)
    sys.argv = ["prefect", "server", *sys.argv[1:]]
    prefect_cli()()


if __name__ == "__main__":
    main()
