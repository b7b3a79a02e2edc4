"""Rebuild a trained model from its run folder alone (model.json + model.safetensors) and predict.

No training config, manifest or data is needed: the model carries its architecture, its
preprocessing and its label map. Test-time augmentation (`tta`): "flip" averages the image and
its mirror; "multi-crop" averages the centre and four corner crops of the eval resize.

`load_predictor(folder)` opens whatever a run-like folder holds, by model.json's `kind`: a single
run (no `kind`), an ensemble (`ensemble`, see ensemble.py) or a two-stage classifier
(`two_stage`, see two_stage.py), through the loader table of loading.py (each module registers
its kind; this one never imports the other two). All three answer the same calls: `.labels`,
`.predict_paths(paths, batch_size, workers, tta)`, `.predict_images(images, tta)`,
`.probability_module()` (0..1 RGB NCHW → probabilities, what ONNX export traces) and
`.preprocessing` (the resize / crop shared by every member, or None when members differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.data.images import DEFAULT_MIN_SIDE, load_image
from imgclf.data.loaders import PathsDataset, make_loader
from imgclf.data.transforms import eval_transform, multicrop_transform
from imgclf.errors import ImgclfError
from imgclf.files import unusable_name
from imgclf.models import Preprocessing, default_channels_last, model_from_spec
from imgclf.predict.loading import loader_for, register_loader
from imgclf.runs.checkpoint import load_state_strict, load_weights
from imgclf.runs.layout import (
    DEFINITIONS,
    ENSEMBLE,
    KINDS,
    MODEL_JSON,
    MODEL_WEIGHTS,
    SINGLE,
    RunFileError,
    RunFolder,
)

TTA_MODES = (None, "flip", "multi-crop")
Progress = Callable[[float], None]  # called with the number of files a batch finished


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
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        self.model = model.to(device).eval()
        # The layout training runs in is faster to predict in too (2-core CPU, fp32, Lite0 at
        # 224 px: 1.4-2.1x the images/s at batches of 1, 8 and 32; Lite2 at 260 px: 1.0-1.8x);
        # the values are the same up to summation order, so the ONNX parity check holds.
        self.channels_last = default_channels_last(torch.device(device).type)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocessing = preprocessing
        self.labels = labels
        self.device = device
        self.min_side = min_side  # smaller images are refused, as scan refused them

    @classmethod
    def from_run(cls, run: str | Path, device: str = "cpu") -> Predictor:
        """A run folder (or an export folder) with model.json and its weights."""
        run = Path(run)
        meta = read_model_json(run)
        if meta.get("kind", SINGLE) != SINGLE:
            raise ImgclfError(f"{run} holds a {meta['kind']} model; open it with load_predictor")
        model = model_from_spec(meta["spec"])
        weights = run / meta.get("weights", MODEL_WEIGHTS)
        load_state_strict(model, load_weights(weights), weights)
        pre = Preprocessing.from_dict(meta["preprocessing"])
        return cls(model, pre, meta["labels"], device, min_side=scan_min_side(run))

    def transform(self, tta: str | None = None):
        """The per-image transform for a TTA mode (multi-crop yields a stack of views)."""
        if tta not in TTA_MODES:
            raise ImgclfError(f"unknown tta {tta!r}; choose one of flip, multi-crop")
        make = multicrop_transform if tta == "multi-crop" else eval_transform
        return make(self.preprocessing)

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
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.softmax(self.model(x).float(), dim=1).cpu()

    def predict_images(self, images: Sequence, tta: str | None = None) -> torch.Tensor:
        """Probabilities for decoded RGB PIL images (already through the image loader)."""
        tf = self.transform(tta)
        return self.predict_tensor(torch.stack([tf(im) for im in images]), tta)

    def predict(self, images: Sequence, tta: str | None = None) -> torch.Tensor:
        """Probabilities for PIL images, paths or bytes (files go through the image loader)."""
        loaded = as_images(images, self.preprocessing.input_size, self.min_side)
        return self.predict_images(loaded, tta)

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int = 0,
        tta: str | None = None,
        progress: Progress | None = None,
    ) -> Predictions:
        """Files → probabilities; unreadable files are reported per index, never fatal.

        A name that is not valid UTF-8 (or holds a carriage return) is refused unread, as scan
        refuses it (docs/RELIABILITY.md 31).
        """
        names = [str(p) for p in paths]
        errors = {i: why for i, name in enumerate(names) if (why := unusable_name(name))}
        if progress is not None and errors:
            progress(len(errors))
        keep = [i for i in range(len(names)) if i not in errors]  # dataset index → path index
        size = self.preprocessing.input_size
        # Scan's minimum side (RELIABILITY 12): what scan refused is refused here too.
        ds = PathsDataset(
            [names[i] for i in keep], self.transform(tta), size_hint=size, min_side=self.min_side
        )
        probs, ok = [], []
        for batch in make_loader(ds, batch_size, workers=workers):
            errors.update({keep[b.index]: b.reason for b in batch["bad"]})
            if batch["x"] is not None:
                probs.append(self.predict_tensor(batch["x"], tta))
                ok.extend(keep[i] for i in batch["index"].tolist())
            if progress is not None:
                progress(len(batch["bad"]) + (0 if batch["x"] is None else len(batch["x"])))
        stacked = torch.cat(probs) if probs else torch.empty(0, len(self.labels))
        return Predictions(names, stacked, ok, errors)

    def probability_module(self) -> nn.Module:
        """A module from float RGB 0..1 NCHW at input_size to probabilities (normalises inside)."""
        return NormalisedSoftmax(self.model, self.preprocessing)


class NormalisedSoftmax(nn.Module):
    """(x - mean) / std → model → softmax: the whole eval path after resize and crop."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model((x - self.mean) / self.std).float(), dim=1)


