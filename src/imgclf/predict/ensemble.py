"""Ensembles: several models voting over one label map.

Soft voting averages the members' probabilities (weighted when weights are given). Hard voting
counts each member's top-1 class as one (weighted) vote; classes tied on votes are separated by
their mean probability. Its output row is the vote share per class, with the winner nudged up by
1e-6 so that argmax names it even on a tie (the loss of a hard-voting ensemble is therefore
large wherever no member voted for the true class).

Members must share the label map: the same class names in the same order. Each member keeps its
own preprocessing, so an ensemble may mix input sizes (a member may itself be an ensemble or a
two-stage folder).

A saved ensemble is a run-like folder, `runs/<name>/`:

  ensemble.json  {"format": 1, "members": [paths relative to the folder's parent], "weights",
                 "vote", "labels"}
  model.json     {"format": 1, "kind": "ensemble", "labels", "definition": "ensemble.json",
                 "preprocessing" (only when every member resizes and crops alike)}
  config.yaml    how it was built ({"kind": "ensemble", "ensemble": {...}}; not a train config)
  data.json      the members' data.json when they all name the same manifest and data version
  summary.json   status "completed", model "ensemble[<member models>]", val / test metrics on
                 the members' shared split (when data.json exists), summed parameter counts
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_json, atomic_write_text
from imgclf.predict.predictor import (
    Predictions,
    Progress,
    load_predictor,
    merge_predictions,
    read_model_json,
    shared_preprocessing,
)
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
    read_json,
)

VOTES = ("soft", "hard")
FORMAT = 1
TIE_TOLERANCE = 1e-9  # vote shares closer than this are a tie (weights are floats)
TIE_NUDGE = 1e-6


def combine(probs: torch.Tensor, weights: torch.Tensor, vote: str = "soft") -> torch.Tensor:
    """Members' probabilities (M, N, C) → the ensemble's (N, C); traceable for ONNX export."""
    w = weights.to(probs.dtype).view(-1, 1, 1)
    total = w.sum()
    mean = (w * probs).sum(0) / total
    if vote == "soft":
        return mean
    classes = torch.arange(probs.shape[2], device=probs.device)
    ballots = (probs.argmax(2, keepdim=True) == classes).to(probs.dtype)  # one-hot top-1
    share = (w * ballots).sum(0) / total
    tied = share >= share.max(1, keepdim=True).values - TIE_TOLERANCE
    winner = torch.where(tied, mean, torch.full_like(mean, -1.0)).argmax(1, keepdim=True)
    nudged = share + TIE_NUDGE * (winner == classes).to(share.dtype)
    return nudged / nudged.sum(1, keepdim=True)


def check_labels(members: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """The shared label map of (name, labels) pairs; an error names the first difference."""
    first_name, first = members[0]
    for name, labels in members[1:]:
        if list(labels) == list(first):
            continue
        lacks = [n for n in first if n not in labels]
        adds = [n for n in labels if n not in first]
        if lacks or adds:
            detail = f"{name} lacks {lacks} and adds {adds} compared with {first_name}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(first, labels, strict=True)) if a != b)
            detail = (
                f"same classes in another order: position {i} is {first[i]!r} in {first_name} "
                f"but {labels[i]!r} in {name}"
            )
        raise ImgclfError(
            f"ensemble members must share the label map (same class names in the same order); "
            f"{detail}. Combine runs trained on the same manifest."
        )
    return list(first)


def parse_weights(text: str | Sequence[float] | None, n: int) -> list[float]:
    """`"1,2,1"` (or a list) → n non-negative floats with a positive sum; None → all 1."""
    if text is None:
        return [1.0] * n
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = [float(x) for x in items]
    except ValueError:
        raise ImgclfError(f"--weights {text!r}: give numbers separated by commas") from None
    if len(weights) != n:
        raise ImgclfError(f"--weights has {len(weights)} values for {n} members; give one each")
    if any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise ImgclfError(f"--weights {text!r}: weights must be ≥ 0 with a positive sum")
    return weights


class Ensemble:
    """Members (anything load_predictor returns) voting over their shared label map."""

    def __init__(
        self,
        members: Sequence,
        names: Sequence[str],
        weights: Sequence[float] | str | None = None,
        vote: str = "soft",
    ) -> None:
        if vote not in VOTES:
            raise ImgclfError(f"unknown vote {vote!r}; choose one of {', '.join(VOTES)}")
        if not members:
            raise ImgclfError("an ensemble needs at least one member")
        self.members, self.names, self.vote = list(members), [str(n) for n in names], vote
        self.labels = check_labels(list(zip(self.names, (m.labels for m in members), strict=True)))
        self.weights = parse_weights(weights, len(members))
        self.preprocessing = shared_preprocessing(self.members)
        self.device = getattr(members[0], "device", "cpu")

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[str | Path],
        weights: Sequence[float] | str | None = None,
        vote: str = "soft",
        device: str = "cpu",
    ) -> Ensemble:
        """An on-the-fly ensemble of run-like folders."""
        return cls([load_predictor(r, device) for r in runs], [str(r) for r in runs], weights, vote)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Ensemble:
        """A saved ensemble folder; member paths are relative to the folder's parent."""
        folder = Path(folder)
        spec = read_definition(folder / ENSEMBLE_JSON, ("members", "vote"))
        runs = [folder.parent / m for m in spec["members"]]
        missing = [str(r) for r in runs if not (r / MODEL_JSON).is_file()]
        if missing:
            raise ImgclfError(
                f"{folder / ENSEMBLE_JSON} lists members that are missing: {missing}; restore "
                f"them, or rebuild the ensemble with `imgclf ensemble RUN... --name {folder.name}`"
            )
        ens = cls.from_runs(runs, spec.get("weights"), spec["vote"], device)
        if spec.get("labels") and list(spec["labels"]) != ens.labels:
            raise ImgclfError(
                f"{folder / ENSEMBLE_JSON}: the members' label map changed since the ensemble "
                f"was saved ({spec['labels']} → {ens.labels}); rebuild it"
            )
        return ens

    def _weights(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float32)

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int = 0,
        tta: str | None = None,
        progress: Progress | None = None,
    ) -> Predictions:
        """Each member reads the files with its own preprocessing; then the vote."""
        share = None if progress is None else (lambda n: progress(n / len(self.members)))
        parts = [m.predict_paths(paths, batch_size, workers, tta, share) for m in self.members]
        ok, errors, aligned = merge_predictions(paths, parts)
        if ok:
            probs = combine(torch.stack(aligned), self._weights(), self.vote)
        else:
            probs = torch.empty(0, len(self.labels))
        return Predictions([str(p) for p in paths], probs, ok, errors)

    def predict_images(self, images: Sequence, tta: str | None = None) -> torch.Tensor:
        """Probabilities for decoded RGB PIL images."""
        stacked = torch.stack([m.predict_images(images, tta) for m in self.members])
        return combine(stacked, self._weights(), self.vote)

    def probability_module(self) -> nn.Module:
        """One module for every member (they must resize and crop alike): what export traces."""
        if self.preprocessing is None:
            raise ImgclfError(
                "the ensemble's members use different input sizes, interpolations or crops, so "
                "one ONNX input cannot feed them all; export the members separately"
            )
        modules = [m.probability_module() for m in self.members]
        return EnsembleModule(modules, self.weights, self.vote)


