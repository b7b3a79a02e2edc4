"""Sweep storage: the Optuna RDB storage a study lives in, and the file lock beside it.

A standard Optuna RDB storage, so `optuna-dashboard URL` shows the study live:
- default: SQLite at `<runs>/sweeps/<id>/study.db`, in WAL mode with a 60 s busy timeout, which
  keeps several local workers from ever surfacing "database is locked". (JournalStorage would
  avoid locking too, but has no heartbeat: a killed worker's trial would stay RUNNING forever.)
- `postgresql://…`: one study shared by `imgclf sweep FILE --join` workers on any machine.

On SQLite every decision that reads the queue and then writes it — creating the storage, queueing,
claiming, failing stale or orphaned trials and queueing them again — holds one file lock beside
the database (`study.db.lock`, taken through `StudyLock`): Python's sqlite3 reads outside
transactions, so without it two processes could both create the schema, both queue a slot, or
both fail and re-queue the same lost trial. On PostgreSQL the same decisions hold a
session-level advisory lock (`pg_advisory_lock`) keyed by the database URL, taken on a dedicated
connection, so processes on any machine creating or queueing one study take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from imgclf.errors import ImgclfError
from imgclf.sweep.spec import HeartbeatSpec


def open_storage(
    url: str, heartbeat: HeartbeatSpec | None = None, on_lost=None
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (with heartbeats when given); SQLite in WAL mode, long timeout."""
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    try:
        # Two processes creating a new study at once both create its tables and stamp its
        # schema version ("UNIQUE constraint failed: alembic_version"): one at a time.
        with StudyLock(url).held():
            if url.startswith("sqlite"):
                engine_kwargs = {"connect_args": {"timeout": 60}}
                database = _sqlite_path(url)
                if database is not None:
                    _sqlite_wal(database)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat.interval if heartbeat else None,
                    grace_period=heartbeat.grace_seconds if heartbeat else None,
                    heartbeat_stale_trial_callback=on_lost,
                )
    except (SQLAlchemyError, ImportError, ValueError, sqlite3.Error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImgclfError(f"cannot open the sweep storage {display_url(url)}: {reason}") from e


def _sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for other databases (and :memory:)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _lock_path(url: str) -> Path | None:
    """The lock file beside a SQLite study (None for server databases)."""
    database = _sqlite_path(url)
    return database.with_name(database.name + ".lock") if database else None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes on this machine (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _advisory_key(url: str) -> int:
    """A stable signed 64-bit advisory lock key for a database URL (password left out)."""
    digest = hashlib.sha256(f"imgclf.sweep:{display_url(url)}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def advisory_lock(url: str, timeout: float = 300.0):
    """A PostgreSQL session-level advisory lock on its own connection (freed if the holder dies)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    key, where = _advisory_key(url), display_url(url)
    engine = create_engine(url, poolclass=NullPool)  # never shared with Optuna's pool
    con = None
    try:
        try:
            con = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            # A holder that hangs must not hang every other worker forever.
            con.execute(text(f"SET lock_timeout = '{int(timeout * 1000)}ms'"))
            con.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except SQLAlchemyError as e:
            if getattr(e.orig, "pgcode", None) == "55P03":  # lock_not_available
                raise ImgclfError(
                    f"the sweep study lock on {where} (pg_advisory_lock {key}) was not free "
                    f"in {timeout:.0f} s: another imgclf process holds it; find it with "
                    "`SELECT pid FROM pg_locks WHERE locktype = 'advisory'`, stop that process "
                    "(or `SELECT pg_terminate_backend(pid)`), then try again"
                ) from e
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ImgclfError(f"cannot take the sweep study lock on {where}: {reason}") from e
        try:
            yield
        finally:
            with contextlib.suppress(SQLAlchemyError):  # a lost connection frees it anyway
                con.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        if con is not None:
            with contextlib.suppress(SQLAlchemyError):
                con.close()
        engine.dispose()


class StudyLock:
    """Makes read-then-write decisions on the queue atomic (re-entrant).

    Python's sqlite3 runs Optuna's SELECT … FOR UPDATE outside any transaction, so two
    processes can both see WAITING and both claim the trial (or both see a slot missing and
    both queue it); on any database, two processes creating one storage both create its
    tables. A file lock beside a SQLite database (a SQLite study is on one machine), or a
    PostgreSQL advisory lock on its own connection, serialises them.
    """

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        self.url, self.timeout = url, timeout
        self.path = _lock_path(url)
        self._postgres = url.startswith("postgresql")
        self._depth = 0

    def _take(self):
        if self.path is not None:
            return file_lock(self.path)
        if self._postgres:
            return advisory_lock(self.url, self.timeout)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held(self):
        """Hold the lock; only the outermost holder takes the file or advisory lock."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._take():
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1


def _sqlite_wal(path: Path) -> None:
    """WAL lets readers work beside the one writer; the setting stays with the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")
    con.close()


def display_url(url: str) -> str:
    """The storage URL with any password hidden (it is written to sweep.json and printed)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