def as_images(
    items: Sequence, size_hint: int | None = None, min_side: int = DEFAULT_MIN_SIDE
) -> list:
    """PIL images pass through; paths and bytes are opened with the one image loader."""
    from PIL import Image

    kw = {"size_hint": size_hint, "min_side": min_side}
    return [im if isinstance(im, Image.Image) else load_image(im, **kw) for im in items]


def scan_min_side(run: str | Path) -> int:
    """The run's data.scan.min_side (from config.yaml), else scan's default: an image smaller
    than the run's data allowed is refused at prediction too. Export folders use the default."""
    try:
        value = RunFolder(run).config()["data"]["scan"]["min_side"]
    except (RunFileError, KeyError, TypeError):
        return DEFAULT_MIN_SIDE
    return value if isinstance(value, int) and value >= 1 else DEFAULT_MIN_SIDE


def merge_predictions(paths: Sequence[str | Path], parts: Sequence[Predictions]):
    """Align several predictors' results on the same files: (ok, errors, [probs per part]).

    A file counts as predicted only when every part predicted it; its reason is the first
    part's reason.
    """
    errors: dict[int, str] = {}
    for part in parts:
        for i, reason in part.errors.items():
            errors.setdefault(i, reason)
    ok = sorted(set.intersection(*(set(p.ok) for p in parts)) - set(errors))
    aligned = []
    for part in parts:
        row_of = {i: r for r, i in enumerate(part.ok)}
        aligned.append(part.probs[[row_of[i] for i in ok]] if ok else part.probs[:0])
    return ok, errors, aligned


def shared_preprocessing(members: Sequence) -> Preprocessing | None:
    """The first member's preprocessing when every member resizes and crops alike, else None.

    Mean and std may differ: each member normalises its own input.
    """
    pres = [m.preprocessing for m in members]
    if any(p is None for p in pres):
        return None
    first = pres[0]
    same = all(p.geometry == first.geometry for p in pres)
    return first if same else None


def tta_warnings(folder: str | Path, tta: str | None) -> list[str]:
    """Flip TTA averages each image with its mirror: a model trained without horizontal flips
    (data.json augment hflip 0) never saw a mirrored image, and mirroring can cost accuracy
    (0.933 → 0.758 on one such run). One warning naming those runs, or none."""
    if tta != "flip":
        return []
    unflipped = [run for run in trained_runs(folder) if _hflip(run) == 0]
    if not unflipped:
        return []
    names = ", ".join(str(r) for r in unflipped[:5]) + (" …" if len(unflipped) > 5 else "")
    return [
        f"flip TTA mirrors every image, but {names} was trained without horizontal flips "
        "(augment hflip: 0 in data.json), so it never saw a mirrored image and mirroring can "
        "lower its accuracy; compare with no --tta (or use --tta multi-crop)"
    ]


def trained_runs(folder: str | Path) -> list[Path]:
    """The single runs behind a run-like folder: itself, an ensemble's members, a two-stage
    folder's stages (recursively); unreadable definitions give none."""
    run = RunFolder(folder)
    try:
        kind = read_model_json(folder).get("kind", SINGLE)
    except ImgclfError:
        return []
    if kind == SINGLE:
        return [run.path]
    try:
        spec = run.json(DEFINITIONS[kind])
        if kind == ENSEMBLE:  # members are relative to the ensemble folder's parent
            return [r for m in spec["members"] for r in trained_runs(run.path.parent / m)]
        parts = [spec["stage1"], *spec["stage2"].values()]
    except (RunFileError, KeyError, TypeError, AttributeError):
        return []
    return [r for part in parts for r in trained_runs(run.path / part)]


def _hflip(run: Path) -> float | None:
    """The run's resolved horizontal-flip probability (data.json), None when unknown."""
    try:
        value = RunFolder(run).data()["augment"]["hflip"]
    except (RunFileError, KeyError, TypeError):
        return None
    return value if isinstance(value, (int, float)) else None


def read_model_json(folder: str | Path) -> dict:
    """model.json of a run-like folder (errors name the file), its `kind` checked."""
    path = Path(folder) / MODEL_JSON
    meta = RunFolder(folder).model_spec()
    # is_model_folder (runs/layout.py) tells whether a folder holds one at all.
    kind = meta.get("kind", SINGLE)
    if kind not in KINDS:
        raise ImgclfError(f"{path}: unknown kind {kind!r}; this imgclf reads {', '.join(KINDS)}")
    return meta


def load_predictor(path: str | Path, device: str = "cpu"):
    """Whatever a run-like folder holds: a single run's Predictor, an Ensemble or a TwoStage,
    each with `.labels`, `.predict_paths`, `.predict_images` and `.probability_module`."""
    meta = read_model_json(path)
    kind = meta.get("kind", SINGLE)
    if kind != SINGLE and "onnx" in meta:
        raise ImgclfError(
            f"{path} is the ONNX export of a {kind} model: run it with onnxruntime "
            f"(`imgclf serve {path}`), or load the {kind} folder it came from"
        )
    return loader_for(kind)(path, device)  # the kind's module registered it (loading.py)


register_loader(SINGLE, Predictor.from_run)