class EnsembleModule(nn.Module):
    """Members' probability modules on one input, combined by `combine`."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], vote: str) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.vote = vote
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(torch.stack([m(x) for m in self.members]), self.weights, self.vote)


def read_definition(path: Path, required: Sequence[str]) -> dict:
    """ensemble.json / two_stage.json, with the keys named in errors."""
    spec = read_json(path)
    missing = [k for k in required if k not in spec]
    if missing:
        raise ImgclfError(f"{path} lacks the keys {missing}")
    if spec.get("format", FORMAT) > FORMAT:
        raise ImgclfError(f"{path} has format {spec['format']}; upgrade imgclf to read it")
    return spec


def save_ensemble(
    runs: Sequence[str | Path],
    name: str,
    *,
    vote: str = "soft",
    weights: Sequence[float] | str | None = None,
    runs_dir: str | Path = "runs",
    batch_size: int = 64,
    workers: int = 0,
) -> Path:
    """Check the members, score them together on their shared split, write `runs_dir/<name>/`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ImgclfError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    runs = [Path(r) for r in runs]
    for r in runs:
        if not is_model_folder(r):
            raise ImgclfError(f"{r} is not a run folder (no {MODEL_JSON}); give finished runs")
    ens = Ensemble.from_runs(runs, weights, vote)
    folder = Path(runs_dir) / name
    data = shared_data_json(runs)
    metrics = split_metrics(ens, data, runs[0], batch_size, workers) if data else {}
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
# Shared with two_stage.py: the parts of a run-like folder that are not a single training run.


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
    predictor, data: dict, run: Path, batch_size: int = 64, workers: int = 0
) -> dict[str, dict]:
    """Loss and accuracy of `predictor` on the val and test splits of data.json's manifest
    ({} when the manifest is gone: the folder is still written, without metrics)."""
    from imgclf.data.manifest import read_manifest
    from imgclf.train.loop import classification_metrics

    try:
        where = RunFolder(run).manifest_dir(data)
    except RunFileError:
        return {}
    manifest = read_manifest(where)
    out = {}
    for split in ("val", "test"):
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
