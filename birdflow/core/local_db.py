"""birdflow's own small SQLite files (the processed-recordings record, cached task results).

WAL, so readers never wait for the writer; one connection per thread, since sqlite3 connections are not
shared between threads; several processes of a station may use the same file at once.

Each file keeps its schema version in `PRAGMA user_version`: a database is given its migrations in order, the
first makes the schema, each later one changes it, and opening a file applies those it has not had (in one
transaction, so two processes opening an old file at once migrate it once). A file made before versions were kept
is version 0, so a first migration must accept the tables already there (CREATE ... IF NOT EXISTS). A file from a
newer birdflow is refused by name rather than written with an older idea of its tables.

A file is checked (`PRAGMA quick_check`) the first time a process opens it, and a statement that meets a damaged
page (a failing SD card) checks it again. A damaged file is moved aside (`<name>.damaged-<UTC time>`, kept for a
person to look at), a new one is made with the rows that can still be read from it, and the owner's `rebuild` adds
what the station holds elsewhere: the statement that met the damage raises StateFileDamaged, which is retried.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from birdflow.core.errors import StateFileDamaged, StateFileError

log = logging.getLogger(__name__)

# SQL statements, or a function given the connection inside the migration's transaction (for a change that
# depends on what the file holds); neither may commit
Migration = str | Callable[[sqlite3.Connection], None]

# the write-ahead log is checkpointed at this many pages (1 MB) and cut back to that size afterwards
WAL_PAGES = 256
DAMAGED_MARK = ".damaged-"  # a damaged file moved aside: <name>.damaged-<UTC time>
DAMAGE_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB (not in the type stubs)
BATCH_ROWS = 1000  # rows read (and copied) at a time from a long query

_checked: set[Path] = set()  # the files this process has checked since it started
_checked_lock = threading.Lock()


class Rows:
    """A statement's rows, read in full where a damaged page can still be caught, and what it changed."""

    def __init__(self, rows: list[Any], rowcount: int = -1):
        self._rows = rows
        self.rowcount = rowcount

    @classmethod
    def of(cls, cursor: sqlite3.Cursor) -> Rows:
        return cls(cursor.fetchall(), cursor.rowcount)

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class LocalDatabase:
    def __init__(
        self, path: Path, migrations: Sequence[Migration], rebuild: Callable[[sqlite3.Connection], None] | None = None
    ):
        """`rebuild`: given a new file in place of a damaged one, adds back what the station holds elsewhere."""
        self.path = Path(path)
        self.migrations = tuple(migrations)
        self.rebuild = rebuild
        self._local = threading.local()

    @property
    def version(self) -> int:
        """The schema version this code writes: the number of its migrations."""
        return len(self.migrations)

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        with self._damage_repaired():
            return Rows.of(self._connection().execute(sql, parameters))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The statements inside as one write transaction (BEGIN IMMEDIATE: the other processes wait for it),
        committed at the end, rolled back when anything in it fails (a file found damaged has taken its
        connection, and the transaction, with it)."""
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection = getattr(self._local, "connection", None)
            if connection is not None and connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def each(self, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """The rows of a query that may be long, a thousand at a time rather than all at once."""
        with self._damage_repaired():
            cursor = self._connection().execute(sql, parameters)
            while batch := cursor.fetchmany(BATCH_ROWS):
                yield from batch

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Rows:
        with self._damage_repaired():
            return Rows.of(self._connection().executemany(sql, rows))

    @contextmanager
    def _damage_repaired(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as error:
            if getattr(error, "sqlite_errorcode", None) not in DAMAGE_CODES:
                raise
            self._drop_connection()
            kept = self._replace_if_damaged()
            raise StateFileDamaged(
                f"{self.path} {'was damaged: moved aside as ' + kept.name + ' and rebuilt' if kept else 'was rebuilt'}"
                f" ({error}); retried"
            ) from error

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema made) on its first use, and opened again when the
        file was replaced (by this process or another), between transactions."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.in_transaction and self._local.inode != _inode(self.path):
            self._drop_connection()
            connection = None
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            resolved = self.path.resolve()
            with _checked_lock:
                first = resolved not in _checked
                _checked.add(resolved)
            if first:
                self._replace_if_damaged()
            with state_file_lock(self.path):  # a first switch to WAL needs the file to itself
                connection = self._open()
            self._local.connection, self._local.inode = connection, _inode(self.path)
        return connection

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            connection.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            self._migrate(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _file_version(self, connection: sqlite3.Connection) -> int:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > self.version:
            raise StateFileError(
                f"{self.path} has schema version {version}, written by a newer birdflow (this one knows up to "
                f"{self.version}): upgrade birdflow, or move the file away to start it afresh"
            )
        return version

    def _migrate(self, connection: sqlite3.Connection) -> None:
        if self._file_version(connection) == self.version:
            return
        connection.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then find it done
        try:
            for migration in self.migrations[self._file_version(connection) :]:
                if callable(migration):
                    migration(connection)
                else:
                    for statement in statements(migration):
                        connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {self.version}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _replace_if_damaged(self) -> Path | None:
        """Check the file, with the other processes of the station kept out; a damaged one is moved aside and
        rebuilt. Returns where the damaged file now is (None when it was sound)."""
        with state_file_lock(self.path):
            kept = moved_aside_if_damaged(self.path)
            if kept is None:
                return None
            with closing(self._open()) as connection:
                salvaged = salvage(kept, connection)
                if self.rebuild is not None:
                    self.rebuild(connection)
        log.error(
            "%s was damaged (as a failing card damages files): moved aside as %s; a new one holds the %d rows "
            "that could still be read%s",
            self.path,
            kept.name,
            salvaged,
            " and what the station holds elsewhere" if self.rebuild else "",
        )
        return kept


@contextmanager
def state_file_lock(path: Path) -> Iterator[None]:
    """Keeps the other processes of the station from checking or replacing the same file at once."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def moved_aside_if_damaged(path: Path) -> Path | None:
    """A damaged SQLite file (and its write-ahead log) renamed `<name>.damaged-<UTC time>`, so that the next open
    makes a new one; where it went, or None when the file is sound or absent. Hold state_file_lock."""
    if not path.exists() or is_sound(path):
        return None
    kept = path.with_name(f"{path.name}{DAMAGED_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, kept)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, kept.with_name(kept.name + suffix))
    return kept


def is_sound(path: Path) -> bool:
    """SQLite's quick check of every page of the file (and of its write-ahead log)."""
    try:
        with closing(sqlite3.connect(path, timeout=30)) as connection:
            return connection.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok"
    except sqlite3.DatabaseError as error:
        if getattr(error, "sqlite_errorcode", None) in DAMAGE_CODES:
            return False
        raise


def salvage(damaged: Path, into: sqlite3.Connection) -> int:
    """Copy the rows that can still be read from a damaged file into a new one of the same schema, each table
    until its first unreadable page. Returns the rows copied."""
    copied = 0
    tables = [row[0] for row in into.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    try:
        source = sqlite3.connect(damaged, timeout=30)
    except sqlite3.DatabaseError:
        return 0
    with closing(source):
        for table in tables:
            try:
                theirs = {row[1] for row in source.execute(f'PRAGMA table_info("{table}")')}
                columns = [row[1] for row in into.execute(f'PRAGMA table_info("{table}")') if row[1] in theirs]
                if not columns:
                    continue
                names = ", ".join(f'"{name}"' for name in columns)
            except sqlite3.DatabaseError:
                continue  # its schema is on a damaged page
            insert = f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({", ".join("?" * len(columns))})'
            batch: list[Any] = []
            try:
                for row in source.execute(f'SELECT {names} FROM "{table}"'):
                    batch.append(row)
                    if len(batch) >= BATCH_ROWS:
                        copied += into.executemany(insert, batch).rowcount
                        batch = []
            except sqlite3.DatabaseError:
                pass  # the rest of this table is past a damaged page
            copied += into.executemany(insert, batch).rowcount if batch else 0
    return copied


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def statements(script: str) -> list[str]:
    """The statements of a migration, one at a time (executescript would commit the migration's transaction)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if pending.strip():
        found.append(pending.strip())
    return found
