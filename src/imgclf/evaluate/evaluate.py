"""`imgclf evaluate`: score a run on its own split or a new labelled folder, into
runs/<id>/evaluations/<name>/, never touching what training wrote.

A new folder is read through the run's own label map (docs/RELIABILITY.md 24-25): its class
names must all be in the map (else an error naming them); map classes it lacks are a warning.
Files that cannot be read get a row with their status, never a crash.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import ImgclfError
from imgclf.evaluate import analysis
from imgclf.evaluate.metrics import MetricReport, compute_metrics
from imgclf.files import atomic_write_json, atomic_write_text
from imgclf.predict.output import write_csv
from imgclf.runs.layout import DATA_JSON, EVALUATIONS, RunFileError, RunFolder
from imgclf.runs.layout import EVALUATION_METRICS as METRICS_JSON  # written last: marks it done

SPLIT_NAMES = ("test", "val", "train")


@dataclass
class Sample:
    """One image to score: `path` relative to the source root, its true class name, its status."""

    path: str
    label: str
    status: str = "ok"


@dataclass
class Source:
    """What an evaluation reads: where the images are and what was noticed on the way."""

    kind: str  # split | data
    name: str  # default evaluation name
    description: dict[str, Any]
    root: Path
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    folder: Path
    record: dict[str, Any]  # the content of metrics.json


def evaluations_dir(run: Path) -> Path:
    return Path(run) / EVALUATIONS


def list_evaluations(run: Path) -> list[dict[str, Any]]:
    """The complete evaluations of a run (their metrics.json), oldest first."""
    found = []
    for path in sorted(evaluations_dir(run).glob(f"*/{METRICS_JSON}")):
        try:
            found.append(
                {**json.loads(path.read_text(encoding="utf-8")), "folder": str(path.parent)}
            )
        except (OSError, json.JSONDecodeError):
            continue  # a foreign or damaged folder: not an evaluation we can show
    return sorted(found, key=lambda r: r.get("created", ""))


def default_split(run: Path) -> str:
    """test when the run's data has a test split, else val."""
    split = _run_data(Path(run)).get("split") or {}
    has_test = any(counts.get("test") for counts in split.values())
    return "test" if has_test or not split else "val"


def split_source(run: Path, split: str) -> Source:
    """The run's own split, from the manifest named in its data.json."""
    if split not in SPLIT_NAMES:
        raise ImgclfError(f"unknown split {split!r}; choose test, val or train")
    from imgclf.data.manifest import read_manifest

    info = _run_data(run)
    manifest = read_manifest(RunFolder(run).manifest_dir(info))
    samples = [Sample(e.path, e.label) for e in manifest.split_entries(split)]
    if not samples:
        raise ImgclfError(
            f"the run's manifest {info['manifest']} has no {split!r} images; "
            f"try --split {'val' if split == 'test' else 'test'} or --data FOLDER"
        )
    warnings = []
    if info.get("data_hash") and manifest.data_hash() != info["data_hash"]:
        warnings.append(
            f"the manifest {info['manifest']} changed since training: the {split} split may now "
            "hold images the model trained on"
        )
    desc = {"kind": "split", "split": split, "manifest": info["manifest"]}
    return Source("split", split, desc, Path(manifest.root), samples, warnings)


