"""`imgclf report`: one self-contained HTML page per run, and a comparison page for several.

Self-contained means it opens from disk with no network: every image is inlined as a base64
data URI, the CSS is inline, there is no JavaScript, and a Content-Security-Policy forbids
loading anything else. Pages are rendered with jinja2 (autoescape on) and written atomically.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError
from imgclf.evaluate import analysis
from imgclf.evaluate.evaluate import evaluate_run, list_evaluations
from imgclf.files import atomic_write_text
from imgclf.runs.layout import (
    COMPARISON_JSON,
    CONFIG_YAML,
    DATA_JSON,
    ENVIRONMENT_JSON,
    METRICS_CSV,
    MODEL_JSON,
    PLOTS,
    SUMMARY_JSON,
    RunFileError,
    read_json,
    read_yaml,
)

REPORT_HTML = "report.html"
GALLERY = 12
THUMB = 128
TABLE_ROWS = 15
FIGURES = ("confusion", "confusion_normalised", "confusion_clustered", "reliability")
FIGURES += ("per_class_f1",)


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Render a run's page (evaluating it first when it has no evaluation) to RUN/report.html."""
    run = _run_folder(run)
    return atomic_write_text(Path(out) if out else run / REPORT_HTML, render_report(run))


def compare_runs(runs: Sequence[str | Path], out: str | Path | None = None, log=print) -> Path:
    """Render the comparison page of several runs (default reports/compare-<time>.html); runs
    trained on different data versions are a warning, in `log` and on the page."""
    folders = [_run_folder(r) for r in runs]
    warning = data_versions(folders)[1]
    if warning:
        log(f"warning: {warning}")
    out = Path(out) if out else Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html"
    return atomic_write_text(out, render_comparison(folders, out.parent))


def render_report(run: Path) -> str:
    """The HTML of one run's page."""
    summary, data = _json(run / SUMMARY_JSON), _json(run / DATA_JSON)
    evaluation, eval_error = primary_evaluation(run)
    split_totals: Counter[str] = Counter()
    for counts in (data.get("split") or {}).values():
        split_totals.update(counts)
    history = analysis.read_history(run / METRICS_CSV)
    ctx: dict[str, Any] = {
        "run_id": run.name,
        "train_time": training_time(summary, history),
        "summary": summary,
        "data": data,
        "split_totals": dict(split_totals),
        "model": _json(run / MODEL_JSON),
        "environment": _json(run / ENVIRONMENT_JSON),
        "curves": data_uri(run / PLOTS / "curves.png"),
        "config": _text(run / CONFIG_YAML),
        "evaluation": evaluation,
        "eval_error": eval_error,
        "others": [e for e in list_evaluations(run) if e["name"] != (evaluation or {}).get("name")],
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        # written by `imgclf two-stage --from-run`: the composite against its single-stage run
        "two_stage": _json(run / COMPARISON_JSON) if (run / COMPARISON_JSON).is_file() else None,
    }
    if evaluation:
        folder = Path(evaluation["folder"])
        ctx["figures"] = {name: data_uri(folder / f"{name}.png") for name in FIGURES}
        ctx["per_class"] = _csv(folder / "per_class.csv")
        ctx["most_wrong"] = _csv(folder / "most_wrong.csv")[:TABLE_ROWS]
        issues = _csv(folder / "label_issues.csv")
        ctx["label_issues"], ctx["label_issue_count"] = issues[:TABLE_ROWS], len(issues)
        ctx["gallery"] = top_loss_gallery(folder, Path(evaluation["root"]))
    return template("report.html").render(**ctx)


def training_time(summary: dict, history: list[dict[str, float]]) -> dict[str, Any]:
    """The training time a page shows: {"seconds", "note"}.

    summary.json's train_seconds adds up over resumes; in run folders written before it did, it
    covers only the last process's fit, so a resumed run (after kill -9 or Ctrl-C) could show
    0.0 s next to a real throughput. The epochs' own times in metrics.csv survive every resume,
    so their sum is shown whenever it is the larger.
    """
    recorded = summary.get("train_seconds")
    recorded = recorded if isinstance(recorded, (int, float)) else None
    times = [r.get("seconds", math.nan) for r in history]
    epochs = sum(t for t in times if math.isfinite(t))
    if not history or (recorded is not None and recorded >= epochs):
        return {"seconds": recorded, "note": None}
    note = "sum of the epoch times in metrics.csv"
    if recorded is not None:
        note += f"; summary.json's {recorded:.1f} s covers only the last process (resumed)"
    return {"seconds": epochs, "note": note}


def primary_evaluation(run: Path) -> tuple[dict | None, str | None]:
    """The evaluation a report shows: the run's test split, else val, else the newest; when
    there is none, `evaluate --split test` (or val) is run first. Returns (record, error)."""
    found = list_evaluations(run)
    if not found:
        try:
            evaluate_run(run)
        except ImgclfError as e:  # a failed run has no weights: the page still shows the rest
            return None, str(e)
        found = list_evaluations(run)

    def rank(e: dict) -> tuple:
        src = e.get("source", {})
        split = src.get("split") if src.get("kind") == "split" else None
        return (split == "test", split == "val", not e.get("tta"), e.get("created", ""))

    return max(found, key=rank), None


def top_loss_gallery(folder: Path, root: Path, k: int = GALLERY) -> list[dict[str, Any]]:
    """The k images with the highest loss, each with an inlined JPEG thumbnail."""
    rows = [r for r in _csv(folder / "predictions.csv") if r.get("status") == "ok"]
    rows.sort(key=lambda r: -float(r["loss"]))
    return [{**r, "thumb": thumbnail(root / r["path"])} for r in rows[:k]]


