"""After training: predictions with the best weights, the curves plot and summary.json.

summary.json also carries `config`: the config values the leaderboard shows (model, weights,
resolved input size, batch size, stages, augmentation preset, imbalance), so listing runs reads
no YAML (`runs.leaderboard.shown_config`).

Predictions are made by the same `Predictor` that later rebuilds the run from its folder, so
`predictions/test.csv` is exactly what a copied run folder reproduces in a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imgclf.config import RunConfig, resolve
from imgclf.data.manifest import Manifest
from imgclf.data.preview import augmented_batch
from imgclf.errors import ImgclfError
from imgclf.models import Preprocessing
from imgclf.predict.output import write_csv
from imgclf.predict.predictor import Predictions, Predictor
from imgclf.progress import progress_bar
from imgclf.runs.layout import MODEL_JSON, MODEL_WEIGHTS, PLOTS, PREDICTIONS, SUMMARY_JSON
from imgclf.runs.leaderboard import shown_config
from imgclf.runs.plots import plot_curves
from imgclf.runs.record import RunDir
from imgclf.runs.tracking import mirror_run, tensorboard_log
from imgclf.train.fit import FitState
from imgclf.train.loop import classification_metrics


def finalize(
    run: RunDir,
    cfg: RunConfig,
    manifest: Manifest,
    state: FitState,
    seconds: float,
    log=print,
    error: str | None = None,
    progress: bool = False,
) -> dict:
    """Write predictions (when best weights exist), plots and the summary; return the summary."""
    summary = run.read_json(SUMMARY_JSON) if (run.path / SUMMARY_JSON).is_file() else {}
    metrics: dict[str, dict] = {}
    if (run.path / MODEL_WEIGHTS).is_file() and state.status in ("completed", "interrupted"):
        predictor = Predictor.from_run(run.path)
        for split in ("val", "test") if cfg.train.predict_test else ("val",):
            entries = manifest.split_entries(split)
            if entries:
                metrics[split] = _predict_split(run, predictor, manifest, split, cfg, progress)
    plot_curves(state.history, run.path / PLOTS / "curves.png", title=run.id)
    rows = state.history
    summary.update(
        {
            "run_id": run.id,
            "status": state.status,
            "tags": cfg.tags,
            "error": error,
            "model": cfg.model.name,
            "pretrained": cfg.model.pretrained,
            "best": state.best,
            "val": metrics.get("val", {}),
            "test": metrics.get("test", {}),
            "params": state.params or summary.get("params"),
            "epochs": len(rows),
            "train_seconds": round(seconds, 2),
            "images_per_s": round(sum(r["images_per_s"] for r in rows) / len(rows), 1)
            if rows
            else None,
            "bad_images": sum(r["bad_images"] for r in rows),
            "data_wait": state.data_wait or None,
            "warnings": state.warnings,
            "position": {"stage": state.stage, "epoch": state.epoch},
            "config": shown_config(resolve(cfg), _input_size(run)),
        }
    )
    run.write_json(SUMMARY_JSON, summary)
    if state.status != "running":  # the mirrors copy the finished folder, the source of truth
        if cfg.tracking.tensorboard:
            _tensorboard(run, cfg, manifest, state, log)
        mirror_run(run.path, cfg.tracking, cfg.runs_dir, log, progress=progress)
    test = summary["test"].get("test_accuracy")
    log(
        f"run {run.id}: {state.status}"
        + (f", test accuracy {test:.4f}" if test is not None else "")
    )
    return summary


def _input_size(run: RunDir):
    """The input size the model was built for (model.json), None when unreadable."""
    try:
        return run.read_json(MODEL_JSON)["preprocessing"]["input_size"]
    except (ImgclfError, KeyError, TypeError):
        return None


def _tensorboard(run: RunDir, cfg: RunConfig, manifest: Manifest, state: FitState, log) -> None:
    """Scalars, PR curves and a grid of augmented training samples, as the run saw them."""
    pre = Preprocessing.from_dict(run.read_json(MODEL_JSON)["preprocessing"])
    images = augmented_batch(
        manifest,
        cfg.train.augment,
        pre.input_size,
        pre.mean,
        pre.std,
        seed=cfg.seed,
        interpolation=pre.interpolation,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
    )
    tensorboard_log(run.path, state.history, images=images, mean=pre.mean, std=pre.std, log=log)


def _predict_split(
    run: RunDir,
    predictor: Predictor,
    manifest: Manifest,
    split: str,
    cfg: RunConfig,
    progress: bool = False,
) -> dict:
    entries = manifest.split_entries(split)
    paths = [Path(manifest.root) / e.path for e in entries]
    with progress_bar(f"predicting {split} with the best weights", len(paths), progress) as bar:
        preds = predictor.predict_paths(
            paths, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size, progress=bar
        )
    targets = torch.tensor([manifest.labels.index(entries[i].label) for i in preds.ok])
    write_predictions(
        run.path / PREDICTIONS / f"{split}.csv",
        preds,
        predictor.labels,
        [e.path for e in entries],
        [e.label for e in entries],
    )
    return classification_metrics(preds.probs, targets, split)


def write_predictions(
    path: Path,
    preds: Predictions,
    labels: list[str],
    rel_paths: list[str],
    true_labels: list[str] | None = None,
) -> None:
    """path, label, predicted, confidence, status, then one probability column per class."""
    cols = ["path", "label", "predicted", "confidence", "status", *(f"p_{n}" for n in labels)]
    row_of = {i: r for r, i in enumerate(preds.ok)}
    rows = []
    for i, rel in enumerate(rel_paths):
        row = {"path": rel, "label": true_labels[i] if true_labels else ""}
        if i in row_of:
            p = preds.probs[row_of[i]].tolist()
            k = max(range(len(p)), key=p.__getitem__)  # argmax, first of ties as torch's
            row.update(predicted=labels[k], confidence=p[k], status="ok")
            row.update({f"p_{n}": v for n, v in zip(labels, p, strict=True)})
        else:
            row["status"] = f"error: {preds.errors.get(i, 'unknown')}"
        rows.append(row)
    write_csv(path, rows, cols)
