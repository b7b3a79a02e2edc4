"""Inference backends for the server: onnxruntime on an export folder (no torch anywhere on
that path), or the run's own PyTorch predictor when only a run folder is given."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from imgclf.errors import ImgclfError
from imgclf.geometry import resize_fields
from imgclf.predict.onnx_preprocess import preprocess
from imgclf.runs.layout import MODEL_JSON, MODEL_WEIGHTS, read_json

BACKENDS = ("auto", "onnx", "torch")
MODEL_ONNX = "model.onnx"
EXPORT_DIR = "export"
# What /model shows of an export's "onnx" section (source_run is a path on the exporting machine).
_ONNX_PUBLIC = ("input", "output", "dtype", "layout", "shape", "range", "normalisation", "opset")
_ONNX_PUBLIC += ("dynamic_batch", "sha256", "parity")


class Backend(Protocol):
    kind: str
    name: str
    labels: list[str]
    preprocessing: dict[str, Any] | None  # None: an ensemble whose members resize differently
    model_id: str

    def prepare(self, image: Image.Image) -> Any:
        """One decoded RGB image → what `predict_prepared` needs of it (the model's input, a
        few hundred KiB), so that the decoded image can be dropped at once
        (docs/RELIABILITY.md H9)."""
        ...

    def predict_prepared(self, inputs: Sequence[Any]) -> np.ndarray:
        """Outputs of `prepare` → probabilities, one row per image."""
        ...

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images → probabilities, one row per image."""
        ...

    def describe(self) -> dict[str, Any]:
        """What GET /model shows."""
        ...


def open_backend(path: str | Path, kind: str = "auto", threads: int | None = None) -> Backend:
    """The backend for a folder: onnx when an export is found (the folder or its export/)."""
    path = Path(path)
    if kind not in BACKENDS:
        raise ImgclfError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if not path.is_dir():
        raise ImgclfError(f"{path} is not a folder; give a run folder or an export folder")
    export = find_export(path)
    if kind == "onnx" or (kind == "auto" and export is not None):
        if export is None:
            raise ImgclfError(
                f"no {MODEL_ONNX} in {path} or {path / EXPORT_DIR}; "
                f"run `imgclf export {path} --format onnx` first, or use --backend torch"
            )
        return OnnxBackend(export, threads)
    if not (path / MODEL_JSON).is_file():
        raise ImgclfError(f"{path} has no {MODEL_JSON}: is it a finished run folder?")
    return TorchBackend(path)


def find_export(path: Path) -> Path | None:
    """The folder holding model.onnx + model.json: ``path`` itself or ``path/export``."""
    for folder in (path, path / EXPORT_DIR):
        if (folder / MODEL_ONNX).is_file() and (folder / MODEL_JSON).is_file():
            return folder
    return None


def read_model_json(folder: Path) -> dict[str, Any]:
    """model.json with its labels and preprocessing checked (errors name the file and key)."""
    where = folder / MODEL_JSON
    meta = read_json(where)
    for key in ("labels", "preprocessing"):
        if key not in meta:
            raise ImgclfError(f"{where} has no {key!r} key; re-run `imgclf export`")
    pre = meta["preprocessing"]
    missing = [k for k in ("input_size", "mean", "std") if k not in pre]
    if missing:
        raise ImgclfError(f"{where}: preprocessing lacks {missing}")
    try:
        resize_fields(pre)  # interpolation and crop_pct, checked as every path checks them
    except ImgclfError as e:
        raise ImgclfError(f"{where}: preprocessing: {e}") from None
    return meta


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def file_id(path: Path) -> str:
    """First 16 hex digits of the file's sha256: changes whenever the weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class OnnxBackend:
    """onnxruntime on an export folder (`imgclf export`): model.onnx takes 0..1 RGB NCHW from
    `onnx_preprocess` and normalises inside; its output is probabilities (older exports: logits)."""

    kind = "onnx"

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.meta = read_model_json(folder)
        self.labels = [str(x) for x in self.meta["labels"]]
        self.preprocessing = self.meta["preprocessing"]
        self.model_id = file_id(folder / MODEL_ONNX)
        self.name = folder.parent.name if folder.name == EXPORT_DIR else folder.name
        options = ort.SessionOptions()
        # Several requests run at once on their own threads: split the cores between them.
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(folder / MODEL_ONNX), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ImgclfError(f"cannot load {folder / MODEL_ONNX}: {e}") from None
        spec = self.session.get_inputs()[0]
        self.input_name = self.meta.get("onnx", {}).get("input", spec.name)
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.outputs_probabilities = self.meta.get("onnx", {}).get("output") == "probabilities"

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.preprocessing)

    def predict_prepared(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        x = np.ascontiguousarray(np.stack(inputs))
        step = self.fixed_batch or len(x)  # an export without --dynamic-batch takes N = 1
        feed = (x[i : i + step] for i in range(0, len(x), step))
        scores = np.concatenate([self.session.run(None, {self.input_name: b})[0] for b in feed])
        return scores.astype(np.float64) if self.outputs_probabilities else softmax(scores)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict_prepared([self.prepare(im) for im in images])

    def describe(self) -> dict[str, Any]:
        onnx = self.meta.get("onnx", {})
        public = {k: onnx[k] for k in _ONNX_PUBLIC if k in onnx}
        kind = self.meta.get("kind", "single")
        return {"backend": self.kind, "name": self.name, "kind": kind, "onnx": public}


class TorchBackend:
    """The folder's own PyTorch predictor (a run, ensemble or two-stage folder; needs torch)."""

    kind = "torch"

    def __init__(self, folder: Path) -> None:
        from imgclf.predict.predictor import load_predictor, read_model_json

        self._predictor = load_predictor(folder)
        meta = read_model_json(folder)
        self.labels = [str(x) for x in self._predictor.labels]
        pre = getattr(self._predictor, "preprocessing", None)
        # None for an ensemble whose members resize differently: each member does its own.
        self.preprocessing = pre.to_dict() if pre is not None else None
        self.model_kind = meta.get("kind", "single")
        weights = folder / meta.get("weights", MODEL_WEIGHTS)
        self.model_id = file_id(weights if weights.is_file() else folder / MODEL_JSON)
        self.name = folder.parent.name if folder.name == EXPORT_DIR else folder.name
        single = hasattr(self._predictor, "predict_tensor")
        self._transform = self._predictor.transform() if single else None

    def prepare(self, image: Image.Image) -> Any:
        # A single run: its eval transform's tensor. An ensemble or two-stage folder has no one
        # input (members may resize differently): its probabilities, one image at a time.
        if self._transform is not None:
            return self._transform(image)
        return self._predictor.predict_images([image])[0]

    def predict_prepared(self, inputs: Sequence[Any]) -> np.ndarray:
        import torch

        stacked = torch.stack(list(inputs))
        if self._transform is not None:
            stacked = self._predictor.predict_tensor(stacked)
        return stacked.double().numpy()

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict_prepared([self.prepare(im) for im in images])

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "name": self.name, "kind": self.model_kind}


def default_threads(concurrency: int) -> int:
    """onnxruntime threads per inference so that ``concurrency`` of them share the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))