def data_source(run: Path, data: Path, labels: list[str]) -> Source:
    """A labelled folder or CSV, scanned in memory (nothing written into it), its class names
    mapped through the run's label map."""
    from imgclf.config import ScanConfig
    from imgclf.data.scan import scan

    data = Path(data)
    if not (data.is_dir() or (data.is_file() and data.suffix.lower() in (".csv", ".tsv", ".txt"))):
        raise ImgclfError(f"--data {data}: expected a class-folder tree or a CSV of path,label")
    manifest = scan(data, ScanConfig(), progress=False)
    entries = [e for e in manifest.entries if e.status != "ignored"]
    check_class_names({e.label for e in entries if e.label}, labels, data)
    samples = [Sample(e.path, e.label, "ok" if e.ok else f"skipped: {e.reason}") for e in entries]
    present = Counter(e.label for e in entries if e.ok)
    missing = [name for name in labels if not present[name]]
    warnings = [f"scan: {err}" for err in manifest.errors]
    if missing:
        warnings.append(
            f"{len(missing)} of the run's {len(labels)} classes have no images in {data}: "
            f"{', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}"
        )
    warnings.extend(_training_overlap(run, {e.sha256 for e in entries if e.ok and e.sha256}))
    name = data.stem if data.is_file() else data.resolve().name
    name = f"data-{name}" if name in SPLIT_NAMES else name
    desc = {"kind": "data", "path": str(data.resolve())}
    return Source("data", name, desc, Path(manifest.root), samples, warnings, missing)


