"""Run `imgclf` with a fault planted: `python inject.py FAULT -- imgclf-args…`.

FAULT is one of
  write:N:FRACTION   SIGKILL this process inside its N-th write of checkpoints/last.pt, after
                     FRACTION of the bytes reached the temporary file
  rename:N           SIGKILL after the N-th checkpoint is complete on disk, before its rename
  file:NAME:N        SIGKILL inside the N-th write of the run file NAME (half its bytes)
  none               no fault

The kill is a real SIGKILL to the process itself: nothing in imgclf gets to clean up, exactly
as when the machine or the OOM killer stops a training.
"""

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(fault: str) -> None:
    import imgclf.files as io_module

    kind, *args = fault.split(":")
    if kind == "none":
        return
    if kind == "rename":
        target, nth, fraction = "last.pt", int(args[0]), None
    elif kind == "write":
        target, nth, fraction = "last.pt", int(args[0]), float(args[1])
    elif kind == "file":
        target, nth, fraction = args[0], int(args[1]), 0.5
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    original, seen = io_module.atomic_write, {"n": 0}

    def atomic_write(path, write):
        if Path(path).name != target:
            return original(path, write)
        seen["n"] += 1
        if seen["n"] != nth:
            return original(path, write)
        if fraction is None:  # complete on disk, killed before the rename
            io_module.os.replace = lambda *_: _die()
            return original(path, write)

        def partial(f):
            class Half:
                def write(self, data):
                    cut = int(len(data) * fraction)
                    f.write(bytes(data)[:cut])
                    f.flush()
                    os.fsync(f.fileno())
                    _die()

            write(Half())

        return original(path, partial)

    io_module.atomic_write = atomic_write


if __name__ == "__main__":
    fault, sep, *rest = sys.argv[1:]
    assert sep == "--", "usage: inject.py FAULT -- imgclf-args…"
    plant(fault)
    from imgclf.cli import main

    sys.argv = ["imgclf", *rest]
    main()
