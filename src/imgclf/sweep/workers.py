"""Sweep workers: processes that claim queued trials and run them until the queue is empty.

`work` runs trials in this process, recording each trial's heartbeat from a thread while it runs
(`Heartbeat`); `run_local_workers` starts that many `imgclf sweep FILE --join --worker` processes
on this machine and fails a dead one's trials at once instead of waiting for its heartbeat to go
stale. `imgclf sweep FILE --join` workers on other machines run `work` on the same study.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from imgclf.sweep.study import Log
from imgclf.sweep.trial import run_trial

if TYPE_CHECKING:
    from imgclf.sweep.study import Sweep


def work(sweep: Sweep, log: Log = print) -> int:
    """Claim and run trials until the queue is empty; returns how many ran."""
    import imgclf.workflows.training  # noqa: F401  (seconds of imports: before a trial, not inside one)

    if sweep.study_id is None:
        sweep.load()
    done = 0
    while True:
        sweep.fail_stale()
        claimed = sweep.claim()
        if claimed is None:
            return done
        study, trial, trial_id = claimed
        with Heartbeat(sweep.storage, trial_id):
            outcome = run_trial(sweep, study, trial, log)
        done += 1
        if outcome == "interrupted":
            raise KeyboardInterrupt


class Heartbeat:
    """Record a trial's heartbeat every `interval` seconds from a thread while it runs."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            # A database hiccup must not kill the trial; the next beat tries again.
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def run_local_workers(
    sweep: Sweep, spec_path: Path, cli_overrides: list[str], n: int, log: Log
) -> list[int]:
    """N `imgclf sweep --join` processes on this machine; returns their exit codes."""
    env = {**os.environ, "IMGCLF_SWEEP_STORAGE": sweep.url}  # not on the command line: no `ps`
    threads = str(max(1, (os.cpu_count() or 1) // n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    cmd = [sys.executable, "-m", "imgclf", "sweep", str(spec_path.resolve()), *cli_overrides]
    cmd += ["--join", "--worker", *(["--retry-failed"] if sweep.retry else [])]
    logs = sweep.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        with open(logs / f"worker-{i}.log", "ab") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    log(f"{n} workers started (pids {', '.join(str(p.pid) for p in procs)}); logs in {logs}")
    seen: set[int] = set()
    try:
        while any(p.returncode is None for p in procs):
            time.sleep(1.0)
            _report_finished(sweep, seen, log)
            for i, p in enumerate(procs):
                if p.returncode is None and p.poll() is not None and p.returncode != 0:
                    lost = sweep.fail_orphans(p.pid, f"its worker process died ({p.returncode})")
                    log(f"worker {i} exited with {p.returncode}; trial(s) {lost} marked failed; "
                        f"see {logs / f'worker-{i}.log'}")  # fmt: skip
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save, then go
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    _report_finished(sweep, seen, log)
    return [p.returncode for p in procs]


def _report_finished(sweep: Sweep, seen: set[int], log: Log) -> None:
    for t in sweep.study().get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in seen:
            seen.add(t.number)
            value = f" {sweep.spec.metric} {t.value:.4f}" if t.value is not None else ""
            log(f"trial {t.number} {t.state.name}{value} {t.user_attrs.get('run_id', '')}")
