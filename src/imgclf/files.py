"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace.

A crash half-way leaves the previous version intact and never a partial file under the final
name (docs/RELIABILITY.md F2); a full disk says which file it was writing (F3).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from imgclf.errors import ImgclfError


def _file_mode() -> int:
    """0666 less the process umask (read once at import; umask is process-wide state)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; run files are for sharing
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno == errno.ENOSPC:
            raise ImgclfError(
                f"no space left writing {path}; the previous version is intact"
            ) from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    )


def is_temp_name(name: str) -> bool:
    """The name `atomic_write` gives its temporary files: `.<final name>.<random>.tmp`."""
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_temps(folder: Path) -> list[Path]:
    """Delete what killed writers left under `folder` (its owner must hold it exclusively)."""
    found = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and is_temp_name(p.name)]
    for p in found:
        _remove_quietly(str(p))
    return found


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NotRegularFile(ImgclfError):
    """A path that names a FIFO, socket, device or folder: reading it could block forever."""

    def __init__(self, path: object, kind: str) -> None:
        self.path, self.kind = str(path), kind
        super().__init__(f"{self.path}: not a regular file ({kind}); never opened")

    def __reduce__(self):  # pool workers pickle errors back to the main process
        return type(self), (self.path, self.kind)


_SPECIAL_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def special_kind(mode: int) -> str:
    """'' for a regular file, else what the stat mode names ("FIFO", "socket", …)."""
    if stat.S_ISREG(mode):
        return ""
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "special file")


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a regular file for reading, refusing anything else (RELIABILITY 32).

    os.stat comes first, so a FIFO or device is never opened at all; the open itself is
    non-blocking and re-checked with fstat, so a FIFO swapped in between cannot block either.
    """
    _refuse_special(path, os.stat(path).st_mode)
    f = open(path, "rb", opener=_open_nonblocking)  # noqa: SIM115 - returned to the caller
    try:
        _refuse_special(path, os.fstat(f.fileno()).st_mode)
        os.set_blocking(f.fileno(), True)
    except BaseException:
        f.close()
        raise
    return f


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _refuse_special(path: str | os.PathLike, mode: int) -> None:
    kind = special_kind(mode)
    if kind == "folder":  # what open() says of a folder
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if kind:
        raise NotRegularFile(path, kind)


def is_utf8(text: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UTF8 = "file name is not valid UTF-8: rename it (shown here with \\xNN escapes)"
# Python's csv writers quote a field with "\n" but not one with "\r" (with "\n" line ends), so
# a carriage return (macOS's "Icon\r" files) would split a row of every CSV imgclf writes.
CARRIAGE_RETURN = "file name holds a carriage return: rename it (shown here as \\r)"


def unusable_name(path: str | os.PathLike) -> str:
    """Why a path cannot be kept as text in manifests and CSV files ('' when it can): its
    bytes are not UTF-8 (RELIABILITY 31), or it holds a carriage return."""
    text = os.fsdecode(path)
    if not is_utf8(text):
        return NOT_UTF8
    return CARRIAGE_RETURN if "\r" in text else ""


def printable(name: str | os.PathLike) -> str:
    """A file name as text that every CSV and JSON writer keeps: bytes that are not UTF-8 as
    \\xNN (RELIABILITY 31), a carriage return as \\r."""
    text = os.fspath(name)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    elif not is_utf8(text):
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file name produced
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r")


def die_with_parent(parent: int) -> None:
    """Pool initializer: this worker is killed when `parent` (the command) dies, even by
    SIGKILL, so no worker outlives the command (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # The command may have died before prctl took effect. Its pid is checked, not our
    # parent's: under forkserver the parent is the server (which dies with the command).
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
