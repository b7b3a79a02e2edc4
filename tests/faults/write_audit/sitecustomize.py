"""Loaded by every Python process started with this folder on PYTHONPATH: records each write
(open for writing, mkdir, rename, remove) under $IMGCLF_AUDIT_ROOT into
$IMGCLF_AUDIT_DIR/rank<RANK>.log, so a test can show which rank wrote what."""

import os
import sys

_ROOT = os.environ.get("IMGCLF_AUDIT_ROOT")
_DIR = os.environ.get("IMGCLF_AUDIT_DIR")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install() -> None:
    root = os.path.realpath(_ROOT)
    log = open(  # noqa: SIM115 - held open for the life of the process
        os.path.join(_DIR, f"rank{os.environ.get('RANK', 'none')}.log"), "a", buffering=1
    )

    def under_root(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full == root or full.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes and under_root(path):
                log.write(f"open {os.fsdecode(path)}\n")
        elif event == "os.rename":  # os.rename and os.replace
            if under_root(args[0]) or under_root(args[1]):
                log.write(f"{event} {os.fsdecode(args[0])} {os.fsdecode(args[1])}\n")
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate") and under_root(args[0]):
            log.write(f"{event} {os.fsdecode(args[0])}\n")

    sys.addaudithook(hook)


if _ROOT and _DIR:
    _install()