def evaluate_run(
    run: str | Path,
    split: str | None = None,
    data: str | Path | None = None,
    tta: str | None = None,
    name: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Predict, score and analyse; write runs/<id>/evaluations/<name>/ and return its record."""
    from imgclf.predict.predictor import load_predictor, tta_warnings

    run = Path(run)
    if not run.is_dir():
        raise ImgclfError(f"run folder {run} does not exist")
    if split and data:
        raise ImgclfError("give either --split or --data, not both")
    predictor = load_predictor(run)
    labels = list(predictor.labels)
    if data is not None:
        source = data_source(run, Path(data), labels)
    else:
        source = split_source(run, split or default_split(run))
        check_class_names({s.label for s in source.samples}, labels, source.description["manifest"])
    source.warnings.extend(tta_warnings(run, tta))
    folder = evaluations_dir(run) / _evaluation_name(name, source.name, tta)
    ok = [i for i, s in enumerate(source.samples) if s.status == "ok"]
    t0 = time.perf_counter()
    paths = [source.root / source.samples[i].path for i in ok]
    with _progress_bar(len(paths), progress) as advance:
        preds = predictor.predict_paths(paths, batch_size, workers, tta, progress=advance)
    seconds = time.perf_counter() - t0
    for k, reason in preds.errors.items():
        source.samples[ok[k]].status = f"error: {reason}"
    scored = [ok[k] for k in preds.ok]
    if not scored:
        _write_predictions(folder, source.samples, {}, None, labels)
        raise ImgclfError(
            f"none of the {len(source.samples)} images could be read; see "
            f"{folder / 'predictions.csv'} for the reason per file"
        )
    probs = preds.probs.double().numpy()
    targets = np.array([labels.index(source.samples[i].label) for i in scored])
    report = compute_metrics(probs, targets, labels)
    rows = {i: r for r, i in enumerate(scored)}
    _write_predictions(folder, source.samples, rows, probs, labels)
    record = _write_analysis(folder, run, source, report, probs, targets, scored, labels)
    record.update(
        {
            "tta": tta,
            "seconds": round(seconds, 3),
            "images_per_s": round(len(scored) / max(seconds, 1e-9), 1),
        }
    )
    atomic_write_json(folder / METRICS_JSON, record)
    return Evaluation(folder, record)


def _write_analysis(folder, run, source, report: MetricReport, probs, targets, scored, labels):
    paths = [source.samples[i].path for i in scored]
    order = analysis.cluster_order(report.confusion_normalised)
    groups = analysis.confusion_groups(report.confusion_normalised, labels)
    _write_csv(folder / "per_class.csv", report.per_class)
    confusion = [
        {"true \\ predicted": n, **dict(zip(labels, map(int, row), strict=True))}
        for n, row in zip(labels, report.confusion, strict=True)
    ]
    _write_csv(folder / "confusion.csv", confusion)
    atomic_write_json(folder / "confusion_groups.json", groups)
    _write_csv(
        folder / "most_wrong.csv",
        analysis.most_wrong(paths, probs, targets, labels),
        ["path", "true", "predicted", "probability", "p_true"],
    )
    _write_csv(
        folder / "label_issues.csv",
        analysis.label_issues(paths, probs, targets, labels),
        ["path", "given", "suggested", "p_given", "p_suggested", "threshold_given", "margin"],
    )
    analysis.write_figures(folder, report, order, labels)
    try:
        summary = RunFolder(run).summary()
    except RunFileError:
        summary = {}
    history = RunFolder(run).metrics()
    statuses = Counter(s.status.split(":")[0] for s in source.samples)
    metrics = _finite(report.summary)
    return {
        "run_id": run.name,
        "name": folder.name,
        "source": source.description,
        "root": str(source.root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "labels": labels,
        "images": {"total": len(source.samples), "evaluated": len(scored), **statuses},
        "warnings": source.warnings,
        "missing_classes": source.missing_classes,
        "metrics": metrics,
        "calibration": {"ece": metrics["ece"], "bins": report.reliability},
        "overfitting": analysis.overfitting(history, (summary.get("best") or {}).get("epoch")),
        "confusion_groups": groups,
        "cluster_order": [labels[i] for i in order],
    }


def _write_predictions(folder: Path, samples, rows: dict[int, int], probs, labels) -> None:
    """One row per image: path, true label, prediction, confidence, status, p_<class>…"""
    head = ["path", "label", "predicted", "confidence", "p_true", "loss", "correct", "status"]
    out = []
    for i, s in enumerate(samples):
        row = {"path": s.path, "label": s.label, "status": s.status}
        if i in rows:
            p = [float(v) for v in probs[rows[i]]]
            k, t = max(range(len(p)), key=p.__getitem__), labels.index(s.label)
            row.update(predicted=labels[k], confidence=p[k], p_true=p[t], status="ok")
            row.update(loss=-math.log(max(p[t], 1e-12)), correct=int(k == t))
            row.update({f"p_{n}": v for n, v in zip(labels, p, strict=True)})
        out.append(row)
    write_csv(folder / "predictions.csv", out, head + [f"p_{n}" for n in labels])


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns or list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(
        {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows
    )
    atomic_write_text(path, buf.getvalue())


def check_class_names(names: set[str], labels: list[str], where: object) -> None:
    """Every class name must be in the run's label map; the error names the strangers."""
    unknown = sorted(names - set(labels))
    if not unknown:
        return
    hints = []
    for n in unknown[:10]:
        near = difflib.get_close_matches(n, labels, n=1, cutoff=0.6)
        hints.append(f"{n!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise ImgclfError(
        f"{where} has {len(unknown)} class(es) the run was not trained on: {', '.join(hints)}"
        f"{' …' if len(unknown) > 10 else ''}; the run's label map is: {', '.join(labels[:30])}"
        f"{' …' if len(labels) > 30 else ''}. Rename or remove those folders (or CSV labels)."
    )


def _training_overlap(run: Path, hashes: set[str]) -> list[str]:
    """Warn when images of the evaluation folder are byte-identical to training images."""
    try:
        from imgclf.data.manifest import read_manifest

        manifest = read_manifest(RunFolder(run).manifest_dir())
    except (ImgclfError, KeyError, OSError, ValueError):
        return []
    seen = {e.sha256 for e in manifest.split_entries("train")}
    n = len(hashes & seen)
    return [f"{n} image(s) are identical to images the run was trained on"] if n else []


def _run_data(run: Path) -> dict:
    """data.json: which manifest, data version and split the run was trained on."""
    if not (run / DATA_JSON).is_file():
        raise ImgclfError(
            f"{run} has no {DATA_JSON} (an ensemble of runs trained on different data?), so it "
            "has no split of its own; evaluate a labelled folder with --data FOLDER"
        )
    return RunFolder(run).data()


@contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[float], None] | None]:
    if not show or not total:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("predicting", total=total)
        yield lambda n: bar.advance(task, n)


def _evaluation_name(name: str | None, default: str, tta: str | None) -> str:
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", default).strip("-.") or "data"
        name += f"-tta-{tta}" if tta else ""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ImgclfError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    return name


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: write null instead."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