def thumbnail(path: Path, size: int = THUMB) -> str | None:
    """A data URI of a small JPEG made through the one image loader; None if unreadable."""
    from imgclf.data.images import load_image

    try:
        im = load_image(path, size_hint=size)
    except (ImgclfError, OSError):
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_uri(path: Path, mime: str = "image/png") -> str | None:
    """A file's bytes as a data URI (None when the file is missing)."""
    try:
        return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


# ---------------------------------------------------------------- comparison


def render_comparison(runs: list[Path], out_dir: Path) -> str:
    """The HTML of the comparison page of `runs` (the first is the baseline)."""
    entries = []
    for run in runs:
        evaluation, error = primary_evaluation(run)
        report = run / REPORT_HTML
        summary, history = _json(run / SUMMARY_JSON), analysis.read_history(run / METRICS_CSV)
        entries.append(
            {
                "id": run.name,
                "summary": summary,
                "evaluation": evaluation,
                "error": error,
                "history": history,
                "train_time": training_time(summary, history),
                "link": _relative(report, out_dir) if report.is_file() else None,
            }
        )
    configs = [_yaml(run / CONFIG_YAML) for run in runs]
    versions, data_warning = data_versions(runs)
    for entry, version in zip(entries, versions, strict=True):
        entry["data"] = version
    ctx = {
        "runs": entries,
        "data_warning": data_warning,
        "curves": _overlay_curves(entries),
        "f1_rows": f1_deltas(entries),
        "config_diff": config_differences(configs),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return template("compare.html").render(**ctx)


def data_versions(runs: Sequence[Path]) -> tuple[list[dict[str, Any]], str | None]:
    """Each run's data version (data.json: data_hash, manifest) and, when the runs were trained
    on more than one, a warning: their metrics come from different images."""
    versions = []
    for run in runs:
        data = _json(Path(run) / DATA_JSON)
        manifest = data.get("manifest")
        versions.append(
            {
                "hash": data.get("data_hash"),
                "short": (data.get("data_hash") or "")[:12] or None,
                "manifest": Path(manifest).name if manifest else None,
            }
        )
    known = list(dict.fromkeys(v["hash"] for v in versions if v["hash"]))
    unknown = [Path(r).name for r, v in zip(runs, versions, strict=True) if not v["hash"]]
    if len(known) < 2 and not (known and unknown):
        return versions, None
    parts = []
    for h in known:
        names = [Path(r).name for r, v in zip(runs, versions, strict=True) if v["hash"] == h]
        parts.append(f"{h[:12]} ({', '.join(names)})")
    if unknown:
        parts.append(f"unknown ({', '.join(unknown)})")
    return versions, (
        f"these runs were trained on {len(parts)} different data versions (data.json "
        f"data_hash): {'; '.join(parts)}. Their metrics come from different images and are not "
        "directly comparable; compare runs on one data version (see the data column)"
    )


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → {"a.b.c": value}; lists of mappings (stages) → "a[0].b"; other lists
    stay whole values."""
    if isinstance(config, list) and any(isinstance(v, dict) for v in config):
        out: dict[str, Any] = {f"{prefix}.length": len(config)}
        for i, value in enumerate(config):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    if not isinstance(config, dict):
        return {prefix: config}
    out = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(configs: list[dict]) -> list[dict[str, Any]]:
    """Keys whose values differ between configs: [{"key", "values": [str per config]}]."""
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            shown = ["—" if v is missing else json.dumps(v, ensure_ascii=False) for v in values]
            rows.append({"key": key, "values": shown})
    return rows


def f1_deltas(entries: list[dict]) -> list[dict[str, Any]]:
    """Per class: the first run's F1 and every other run's F1 minus it."""
    per_run = []
    for e in entries:
        ev = e["evaluation"]
        rows = _csv(Path(ev["folder"]) / "per_class.csv") if ev else []
        per_run.append({r["class"]: float(r["f1"]) for r in rows if int(r["support"])})
    classes = list(dict.fromkeys(c for scores in per_run for c in scores))
    out = []
    for c in classes:
        base = per_run[0].get(c)
        cells = []
        for scores in per_run[1:]:
            f1 = scores.get(c)
            cells.append({"f1": f1, "delta": None if f1 is None or base is None else f1 - base})
        out.append({"class": c, "base": base, "others": cells})
    return out


def _overlay_curves(entries: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(e["history"] for e in entries):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key in zip(axes, ("val_accuracy", "val_loss"), strict=True):
        for e in entries:
            points = [(r["epoch"], r.get(key, math.nan)) for r in e["history"]]
            if points:
                ax.plot(*zip(*points, strict=True), "-o", ms=3, label=e["id"][-40:])
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------- helpers


def template(name: str):
    from jinja2 import ChainableUndefined, Environment, FileSystemLoader

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=ChainableUndefined,  # a missing summary key shows as —, not a crash
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    return env.get_template(name)


def _num(value: Any, digits: int = 4) -> str:
    """Numbers for people: integers with thousands separators, others with fixed decimals."""
    from jinja2 import Undefined

    if value is None or value == "" or isinstance(value, Undefined):
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f}"


def _run_folder(run: str | Path) -> Path:
    run = Path(run)
    if not (run / CONFIG_YAML).is_file():
        raise ImgclfError(f"{run} is not a run folder (no {CONFIG_YAML})")
    return run


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _json(path: Path) -> dict:
    """What the page shows of a file: {} when it is missing or broken."""
    try:
        return read_json(path)
    except RunFileError:
        return {}


def _yaml(path: Path) -> dict:
    try:
        return read_yaml(path)
    except RunFileError:
        return {}


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []
