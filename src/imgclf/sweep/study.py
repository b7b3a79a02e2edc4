"""A sweep's Optuna study and its queue of trials (`Sweep`): the state every sweep process shares.

Every method queues its points as WAITING trials (`enqueue_trial`, one per slot not yet done);
workers claim them with the storage's atomic WAITING → RUNNING switch (what `Study.ask` does),
so any number of workers, local or on other machines, run each point exactly once and stop when
the queue is empty — no sampler racing for the last grid point, no trial count overshot. TPE
(`method: optuna`) samples a queued trial's free parameters when a worker claims it.

On either storage (`storage`: SQLite or PostgreSQL) trials carry Optuna's heartbeat: a trial whose
worker stops beating for `heartbeat.grace` seconds is marked FAIL (never lost) and its run
folder's status "failed"; with `--retry-failed` its slot is queued again (at most `MAX_RETRIES`
times automatically), as are trials failed in earlier sessions. `tell` finishes a trial and
`mark_run_failed` makes a failed trial's run folder say so (both used by `trial` too).

Layers: this module (the study) ← `trial` (one trial as one run) ← `workers` (processes that
work the queue) ← `runner` (`run_sweep`, the entry point).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json
from imgclf.runs.layout import SUMMARY_JSON, RunFileError, RunFolder, read_json
from imgclf.sweep.space import base_tree, check_space, plan
from imgclf.sweep.spec import SweepConfig, default_storage, sweep_folder
from imgclf.sweep.storage import StudyLock, display_url, open_storage

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
        self._lock = StudyLock(url)  # re-entrant; a file or advisory lock

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
        with self._lock.held():
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
                with self._lock.held():
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
        with self._lock.held(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study or self.study())

    def fail_orphans(self, pid: int, why: str) -> list[int]:
        """A local worker process died: fail its RUNNING trials now, without waiting."""
        with self._lock.held():
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
                tags = RunFolder(path).summary().get("tags") or {}
            except (RunFileError, AttributeError):
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
        with self._lock.held():
            study = self.study()
            tried = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("key") == key]
            failed = sum(t.state == TrialState.FAIL for t in tried)
            if any(t.state in LIVE for t in tried) or failed > MAX_RETRIES:
                return
            attrs = {"key": key, "sweep": self.id, "retry_of": lost.number}
            study.enqueue_trial(dict(lost.params), user_attrs=attrs)


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
        epochs = [s["epochs"] for s in tree["train"]["stages"]]
        # `epochs: auto` is known only once a trial sees its data: Optuna learns the maximum
        # from the trials, as when the epochs are swept.
        epochs_swept = (
            any("epochs" in k for k in spec.parameters) or spec.method == "list" or "auto" in epochs
        )
        total = sum(int(e) for e in epochs if e != "auto")
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs,
            max_resource="auto" if epochs_swept else max(total, p.min_epochs),
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


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
    summary_path = Path(run) / SUMMARY_JSON
    try:
        summary = read_json(summary_path)
    except RunFileError:
        return
    status = summary.get("status")
    if status in ("running", "completed", "pruned"):
        if status != "running":
            reason = f"{reason} (the run had ended {status})"
        atomic_write_json(summary_path, {**summary, "status": "failed", "error": reason})
