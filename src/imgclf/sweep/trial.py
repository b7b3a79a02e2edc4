"""One sweep trial as one ordinary run: `train()` on its config, its epochs feeding the pruner.

The run folder is recorded on the trial as soon as it exists (`RunFinder`), so a killed trial
still points at its run. A FAIL trial's run folder never says "completed" or "pruned"
(`study.mark_run_failed`), so the leaderboard agrees with the study even when a worker dies between
finishing its run and recording the result.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from imgclf.errors import ImgclfError
from imgclf.runs.layout import RunFileError, RunFolder
from imgclf.sweep.space import suggest, trial_config
from imgclf.sweep.study import Log, mark_run_failed, tell

if TYPE_CHECKING:
    from imgclf.sweep.study import Sweep


def run_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, log: Log) -> str:
    """One trial = one `train()` run; its epochs feed the pruner. Returns the outcome."""
    from imgclf.train.fit import Pruned
    from imgclf.workflows.training import train

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
    summary = RunFolder(path).summary()
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
                tags = RunFolder(candidate).summary().get("tags")
            except RunFileError:
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
