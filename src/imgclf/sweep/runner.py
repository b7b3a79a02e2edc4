"""Sweep workers: the Optuna study, its queue of trials, and each trial as an ordinary run.

Every method queues its points as WAITING trials (`enqueue_trial`, one per slot not yet done);
workers claim them with the storage's atomic WAITING → RUNNING switch (what `Study.ask` does),
so any number of workers, local or on other machines, run each point exactly once and stop when
the queue is empty — no sampler racing for the last grid point, no trial count overshot. TPE
(`method: optuna`) samples a queued trial's free parameters when a worker claims it.

Storage is a standard Optuna RDB storage, so `optuna-dashboard URL` shows the study live:
- default: SQLite at `<runs>/sweeps/<id>/study.db`, in WAL mode with a 60 s busy timeout, which
  keeps several local workers from ever surfacing "database is locked". (JournalStorage would
  avoid locking too, but has no heartbeat: a killed worker's trial would stay RUNNING forever.)
- `postgresql://…`: one study shared by `imgclf sweep FILE --join` workers on any machine.
Both use Optuna's heartbeat: a trial whose worker stops beating for `heartbeat.grace` seconds is
marked FAIL (never lost) and its run folder's status "failed"; with `--retry-failed` its slot is
queued again (at most `MAX_RETRIES` times automatically), as are trials failed in earlier sessions.
A FAIL trial's run folder never says "completed" or "pruned", so the leaderboard agrees with the
study even when a worker dies between finishing its run and recording the result.

On SQLite every decision that reads the queue and then writes it — creating the storage, queueing,
claiming, failing stale trials and queueing them again — holds one file lock beside the database
(`study.db.lock`): Python's sqlite3 reads outside transactions, so without it two processes could
both create the schema, both queue a slot, or both fail and re-queue the same lost trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_json
from imgclf.sweep.space import base_tree, check_space, plan, suggest, trial_config
from imgclf.sweep.spec import (
    HeartbeatSpec,
    SweepConfig,
    default_storage,
    load_sweep,
    sweep_folder,
)

LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINGERPRINT = "imgclf.fingerprint"
MAX_RETRIES = 2  # automatic re-queues of a slot whose worker died (--retry-failed queues any)
Log = Callable[[str], None]


class Sweep:
    """One sweep attached to its storage: create / load the study, queue, claim, fail the lost."""

    def __init__(self, spec: SweepConfig, tree: dict, url: str, retry: bool = False) -> None:
        self.spec, self.tree, self.url, self.retry = spec, tree, url, retry
        self.id = str(spec.id)
        self.runs_dir = Path(tree["runs_dir"])
        self.folder = sweep_folder(self.runs_dir, self.id)
        self.storage = open_storage(url, spec.heartbeat, self._on_lost)
        self.study_id: int | None = None
        self.worker_exits: list[int] = []  # exit codes of the local worker processes
        self._lock_path = _lock_path(url)
        self._lock_depth = 0

    @classmethod
    def open(
        cls, spec: SweepConfig, cli_overrides=(), storage: str | None = None, retry=False
    ) -> Sweep:
        """Resolve the base config, check the space against it, connect to the storage."""
        tree = base_tree(spec, list(cli_overrides))
        check_space(tree, spec)
        url = storage or spec.storage or default_storage(tree["runs_dir"], str(spec.id))
        return cls(spec, tree, url, retry)

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    def create(self) -> optuna.Study:
        """Create the study, or continue it when its search space is unchanged."""
        direction = "maximize" if self.spec.maximize else "minimize"
        study = optuna.create_study(
            study_name=self.id, storage=self.storage, direction=direction, load_if_exists=True
        )
        if study.direction.name.lower() != direction:
            raise ImgclfError(
                f"sweep {self.id} in {self.display_url} was started to {study.direction.name} "
                f"{study.user_attrs.get('metric')}; give this sweep a new id"
            )
        fingerprint = _fingerprint(self.spec)
        saved = study.user_attrs.get(FINGERPRINT)
        if saved is None:
            study.set_user_attr(FINGERPRINT, fingerprint)
            study.set_user_attr("metric", self.spec.metric)
            study.set_user_attr("method", self.spec.method)
        elif saved != fingerprint:
            raise ImgclfError(
                f"sweep {self.id} in {self.display_url} was started with another search space "
                "(method, parameters, variants, enqueue, metric or random seed changed); "
                "give this sweep a new id, or restore the sweep file"
            )
        self._write_record()
        return self._attach(study)

    def load(self) -> optuna.Study:
        """Attach to an existing study (`--join`)."""
        try:
            study = optuna.load_study(study_name=self.id, storage=self.storage)
        except KeyError:
            raise ImgclfError(
                f"no sweep {self.id} in {self.display_url}; start it with `imgclf sweep FILE"
                " --storage URL` (--workers 0 only queues it), then --join"
            ) from None
        if study.user_attrs.get(FINGERPRINT) != _fingerprint(self.spec):
            raise ImgclfError(f"sweep {self.id} in {self.display_url} has another search space")
        self._write_record()
        return self._attach(study)

    def _attach(self, study: optuna.Study) -> optuna.Study:
        self.study_id = self.storage.get_study_id_from_name(self.id)
        return study

    def study(self, number: int = 0) -> optuna.Study:
        """A fresh study object (fresh trial cache) with the sampler for trial `number`."""
        return optuna.load_study(
            study_name=self.id,
            storage=self.storage,
            sampler=_sampler(self.spec, number),
            pruner=_pruner(self.spec, self.tree),
        )

    def _write_record(self) -> None:
        spec = self.spec.model_dump(mode="json")
        atomic_write_json(
            self.folder / "sweep.json",
            {
                "id": self.id,
                "storage": self.display_url,
                "method": self.spec.method,
                "metric": self.spec.metric,
                "direction": "maximize" if self.spec.maximize else "minimize",
                "runs_dir": str(self.runs_dir.resolve()),
                "spec": {
                    **spec,
                    "storage": display_url(spec["storage"]) if spec["storage"] else None,
                },
            },
        )

    def queue(self, retry_failed: bool = False) -> list[str]:
        """Queue every slot not yet done (failed ones only with `retry_failed`); their keys."""
        with self._locked():
            study = self.study()
            self.fail_stale(study)
            by_key: dict[Any, list[FrozenTrial]] = defaultdict(list)
            for t in study.get_trials(deepcopy=False):
                by_key[t.user_attrs.get("key")].append(t)
            queued = []
            for slot in plan(self.spec):
                tried = by_key.get(slot.key, [])
                if any(t.state in LIVE for t in tried) or (tried and not retry_failed):
                    continue
                params = slot.params
                if params is None:
                    params = dict(tried[-1].params if tried else {})
                study.enqueue_trial(params, user_attrs={"key": slot.key, "sweep": self.id})
                queued.append(slot.key)
            return queued

    def claim(self) -> tuple[optuna.Study, optuna.Trial, int] | None:
        """Take the oldest WAITING trial (atomically); None when the queue is empty."""
        assert self.study_id is not None
        waiting = self.storage.get_all_trials(self.study_id, False, states=(TrialState.WAITING,))
        for frozen in sorted(waiting, key=lambda t: t.number):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.study_id, frozen.number
            )
            try:
                with self._locked():
                    # The heartbeat first: a worker killed right after the switch to RUNNING
                    # still leaves one to go stale (Optuna never fails a trial without one).
                    if self.storage.get_heartbeat_interval():
                        self.storage.record_heartbeat(trial_id)
                    if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                        continue  # another worker took it
            except UpdateFinishedTrialError:
                continue
            study = self.study(frozen.number)
            trial = optuna.Trial(study, trial_id)
            for k, v in {"host": socket.gethostname(), "pid": os.getpid(), "run": ""}.items():
                trial.set_user_attr(k, v)
            earlier = self._earlier_twin(study, frozen)
            if earlier is not None:  # two places queued this slot at once: run it only once
                trial.set_user_attr("duplicate_of", earlier)
                tell(study, trial, state=TrialState.FAIL)
                continue
            return study, trial, trial_id
        return None

    @contextlib.contextmanager
    def _locked(self):
        """Make read-then-write decisions on the queue atomic on SQLite too (re-entrant).

        PostgreSQL locks the row (SELECT … FOR UPDATE), but Python's sqlite3 runs that SELECT
        outside any transaction, so two processes can both see WAITING and both claim the trial
        (or both see a slot missing and both queue it). A file lock beside the database
        serialises them (a SQLite study is on one machine).
        """
        if self._lock_path is None or self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with file_lock(self._lock_path):
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1

    @staticmethod
    def _earlier_twin(study: optuna.Study, frozen: FrozenTrial) -> int | None:
        key = frozen.user_attrs.get("key")
        twins = [
            t.number
            for t in study.get_trials(deepcopy=False, states=LIVE)
            if t.user_attrs.get("key") == key and t.number < frozen.number
        ]
        return min(twins) if twins else None

    def fail_stale(self, study: optuna.Study | None = None) -> None:
        """Mark RUNNING trials whose heartbeat stopped more than `grace` seconds ago FAIL."""
        with self._locked(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study or self.study())

    def fail_orphans(self, pid: int, why: str) -> list[int]:
        """A local worker process died: fail its RUNNING trials now, without waiting."""
        with self._locked():
            return self._fail_orphans(pid, why)

    def _fail_orphans(self, pid: int, why: str) -> list[int]:
        study, host, failed = self.study(), socket.gethostname(), []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("pid") == pid and t.user_attrs.get("host") == host:
                assert self.study_id is not None
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.study_id, t.number
                )
                try:
                    self.storage.set_trial_user_attr(trial_id, "error", why)
                    if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                        failed.append(t.number)
                        self._on_lost(study, self.storage.get_trial(trial_id), why)
                except UpdateFinishedTrialError:
                    pass
        return failed

    def _on_lost(self, study: optuna.Study, trial: FrozenTrial, why: str = "") -> None:
        """A trial's worker died: say so in its run folder; queue it again if asked to."""
        why = (
            why
            or f"its sweep worker was lost: no heartbeat for {self.spec.heartbeat.grace_seconds} s"
        )
        # Killed before the run folder was recorded on the trial: its tags still name it.
        mark_run_failed(trial.user_attrs.get("run") or self._find_run(trial.number), why)
        if self.retry:
            self._requeue(trial)

    def _find_run(self, number: int) -> str | None:
        name = f"{self.id[:24]}-t{number}"
        for path in self.runs_dir.glob(f"*-{name}-*"):
            try:
                tags = json.loads((path / "summary.json").read_text()).get("tags") or {}
            except (OSError, ValueError, AttributeError):
                continue
            if tags.get("sweep") == self.id and tags.get("trial") == str(number):
                return str(path)
        return None

    def _requeue(self, lost: FrozenTrial) -> None:
        """Queue a lost trial's slot again, unless it is already queued, running or done.

        Only the slot's key and the lost trial's parameters travel: not its run folder, pid or
        error (Optuna's RetryHeartbeatStaleTrialCallback copies every user attribute, so a retry
        killed early would still name the old trial's run).
        """
        key = lost.user_attrs.get("key")
        if key is None:
            return
        with self._locked():
            study = self.study()
            tried = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("key") == key]
            failed = sum(t.state == TrialState.FAIL for t in tried)
            if any(t.state in LIVE for t in tried) or failed > MAX_RETRIES:
                return
            attrs = {"key": key, "sweep": self.id, "retry_of": lost.number}
            study.enqueue_trial(dict(lost.params), user_attrs=attrs)


