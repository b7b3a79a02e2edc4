"""A sweep's results: its run folders, a table of trials, and one self-contained HTML page.

The page (`<runs>/sweeps/<id>/report.html`) shows the best trial, the metric per trial, the
metric against each parameter, the per-epoch curves the pruner saw, and parameter importances
(`optuna.importance.get_param_importances`, fANOVA, when ≥ 2 trials completed). Images are
inlined PNGs: the file has no external URL and can be mailed as it is. The study itself is a
standard Optuna storage, so `optuna-dashboard <storage URL>` works on it too.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_text
from imgclf.runs.layout import RunFileError, RunFolder
from imgclf.sweep.spec import SWEEPS_DIR, default_storage, sweep_folder
from imgclf.sweep.storage import display_url, open_storage


def sweep_runs(runs_dir: str | Path, sweep_id: str) -> list[Path]:
    """The run folders under `runs_dir` tagged with this sweep, in trial order."""
    runs_dir, found = Path(runs_dir), []
    if not runs_dir.is_dir():
        return []
    for path in runs_dir.iterdir():
        if path.name == SWEEPS_DIR or path.name.startswith(".") or not path.is_dir():
            continue
        try:
            tags = RunFolder(path).summary().get("tags") or {}
        except RunFileError:
            continue
        if tags.get("sweep") == sweep_id:
            trial = str(tags.get("trial", ""))
            found.append((int(trial) if trial.isdigit() else math.inf, path.name, path))
    return [p for *_, p in sorted(found)]


def open_study(sweep_id: str, runs_dir: str | Path = "runs", storage: str | None = None):
    """Load a sweep's study: `storage`, else the one recorded in `<runs>/sweeps/<id>/sweep.json`,
    else the default SQLite file there."""
    record = sweep_folder(runs_dir, sweep_id) / "sweep.json"
    if storage is None and record.is_file():
        storage = json.loads(record.read_text()).get("storage")
        if storage and "***" in storage:
            raise ImgclfError(
                f"{record} names {storage} without its password; pass --storage URL "
                "(or set IMGCLF_SWEEP_STORAGE, or PGPASSWORD for PostgreSQL)"
            )
    if storage is None:
        if not (sweep_folder(runs_dir, sweep_id) / "study.db").is_file():
            raise ImgclfError(
                f"no sweep {sweep_id} under {Path(runs_dir) / SWEEPS_DIR}; "
                "run `imgclf sweep FILE` first, or pass --runs-dir / --storage"
            )
        storage = default_storage(runs_dir, sweep_id)
    try:
        return optuna.load_study(study_name=sweep_id, storage=open_storage(storage))
    except KeyError:
        raise ImgclfError(f"no sweep {sweep_id} in {display_url(storage)}") from None


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain row per trial: number, key, state, value, params, run folder, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            {
                "number": t.number,
                "key": t.user_attrs.get("key", ""),
                "state": t.state.name,
                "value": t.value if t.state != TrialState.PRUNED else _last(t),
                # a queued trial's fixed params show before it runs
                "params": dict(t.params or t.system_attrs.get("fixed_params") or {}),
                "run": t.user_attrs.get("run", ""),
                "run_id": t.user_attrs.get("run_id", ""),
                "error": t.user_attrs.get("error") or _why_failed(t),
                "seconds": round(seconds, 1) if seconds is not None else None,
            }
        )
    return rows


def _last(t: FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def _why_failed(t: FrozenTrial) -> str:
    if t.state != TrialState.FAIL:
        return ""
    twin = t.user_attrs.get("duplicate_of")
    if twin is not None:
        return f"duplicate of trial {twin} (not run)"
    return "its worker stopped (no heartbeat)"  # every other failure records its error


def write_sweep_report(
    sweep_id: str, runs_dir: str | Path = "runs", storage: str | None = None
) -> Path:
    """Write `<runs>/sweeps/<id>/report.html` for a sweep and return its path."""
    study = open_study(sweep_id, runs_dir, storage)
    folder = sweep_folder(runs_dir, sweep_id)
    metric = study.user_attrs.get("metric", "value")
    rows = trial_rows(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    importances, note = _importances(study, complete)
    page = _render(
        sweep_id=sweep_id,
        method=study.user_attrs.get("method", ""),
        metric=metric,
        direction=study.direction.name.lower(),
        counts={s.name: sum(r["state"] == s.name for r in rows) for s in TrialState},
        best=best,
        rows=rows,
        folder=folder,
        images=_figures(study, metric, importances),
        importance_note=note,
    )
    path = folder / "report.html"
    atomic_write_text(path, page)
    return path


def _importances(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict, str]:
    if len(complete) < 2:
        return {}, "parameter importances need at least 2 completed trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as e:
        return {}, f"parameter importances unavailable: {e}"
    if len(found) < 2:
        return {}, "parameter importances need at least 2 parameters that vary"
    return {k: float(v) for k, v in found.items()}, ""


def _figures(study: optuna.Study, metric: str, importances: dict) -> dict[str, str]:
    """Name → base64 PNG of every plot the page shows."""
    import matplotlib

    matplotlib.use("Agg")
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.params]
    images = {}
    if trials:
        images["history"] = _png(_plot_history(study, trials, metric))
        images["curves"] = _png(_plot_curves(trials, metric))
        images["params"] = _png(_plot_params(trials, metric))
    if importances:
        images["importances"] = _png(_plot_importances(importances))
    return images


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _value(t: FrozenTrial) -> float | None:
    return t.value if t.value is not None else _last(t)


def _plot_history(study: optuna.Study, trials: list[FrozenTrial], metric: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        pts = [(t.number, _value(t)) for t in trials if t.state == state and _value(t) is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=state.name.lower())
    done = sorted((t.number, t.value) for t in trials if t.state == TrialState.COMPLETE)
    if done:
        pick = max if study.direction.name == "MAXIMIZE" else min
        best = [pick(v for _, v in done[: i + 1]) for i in range(len(done))]
        ax.step([n for n, _ in done], best, where="post", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return fig


def _plot_curves(trials: list[FrozenTrial], metric: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            style = "--" if t.state == TrialState.PRUNED else "-"
            values = [t.intermediate_values[s] for s in steps]
            ax.plot(steps, values, style, marker=".", label=f"{t.number}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if len(trials) <= 12:
        ax.legend(fontsize=7, title="trial (dashed: pruned)", title_fontsize=7, ncol=2)
    return fig


def _plot_params(trials: list[FrozenTrial], metric: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = sorted({n for t in trials for n in t.params})
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(t, _value(t)) for t in trials if name in t.params and _value(t) is not None]
        dist = next((t.distributions[name] for t, _ in pts), None)
        if isinstance(dist, CategoricalDistribution):
            labels = [str(c) for c in dist.choices]
            xs = [labels.index(str(t.params[name])) for t, _ in pts]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [t.params[name] for t, _ in pts]
            if isinstance(dist, FloatDistribution | IntDistribution) and dist.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: readable
        colors = ["tab:red" if t.state == TrialState.PRUNED else "tab:blue" for t, _ in pts]
        ax.scatter(xs, [v for _, v in pts], c=colors, s=18)
        ax.set_title(name, fontsize=8)
        ax.set_ylabel(metric, fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _plot_importances(importances: dict[str, float]):
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    return fig


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sweep {{ sweep_id }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}.COMPLETE{color:#060}.PRUNED{color:#a60}.FAIL{color:#b00}
img{max-width:100%}code{font-size:12px}
</style></head><body>
<h1>Sweep {{ sweep_id }}</h1>
<p>method <b>{{ method }}</b> · {{ direction }} <b>{{ metric }}</b> ·
{% for k, v in counts.items() if v %}{{ v }} {{ k|lower }}{{ " · " if not loop.last }}{% endfor %}
· generated {{ now }}</p>
{% if best %}<h2>Best trial: {{ best.number }} — {{ metric }} {{ "%.4f"|format(best.value) }}</h2>
<ul>{% for k, v in best.params.items() %}<li><code>{{ k }}</code> = {{ fmt(v) }}</li>{% endfor %}
<li>run: {{ link(best.user_attrs.get("run", "")) }}</li></ul>
{% else %}<p>No trial has completed yet.</p>{% endif %}
{% if images.history %}<h2>{{ metric }} per trial</h2>
<img alt="history" src="data:image/png;base64,{{ images.history }}">{% endif %}
{% if images.params %}<h2>{{ metric }} against each parameter</h2>
<p>red: pruned (last value before pruning)</p>
<img alt="parameters" src="data:image/png;base64,{{ images.params }}">{% endif %}
<h2>Parameter importances</h2>
{% if images.importances %}
<img alt="importances" src="data:image/png;base64,{{ images.importances }}">
{% else %}<p>{{ importance_note }}</p>{% endif %}
{% if images.curves %}<h2>{{ metric }} per epoch</h2>
<img alt="curves" src="data:image/png;base64,{{ images.curves }}">{% endif %}
<h2>Trials</h2>
<table><tr><th>#</th><th>key</th><th>state</th><th>{{ metric }}</th><th>parameters</th>
<th>seconds</th><th>run</th><th>error</th></tr>
{% for r in rows %}<tr><td>{{ r.number }}</td><td>{{ r.key }}</td>
<td class="{{ r.state }}">{{ r.state|lower }}</td>
<td>{{ "%.4f"|format(r.value) if r.value is not none else "" }}</td>
<td>{% for k, v in r.params.items() %}<code>{{ k }}={{ fmt(v) }}</code><br>{% endfor %}</td>
<td>{{ r.seconds if r.seconds is not none else "" }}</td><td>{{ link(r.run) }}</td>
<td>{{ r.error }}</td></tr>{% endfor %}
</table></body></html>
"""


def _render(folder: Path, **context: Any) -> str:
    import os

    from jinja2 import Environment
    from markupsafe import Markup, escape

    def link(run: str) -> Markup:
        """Relative link to a run folder (its report.html when there is one)."""
        if not run:
            return Markup("")
        target = Path(run) / "report.html" if (Path(run) / "report.html").is_file() else Path(run)
        try:
            href = os.path.relpath(target, folder.resolve())
        except ValueError:  # another drive
            href = str(target)
        return Markup(f'<a href="{escape(href)}">{escape(Path(run).name)}</a>')

    env = Environment(autoescape=True)
    now = time.strftime("%Y-%m-%d %H:%M")
    return env.from_string(_PAGE).render(**context, link=link, fmt=_fmt, now=now)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
