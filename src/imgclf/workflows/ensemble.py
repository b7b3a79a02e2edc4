"""Saving an ensemble: check the members, score them together on their shared split and write
the run-like folder that `imgclf.predict.ensemble.Ensemble.load` opens (its layout is described
in predict/ensemble.py). Also the composite-folder helpers two-stage training shares: the
exclusive folder, the members' shared data.json, val / test metrics, summed parameter counts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json, atomic_write_text
from imgclf.predict.ensemble import FORMAT, Ensemble
from imgclf.predict.predictor import read_model_json
from imgclf.runs.layout import (
    CONFIG_YAML,
    DATA_JSON,
    ENSEMBLE,
    ENSEMBLE_JSON,
    MODEL_JSON,
    SUMMARY_JSON,
    RunFileError,
    RunFolder,
    is_model_folder,
)


def save_ensemble(
    runs: Sequence[str | Path],
    name: str,
    *,
    vote: str = "soft",
    weights: Sequence[float] | str | None = None,
    runs_dir: str | Path = "runs",
    batch_size: int = 64,
    workers: int = 0,
    splits: Sequence[str] = ("val", "test"),
) -> Path:
    """Check the members, score them together on their shared split (the `splits` of it), write
    `runs_dir/<name>/`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ImgclfError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    runs = [Path(r) for r in runs]
    for r in runs:
        if not is_model_folder(r):
            raise ImgclfError(f"{r} is not a run folder (no {MODEL_JSON}); give finished runs")
    ens = Ensemble.from_runs(runs, weights, vote)
    folder = Path(runs_dir) / name
    data = shared_data_json(runs)
    metrics = split_metrics(ens, data, runs[0], batch_size, workers, splits) if data else {}
    create_folder(folder)
    base = folder.parent.resolve()
    members = [os.path.relpath(r.resolve(), base) for r in runs]
    definition = {
        "format": FORMAT,
        "members": members,
        "weights": ens.weights,
        "vote": vote,
        "labels": ens.labels,
    }
    atomic_write_json(folder / ENSEMBLE_JSON, definition)
    atomic_write_text(
        folder / CONFIG_YAML,
        yaml.safe_dump({"kind": ENSEMBLE, "ensemble": definition}, sort_keys=False),
    )
    if data:
        atomic_write_json(folder / DATA_JSON, data)
    models = [_member_model(r) for r in runs]
    summary = {
        "run_id": name,
        "kind": ENSEMBLE,
        "status": "completed",
        "error": None,
        "model": f"ensemble[{','.join(models)}]",
        "members": members,
        "vote": vote,
        "weights": ens.weights,
        "val": metrics.get("val", {}),
        "test": metrics.get("test", {}),
        "params": summed_params(runs),
        "config": {},  # the leaderboard's config values: none, this is not a training run
    }
    atomic_write_json(folder / SUMMARY_JSON, summary)
    meta = {"format": FORMAT, "kind": ENSEMBLE, "labels": ens.labels, "definition": ENSEMBLE_JSON}
    if ens.preprocessing is not None:
        meta["preprocessing"] = ens.preprocessing.to_dict()
    atomic_write_json(folder / MODEL_JSON, meta)  # last: marks a complete folder
    return folder


def _member_model(run: Path) -> str:
    meta = read_model_json(run)
    if meta.get("kind", "single") != "single":
        return meta["kind"]
    return str(meta.get("spec", {}).get("name", "?"))


# ---------------------------------------------------------------- composite folders
# Shared with two-stage training: the parts of a run-like folder that are not a single run.


def create_folder(folder: Path) -> Path:
    """Make the folder exclusively: an existing ensemble or run is never overwritten."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        raise ImgclfError(f"{folder} already exists; choose another --name") from None
    return folder


def shared_data_json(runs: Sequence[Path]) -> dict | None:
    """The members' data.json when all name the same manifest and data version, else None."""
    infos = []
    for r in runs:
        try:
            infos.append(RunFolder(r).data())
        except RunFileError:
            return None
    key = [(i.get("manifest"), i.get("data_hash")) for i in infos]
    if key[0][0] is None or any(k != key[0] for k in key):
        return None
    return infos[0]


def split_metrics(
    predictor,
    data: dict,
    run: Path,
    batch_size: int = 64,
    workers: int = 0,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, dict]:
    """Loss and accuracy of `predictor` on the `splits` of data.json's manifest ({} when the
    manifest is gone: the folder is still written, without metrics)."""
    from imgclf.data.manifest import read_manifest
    from imgclf.train.loop import classification_metrics

    try:
        where = RunFolder(run).manifest_dir(data)
    except RunFileError:
        return {}
    manifest = read_manifest(where)
    out = {}
    for split in splits:
        entries = manifest.split_entries(split)
        if not entries:
            continue
        paths = [Path(manifest.root) / e.path for e in entries]
        preds = predictor.predict_paths(paths, batch_size, workers)
        index = {n: i for i, n in enumerate(predictor.labels)}
        targets = torch.tensor([index[entries[i].label] for i in preds.ok], dtype=torch.long)
        out[split] = classification_metrics(preds.probs, targets, split)
    return out


def summed_params(runs: Sequence[Path]) -> dict | None:
    """Parameter counts added over the members' summary.json (None when one lacks them)."""
    total: dict[str, int] = {}
    for r in runs:
        try:
            params = RunFolder(r).summary()["params"]
        except (RunFileError, KeyError):
            return None
        if not isinstance(params, dict):
            return None
        for k, v in params.items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total
