"""The SQLite MLflow store imgclf mirrors runs to: readable, intact (`PRAGMA quick_check`) and
with MLflow's tables, since tracked runs are written there. Opened read-only, so checking
never changes it; a tracking server is not contacted, and its password is not shown."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote, urlsplit

from imgclf.doctor.files import run_folders
from imgclf.doctor.findings import Finding, Status

MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs", "metrics", "params", "tags"})


def check_mlflow_store(runs: Path, uri: str | None = None) -> list[Finding]:
    """The SQLite store imgclf would mirror to: readable, intact, with MLflow's schema."""
    from imgclf.config import TrackingConfig
    from imgclf.runs.tracking import sqlite_path, store_uri

    uri = store_uri(TrackingConfig(uri=uri), runs)
    db = sqlite_path(uri)
    if db is None:
        return [Finding("mlflow store", "ok", f"not checked (a server): {_redacted(uri)}")]
    if not db.exists():
        return [Finding("mlflow store", "ok", f"none yet at {db}: the first tracked run makes it")]
    status, detail = _inspect_sqlite(db)
    fix = _store_fix(db, runs) if status == "problem" else ""
    return [Finding("mlflow store", status, f"{db}: {detail}", fix)]


def _inspect_sqlite(db: Path) -> tuple[Status, str]:
    if not db.is_file():
        return "problem", "not a file"
    try:
        con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error as e:
        return "problem", f"cannot be opened ({e})"
    try:
        check = [row[0] for row in con.execute("PRAGMA quick_check")]
        query = "SELECT name FROM sqlite_master WHERE type='table'"
        tables = {row[0] for row in con.execute(query)}
        if not tables:
            return "warn", "an empty database: MLflow creates its tables on first use"
        if check != ["ok"]:
            return "problem", f"corrupt (quick_check: {'; '.join(check[:3])})"
        missing = sorted(MLFLOW_TABLES - tables)
        if missing:
            return "problem", f"not an MLflow store (no table {', '.join(missing)})"
        revision = con.execute("SELECT version_num FROM alembic_version").fetchone()
        if revision is None:
            return "problem", "MLflow's schema version (table alembic_version) is empty"
        count = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return "warn", "busy (another process is writing it): not checked, try again"
        return "problem", f"unreadable ({e})"
    except sqlite3.DatabaseError as e:
        return "problem", f"not a readable SQLite database ({e})"
    finally:
        con.close()
    return "ok", f"intact, MLflow schema {revision[0]}, {count} runs"


def _store_fix(db: Path, runs: Path) -> str:
    folders = [str(r) for r in run_folders(runs)]
    if not folders:
        again = "the next tracked run makes a new one"
    elif len(folders) <= 3:
        again = f"re-create its runs from their folders: imgclf mirror {' '.join(folders)}"
    else:
        again = (
            f"re-create its runs from the {len(folders)} run folders: imgclf mirror {runs}/<run> …"
        )
    return f"move it aside (mv {db} {db}.broken, and any -wal / -shm beside it); {again}"


def _redacted(uri: str) -> str:
    password = urlsplit(uri).password
    return uri if password is None else uri.replace(f":{password}@", ":***@", 1)
