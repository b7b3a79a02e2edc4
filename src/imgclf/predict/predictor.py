"""Rebuild a trained model from its run folder alone (model.json + model.safetensors) and predict.

No training config, manifest or data is needed: the model carries its architecture, its
preprocessing and its label map.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from imgclf.data.loaders import PathsDataset, make_loader
from imgclf.data.transforms import eval_transform
from imgclf.errors import ImgclfError
from imgclf.models import Preprocessing, model_from_spec
from imgclf.runs.checkpoint import load_state_strict, load_weights
from imgclf.runs.record import MODEL_JSON


@dataclass
class Predictions:
    paths: list[str]
    probs: torch.Tensor  # rows aligned with `ok`
    ok: list[int]  # indices into paths that were predicted
    errors: dict[int, str]  # index → reason for files that could not be read


class Predictor:
    def __init__(
        self,
        model: torch.nn.Module,
        preprocessing: Preprocessing,
        labels: list[str],
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.preprocessing = preprocessing
        self.labels = labels
        self.device = device
        p = preprocessing
        self.transform = eval_transform(p.input_size, p.mean, p.std, p.interpolation, p.crop_pct)

    @classmethod
    def from_run(cls, run: str | Path, device: str = "cpu") -> Predictor:
        """A run folder (or an export folder) with model.json and its weights."""
        run = Path(run)
        try:
            meta = json.loads((run / MODEL_JSON).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ImgclfError(f"{run} has no {MODEL_JSON}: is it a finished run folder?") from None
        model = model_from_spec(meta["spec"])
        weights = run / meta.get("weights", "model.safetensors")
        load_state_strict(model, load_weights(weights), weights)
        return cls(model, Preprocessing.from_dict(meta["preprocessing"]), meta["labels"], device)

    @torch.inference_mode()
    def predict_paths(
        self, paths: Sequence[str | Path], batch_size: int = 64, workers: int = 0
    ) -> Predictions:
        ds = PathsDataset(paths, self.transform, size_hint=self.preprocessing.input_size)
        probs, ok, errors = [], [], {}
        for batch in make_loader(ds, batch_size, workers=workers):
            errors.update({b.index: b.reason for b in batch["bad"]})
            if batch["x"] is None:
                continue
            logits = self.model(batch["x"].to(self.device))
            probs.append(F.softmax(logits.float(), dim=1).cpu())
            ok.extend(batch["index"].tolist())
        stacked = torch.cat(probs) if probs else torch.empty(0, len(self.labels))
        return Predictions([str(p) for p in paths], stacked, ok, errors)
