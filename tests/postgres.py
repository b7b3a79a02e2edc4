"""A throwaway PostgreSQL server for tests: a fresh cluster (initdb) in a temporary folder,
started with pg_ctl on a free loopback port, always stopped and deleted afterwards.

PostgreSQL refuses to run as root, so as root every server command runs as the `postgres`
system user (`runuser -u postgres --`) in a folder it owns. Needs Debian's `postgresql`
package (or `IMGCLF_PG_BIN` pointing at a folder holding initdb, pg_ctl and postgres).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

USER = "imgclf"  # the database superuser initdb creates (trust auth, loopback only)


def find_bindir() -> Path:
    """The folder with initdb / pg_ctl: $IMGCLF_PG_BIN, else the newest /usr/lib/postgresql/N."""
    if os.environ.get("IMGCLF_PG_BIN"):
        return Path(os.environ["IMGCLF_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: `apt-get install -y postgresql` (Debian), "
            "or set IMGCLF_PG_BIN to the folder holding initdb and pg_ctl"
        )
    return found[-1].parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster on 127.0.0.1:`port`; `database(name)` creates a database and gives its URL."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))  # /tmp: reachable by postgres
        self.data = self.root / "data"
        self.port = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.as_user, str(self.bindir / args[0]), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            log = (
                (self.root / "server.log").read_text()
                if (self.root / "server.log").exists()
                else ""
            )
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}\n{log[-2000:]}"
            )
        return r

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=50"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                          "-w", "-t", "60", "-o", options, "start", timeout=90)  # fmt: skip
                return self
            except (RuntimeError, subprocess.TimeoutExpired):
                if attempt == 2:
                    raise
        return self

    def database(self, name: str) -> str:
        """Create database `name`; its SQLAlchemy URL (psycopg2 driver)."""
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                               connect_timeout=10)  # fmt: skip
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (fast, then by signal if it will not) and delete its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                          "stop", timeout=45)  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server, stopped and deleted however the block ends."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