def open_storage(
    url: str, heartbeat: HeartbeatSpec | None = None, on_lost=None
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (with heartbeats when given); SQLite in WAL mode, long timeout."""
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    lock = _lock_path(url)
    try:
        # Two processes creating a new SQLite study at once both create its tables and stamp
        # its schema version ("UNIQUE constraint failed: alembic_version"): one at a time.
        with file_lock(lock) if lock else contextlib.nullcontext():
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


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    values: float | None = None,
    state: TrialState = TrialState.COMPLETE,
) -> bool:
    """Finish a trial; False when it was already finished elsewhere (its heartbeat went stale)."""
    try:
        told = study.tell(trial, values, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:  # failed by another process between the check and the write
        return False
    return told.state == state


def mark_run_failed(run: str | None, reason: str) -> None:
    """The run folder of a trial the study failed says "failed" (if it is on this disk).

    Left "running" by a killed worker; or "completed" / "pruned" when the worker died (or lost
    its heartbeat) after the run ended but before the study recorded it — the study counts it
    as failed and queues the slot again, so the folder must not look like a result.
    """
    if not run:
        return
    summary_path = Path(run) / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return
    status = summary.get("status")
    if status in ("running", "completed", "pruned"):
        if status != "running":
            reason = f"{reason} (the run had ended {status})"
        atomic_write_json(summary_path, {**summary, "status": "failed", "error": reason})


def _fingerprint(spec: SweepConfig) -> str:
    """What must not change while a study continues (trials, pruner, storage may)."""
    keys = {"method", "parameters", "variants", "enqueue", "metric"}
    if spec.method == "random":
        keys.add("seed")
    return json.dumps(spec.model_dump(mode="json", include=keys), sort_keys=True)


def _sampler(spec: SweepConfig, number: int) -> optuna.samplers.BaseSampler:
    # Seeded per trial number: workers started with the same seed still sample different points,
    # and one worker replays the same sweep exactly.
    seed = spec.seed * 100_003 + number
    if spec.method != "optuna":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True
        )


def _pruner(spec: SweepConfig, tree: dict) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.type == "hyperband":
        epochs_swept = any("epochs" in k for k in spec.parameters) or spec.method == "list"
        total = sum(int(s["epochs"]) for s in tree["train"]["stages"])
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs,
            max_resource="auto" if epochs_swept else max(total, p.min_epochs),
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


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


def work(sweep: Sweep, log: Log = print) -> int:
    """Claim and run trials until the queue is empty; returns how many ran."""
    import imgclf.train.run  # noqa: F401  (seconds of imports: before a trial, not inside one)

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


def run_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, log: Log) -> str:
    """One trial = one `train()` run; its epochs feed the pruner. Returns the outcome."""
    from imgclf.train.fit import Pruned
    from imgclf.train.run import train

    spec, number = sweep.spec, trial.number

    def say(msg: str) -> None:
        log(f"[trial {number}] {msg}")

    try:
        values = suggest(trial, spec)
        cfg = trial_config(sweep.tree, spec, values, number)
    except ImgclfError as e:
        return _failed(study, trial, str(e), say)
    say("start " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    finder, rows = RunFinder(cfg, trial), []

    def on_epoch(row: dict) -> None:
        finder.poll()
        rows.append(row)
        if spec.metric not in row:
            measured = sorted(k for k in row if k.startswith(("val_", "train_")))
            raise ImgclfError(f"metric {spec.metric} is not measured here; runs report {measured}")
        trial.report(float(row[spec.metric]), step=int(row["epoch"]))
        if trial.should_prune():
            raise Pruned(f"pruned after epoch {row['epoch']}: {spec.metric} {row[spec.metric]:.4f}")

    def train_log(msg: str) -> None:
        finder.poll()
        say(msg)

    try:
        path = train(cfg, progress=False, log=train_log, on_epoch=on_epoch)
    except Pruned as e:
        finder.poll()
        if not tell(study, trial, state=TrialState.PRUNED):
            return _failed_meanwhile(finder.path, say)
        say(str(e))
        return "pruned"
    except KeyboardInterrupt:
        finder.poll()
        _failed(study, trial, "interrupted (second Ctrl-C)", say)
        raise
    except Exception as e:
        finder.poll()
        return _failed(study, trial, str(e), say)
    finder.found(path)
    summary = json.loads((path / "summary.json").read_text())
    if summary.get("status") != "completed":
        _failed(study, trial, f"the run ended {summary.get('status')}", say)
        return str(summary.get("status"))
    try:
        value = trial_value(summary, rows, spec.metric, spec.maximize)
    except ImgclfError as e:
        return _failed(study, trial, str(e), say)
    if not tell(study, trial, values=value):
        return _failed_meanwhile(path, say)
    say(f"{spec.metric} {value:.4f}  run {path}")
    return "complete"


def _failed_meanwhile(path: Path | None, say: Log) -> str:
    """The study failed this trial while it ran (its heartbeat went stale): its run is no result."""
    reason = "the study had already failed this trial (no heartbeat in time)"
    mark_run_failed(str(path) if path else None, reason)
    say(f"finished, but {reason}; run: {path}")
    return "failed"


def _failed(study: optuna.Study, trial: optuna.Trial, reason: str, say: Log) -> str:
    set_attr(trial, "error", reason[:1000])
    tell(study, trial, state=TrialState.FAIL)
    say(f"failed: {reason}")
    return "failed"


def trial_value(summary: dict, rows: list[dict], metric: str, maximize: bool) -> float:
    """The saved model's validation value; for train_* metrics the best epoch's."""
    value = (summary.get("val") or {}).get(metric)
    if value is None:
        seen = [float(r[metric]) for r in rows if metric in r]
        if not seen:
            raise ImgclfError(f"the run measured no {metric}")
        value = max(seen) if maximize else min(seen)
    return float(value)


class RunFinder:
    """Finds the run folder `train()` creates (named after the trial, tagged with it) and stores
    its path on the trial as soon as it exists, so a killed trial still points at its run."""

    def __init__(self, cfg, trial: optuna.Trial) -> None:
        self.runs_dir, self.tags, self.trial = Path(cfg.runs_dir), dict(cfg.tags), trial
        self.pattern = f"*-{cfg.name}-*"
        self.before = set(self.runs_dir.glob(self.pattern)) if self.runs_dir.is_dir() else set()
        self.path: Path | None = None

    def poll(self) -> None:
        if self.path is not None or not self.runs_dir.is_dir():
            return
        for candidate in self.runs_dir.glob(self.pattern):
            if candidate in self.before:
                continue
            try:
                tags = json.loads((candidate / "summary.json").read_text()).get("tags")
            except (OSError, ValueError):
                continue
            if tags == self.tags:
                self.found(candidate)
                return

    def found(self, path: Path) -> None:
        if self.path is None:
            self.path = path
            set_attr(self.trial, "run", str(path.resolve()))
            set_attr(self.trial, "run_id", path.name)


def set_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    """A user attribute; skipped when the study already failed the trial (stale heartbeat)."""
    with contextlib.suppress(UpdateFinishedTrialError):
        trial.set_user_attr(key, value)
