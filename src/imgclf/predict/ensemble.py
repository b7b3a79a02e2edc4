"""Ensembles: several models voting over one label map.

Soft voting averages the members' probabilities (weighted when weights are given). Hard voting
counts each member's top-1 class as one (weighted) vote; classes tied on votes are separated by
their mean probability. Its output row is the vote share per class, with the winner nudged up by
1e-6 so that argmax names it even on a tie (the loss of a hard-voting ensemble is therefore
large wherever no member voted for the true class).

Members must share the label map: the same class names in the same order. Each member keeps its
own preprocessing, so an ensemble may mix input sizes (a member may itself be an ensemble or a
two-stage folder).

A saved ensemble is a run-like folder, `runs/<name>/` (written by
`imgclf.workflows.ensemble.save_ensemble`, which scores it on the members' split):

  (files: docs/ARCHITECTURE.md, "Composite and export folders")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.predict.loading import read_definition, register_loader
from imgclf.predict.predictor import (
    Predictions,
    Progress,
    load_predictor,
    merge_predictions,
    shared_preprocessing,
)
from imgclf.runs.layout import ENSEMBLE, ENSEMBLE_JSON, MODEL_JSON

VOTES = ("soft", "hard")
FORMAT = 1  # of ensemble.json (read by loading.read_definition)
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


register_loader(ENSEMBLE, Ensemble.load)
