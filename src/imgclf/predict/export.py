"""ONNX export of a run-like folder, refused unless onnxruntime agrees with PyTorch.

`imgclf export RUN --format onnx [--opset N] [--dynamic-batch] [-o OUT_DIR]` writes the export
folder (default `RUN/export/`), everything a server needs with no torch installed:

(its files: docs/ARCHITECTURE.md, "Composite and export folders")

model.json is written last and removed first, so a folder holding it is a complete export.
Ensembles and two-stage folders export as ONE graph when all their members resize and crop
alike (each member still normalises with its own mean / std); otherwise export the members.

Parity: sample images (the run's val, then test images when data.json's manifest is reachable,
else synthetic ones) go through the real PyTorch pipeline (`predict_images`: torchvision
transforms, the model, softmax) and through `onnx_preprocess` + onnxruntime; the maximum
absolute difference of the probabilities is printed and must be ≤ the tolerance (1e-4), or the
export is refused (ImgclfError, exit status 2) and nothing is written.

Exporter: `torch.onnx.export(..., dynamo=True)` (the torch ≥ 2.9 default, torch.export based),
opset 18 unless --opset says otherwise, weights embedded in the .onnx file (no external data).
`--exporter torchscript` uses the legacy tracer instead (deprecated by torch, about 7× faster
for EfficientNet-Lite0; the parity check applies the same way).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_bytes, atomic_write_json
from imgclf.predict.loading import read_definition
from imgclf.predict.onnx_preprocess import preprocess_batch
from imgclf.predict.predictor import load_predictor, read_model_json
from imgclf.runs.layout import ENSEMBLE, ENSEMBLE_JSON, MODEL_JSON, MODEL_WEIGHTS, RunFolder

EXPORT_DIR = "export"
MODEL_ONNX = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
SAMPLES = 16
FORMATS = ("onnx",)
EXPORTERS = ("dynamo", "torchscript")  # torch.export based (the default) or the legacy tracer


@dataclass
class ExportResult:
    folder: Path
    max_abs_diff: float
    images: int
    source: str  # val / test images, or synthetic


def export_onnx(
    run: str | Path,
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    tolerance: float = TOLERANCE,
    samples: int = SAMPLES,
    exporter: str = "dynamo",
    log=print,
) -> ExportResult:
    """Export, check parity, then write the export folder (nothing is written on failure)."""
    run = Path(run)
    out = Path(out) if out is not None else run / EXPORT_DIR
    predictor = load_predictor(run)
    module = predictor.probability_module().eval()
    pre = predictor.preprocessing.to_dict()
    data = onnx_bytes(module, pre["input_size"], opset, dynamic_batch, exporter)
    images, source = sample_images(run, pre["input_size"], samples)
    diff = parity(data, predictor, images, pre)
    log(
        f"parity on {len(images)} {source} images: max abs difference of probabilities "
        f"{diff:.2e} (tolerance {tolerance:g})"
    )
    _check(diff, tolerance, run)
    meta = {k: v for k, v in read_model_json(run).items() if k != "definition"}
    meta["preprocessing"] = pre
    meta["onnx"] = {
        "file": MODEL_ONNX,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "dtype": "float32",
        "layout": "NCHW",
        "shape": ["N" if dynamic_batch else 1, 3, pre["input_size"], pre["input_size"]],
        "range": "0..1 RGB after resize+center crop",
        "normalisation": "inside the graph",
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "exporter": f"torch.onnx {exporter} (torch {torch.__version__})",
        "sha256": hashlib.sha256(data).hexdigest(),
        "parity": {"max_abs_diff": diff, "tolerance": tolerance, "images": len(images)}
        | {"source": source},
        "source_run": str(run),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_JSON).unlink(missing_ok=True)  # the folder is incomplete from here on
    atomic_write_bytes(out / MODEL_ONNX, data)
    if meta.get("kind", "single") == "single":
        weights = meta.get("weights", MODEL_WEIGHTS)
        atomic_write_bytes(out / weights, (run / weights).read_bytes())
    atomic_write_json(out / MODEL_JSON, meta)
    return ExportResult(out, diff, len(images), source)


def export_model_or_members(folder: Path, out: Path, log=print) -> dict:
    """A run-like folder as ONNX in `out`: one graph (`export_onnx`); for an ensemble whose
    members resize or crop differently (Lite0 at 224 px with Lite1 at 240: one graph input
    cannot feed both), one parity-checked export per member in `out/<member>/` and
    `out/ensemble.json`, which says how to combine them (what `imgclf fit` ships). Returns
    {folder, parity} or {folder, members: [{folder, parity}]}."""
    if read_model_json(folder).get("kind") != ENSEMBLE or (
        load_predictor(folder).preprocessing is not None
    ):
        done = export_onnx(folder, out, log=log)
        return {"folder": str(done.folder), "parity": done.max_abs_diff}
    spec = read_definition(folder / ENSEMBLE_JSON, ("members", "vote"))
    members = []
    for name in spec["members"]:  # relative to the ensemble folder's parent
        done = export_onnx(folder.parent / name, out / name, log=log)
        members.append({"folder": name, "parity": done.max_abs_diff})
    atomic_write_json(
        out / ENSEMBLE_JSON,
        {
            "kind": ENSEMBLE,
            "vote": spec["vote"],
            "weights": spec.get("weights"),
            "labels": spec.get("labels"),
            "members": [m["folder"] for m in members],
            "how": "run each member's model.onnx on the image with that member's own "
            "preprocessing (its model.json), then combine the probabilities (in the order of "
            "'labels') by this vote with these weights: 'soft' is their weighted mean",
            "source": str(folder),
        },
    )
    return {"folder": str(out), "members": members}


def verify_export(
    folder: str | Path,
    run: str | Path | None = None,
    *,
    tolerance: float = TOLERANCE,
    samples: int = SAMPLES,
    log=print,
) -> float:
    """Re-run the parity check of an existing export folder against its run."""
    folder = Path(folder)
    meta = read_model_json(folder)
    if "onnx" not in meta:
        raise ImgclfError(f"{folder / 'model.json'} has no 'onnx' section: not an export folder")
    run = Path(run) if run is not None else Path(meta["onnx"].get("source_run", folder.parent))
    predictor = load_predictor(run)
    pre = meta["preprocessing"]
    images, source = sample_images(run, int(pre["input_size"]), samples)
    diff = parity((folder / meta["onnx"]["file"]).read_bytes(), predictor, images, pre)
    log(f"parity on {len(images)} {source} images: max abs difference {diff:.2e}")
    _check(diff, tolerance, run)
    return diff


def _check(diff: float, tolerance: float, run: Path) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise ImgclfError(
            f"ONNX parity check failed for {run}: onnxruntime and PyTorch probabilities differ "
            f"by up to {diff:.3g} (tolerance {tolerance:g}); the export was not written. Try "
            "another --opset, or report the model architecture"
        )


def onnx_bytes(
    module: torch.nn.Module, size: int, opset: int, dynamic_batch: bool, exporter: str = "dynamo"
) -> bytes:
    """Trace `module` (0..1 NCHW → probabilities) to a self-contained ONNX model."""
    if exporter not in EXPORTERS:
        raise ImgclfError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    example = torch.rand(2 if dynamic_batch else 1, 3, size, size)
    kwargs: dict = {"dynamo": exporter == "dynamo"}
    if exporter == "dynamo":
        kwargs["external_data"] = False
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_ONNX
        with _quiet():
            try:
                torch.onnx.export(
                    module,
                    (example,),
                    path,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    verbose=False,
                    **kwargs,
                )
            except Exception as e:  # the exporter raises many types; name the step
                raise ImgclfError(f"ONNX export (opset {opset}) failed: {e}") from e
        data = path.read_bytes()
    got = graph_opset(data)
    if got != opset:  # the dynamo exporter cannot go below 18 and says so only in a warning
        raise ImgclfError(
            f"asked for opset {opset} but the {exporter} exporter wrote opset {got}; "
            f"use --opset {got}" + (", or --exporter torchscript" if exporter == "dynamo" else "")
        )
    return data


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, warnings and logged tracebacks about their internals; what
    matters reaches the user as an ImgclfError or through the parity check."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def graph_opset(data: bytes) -> int | None:
    """The default-domain opset an ONNX model imports."""
    import onnx

    model = onnx.load_from_string(data)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def parity(data: bytes, predictor, images: list[Image.Image], preprocessing: dict) -> float:
    """Max |p_torch - p_onnx| over the images: the full PyTorch pipeline vs
    onnx_preprocess + onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = preprocess_batch(images, preprocessing)
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else len(x)
    name = session.get_inputs()[0].name
    got = np.concatenate(
        [session.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    )
    want = predictor.predict_images(images).numpy()
    if got.shape != want.shape:
        raise ImgclfError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
    return float(np.abs(got.astype(np.float64) - want).max())


def sample_images(run: Path, size: int, n: int = SAMPLES) -> tuple[list[Image.Image], str]:
    """Up to n of the run's val / test images (decoded as in training), else synthetic ones."""
    images = _split_images(run, size, n)
    if images:
        return images, "val/test"
    rng = np.random.default_rng(0)
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 2), (size + 7, size + 3)]
    synthetic = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        for w, h in (shapes[i % len(shapes)] for i in range(n))
    ]
    return synthetic, "synthetic"


def _split_images(run: Path, size: int, n: int) -> list[Image.Image]:
    from imgclf.data.images import ImageLoadError, load_image
    from imgclf.data.manifest import read_manifest

    try:
        manifest = read_manifest(RunFolder(run).manifest_dir())
    except (OSError, ValueError, KeyError, ImgclfError):
        return []
    images = []
    for entry in manifest.split_entries("val") + manifest.split_entries("test"):
        if len(images) >= n:
            break
        with contextlib.suppress(ImageLoadError):
            images.append(load_image(Path(manifest.root) / entry.path, size_hint=size))
    return images
