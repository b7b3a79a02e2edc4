"""`run_sweep`, the entry point of a sweep: open (or join) its study, queue its slots, run them.

The study and its queue are in `study`, the processes that work the queue in `workers`, one
trial as one run in `trial`; this module sits on top of all three.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from imgclf.sweep.spec import load_sweep
from imgclf.sweep.study import Log, Sweep
from imgclf.sweep.workers import run_local_workers, work


def run_sweep(
    spec_path: str | Path,
    cli_overrides: list[str] | tuple[str, ...] = (),
    *,
    workers: int = 1,
    storage: str | None = None,
    join: bool = False,
    worker: bool = False,
    retry_failed: bool = False,
    log: Log = print,
) -> Sweep:
    """Start or continue a sweep (or `join` one) and run its trials with `workers` processes.

    Without `join` the study is created (or continued) and every slot not yet done is queued;
    `join` attaches to an existing study and only works (and re-queues failed trials with
    `retry_failed`). `workers=0` only queues; 1 runs trials in this process; more start that many
    `imgclf sweep --join` processes here. `worker` is the spawned processes' flag: never queue.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened
    spec = load_sweep(spec_path)
    sweep = Sweep.open(spec, cli_overrides, storage, retry=retry_failed)
    if join:
        sweep.load()
    else:
        sweep.create()
    if not worker and (not join or retry_failed):
        queued = sweep.queue(retry_failed)
        log(f"sweep {sweep.id}: {len(queued)} trial(s) queued in {sweep.display_url}")
    if workers == 1 or worker:
        work(sweep, log)
    elif workers > 1:
        codes = run_local_workers(sweep, Path(spec_path), list(cli_overrides), workers, log)
        sweep.worker_exits = codes
    sweep.fail_stale()
    return sweep
