"""Is the process that trains into a run folder still alive? Read-only, and no torch import.

`RunDir.lock()` writes "pid N on HOST" into `<run>/.lock` while it holds the lock. A run whose
summary still says `running` but whose owner is gone (kill -9, a power cut) is dead: the
leaderboard shows it so instead of `running` forever. Only the owner's own host can tell; a
run owned by another host, or with no owner recorded yet, stays `running`.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

LOCK_FILE = ".lock"
_OWNER = re.compile(r"pid (\d+) on (.*)")


def owner(run: Path) -> tuple[int, str] | None:
    """(pid, host) from the run's lock file, or None when it names none."""
    try:
        text = (Path(run) / LOCK_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _OWNER.fullmatch(text.strip())
    return (int(match.group(1)), match.group(2)) if match else None


def owner_gone(run: Path) -> str:
    """Why the recorded owner of `run` is certainly not running ('' when it may be)."""
    found = owner(run)
    if found is None:
        return ""
    pid, host = found
    if host != platform.node():
        return ""
    if not _alive(pid):
        return f"its process (pid {pid} on {host}) is gone"
    started = _start_time(pid)
    try:
        written = (Path(run) / LOCK_FILE).stat().st_mtime
    except OSError:
        return ""
    # The owner wrote the lock file after it started; a process that started later only
    # reuses the pid number.
    if started is not None and started > written + 1.0:
        return f"its process (pid {pid} on {host}) is gone (the pid now belongs to another)"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: assume alive
    return True


def _start_time(pid: int) -> float | None:
    """The process's start as a Unix time (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as f:
            boot = next(float(ln.split()[1]) for ln in f if ln.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (ValueError, IndexError, OSError):
        return None
