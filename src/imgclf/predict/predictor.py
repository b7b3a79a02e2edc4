"""Rebuild a trained model from its run folder alone (model.json + model.safetensors) and predict.

No training config, manifest or data is needed: the model carries its architecture, its
preprocessing and its label map. Test-time augmentation (`tta`): "flip" averages the image and
its mirror; "multi-crop" averages the centre and four corner crops of the eval resize.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from imgclf.data.loaders import PathsDataset, make_loader
from imgclf.data.transforms import eval_transform, multicrop_transform
from imgclf.errors import ImgclfError
from imgclf.models import Preprocessing, model_from_spec
from imgclf.runs.checkpoint import load_state_strict, load_weights
from imgclf.runs.record import MODEL_JSON

TTA_MODES = (None, "flip", "multi-crop")


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

    def transform(self, tta: str | None = None):
        """The per-image transform for a TTA mode (multi-crop yields a stack of views)."""
        if tta not in TTA_MODES:
            raise ImgclfError(f"unknown tta {tta!r}; choose one of flip, multi-crop")
        p = self.preprocessing
        make = multicrop_transform if tta == "multi-crop" else eval_transform
        return make(p.input_size, p.mean, p.std, p.interpolation, p.crop_pct)

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Probabilities for a batch from `transform(tta)`: (N, C, H, W), or (N, V, C, H, W)."""
        x = x.to(self.device)
        if x.ndim == 5:  # several views per image: average their probabilities
            n, v = x.shape[:2]
            return self._probs(x.flatten(0, 1)).view(n, v, -1).mean(1)
        probs = self._probs(x)
        if tta == "flip":
            probs = (probs + self._probs(x.flip(-1))) / 2
        return probs

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model(x).float(), dim=1).cpu()

    def predict_images(self, images: Sequence, tta: str | None = None) -> torch.Tensor:
        """Probabilities for decoded RGB PIL images (already through the image loader)."""
        tf = self.transform(tta)
        return self.predict_tensor(torch.stack([tf(im) for im in images]), tta)

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int = 0,
        tta: str | None = None,
    ) -> Predictions:
        """Files → probabilities; unreadable files are reported per index, never fatal."""
        ds = PathsDataset(paths, self.transform(tta), size_hint=self.preprocessing.input_size)
        probs, ok, errors = [], [], {}
        for batch in make_loader(ds, batch_size, workers=workers):
            errors.update({b.index: b.reason for b in batch["bad"]})
            if batch["x"] is None:
                continue
            probs.append(self.predict_tensor(batch["x"], tta))
            ok.extend(batch["index"].tolist())
        stacked = torch.cat(probs) if probs else torch.empty(0, len(self.labels))
        return Predictions([str(p) for p in paths], stacked, ok, errors)


def load_predictor(path: str | Path, device: str = "cpu") -> Predictor:
    """Whatever a run-like folder holds (a single run today; ensembles and two-stage models
    register here), as an object with `.labels` and `.predict_paths` / `.predict_images`."""
    return Predictor.from_run(path, device)
