"""ONNX export: parity with PyTorch on the demo-like EfficientNet-Lite0 and a trained scratch
CNN, the torch-free preprocessing, composite (ensemble) graphs, and refusal when parity fails."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import ModelConfig
from imgclf.data.images import load_image
from imgclf.data.transforms import eval_transform
from imgclf.errors import ImgclfError
from imgclf.models import build_model
from imgclf.predict import export as export_mod
from imgclf.predict.export import export_onnx, verify_export
from imgclf.predict.onnx_preprocess import load_input, preprocess
from imgclf.predict.predictor import Predictor
from imgclf.runs.record import RunDir
from imgclf.workflows.ensemble import save_ensemble
from test_predict import train_tiny

import factory as fx


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=8, size=(40, 40))
    return train_tiny(tmp, data)


def lite0_run(runs_dir, size=64, classes=10):
    """The demo's model (packaged ImageNet weights, a fresh head) as a run folder."""
    model, pre = build_model(ModelConfig(name="efficientnet_lite0"), classes, size)
    run = RunDir.create(runs_dir, "lite0")
    run.write_model_json(model.spec, pre.to_dict(), [f"class_{i}" for i in range(classes)])
    run.write_weights(model.state_dict())
    return run.path


def photos(folder, n=6):
    """JPEGs of several sizes and aspect ratios, decoded by the one image loader."""
    sizes = [(97, 61), (64, 64), (40, 120), (301, 203), (65, 64), (50, 33)]
    return [fx.write_jpeg(folder / f"p{i}.jpg", size=sizes[i % 6], seed=i) for i in range(n)]


def ort_probs(folder, paths):
    meta = json.loads((folder / "model.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([load_input(p, meta["preprocessing"]) for p in paths])
    name = meta["onnx"]["input"]
    if meta["onnx"]["dynamic_batch"]:
        return session.run(None, {name: x})[0]
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def test_lite0_export_parity_end_to_end(tmp_path):
    run = lite0_run(tmp_path / "runs")
    result = export_onnx(run, dynamic_batch=True, log=lambda *_: None)
    assert result.folder == run / "export" and result.max_abs_diff <= 1e-4
    meta = json.loads((run / "export" / "model.json").read_text())
    original = json.loads((run / "model.json").read_text())
    assert {k: meta[k] for k in original} == original  # the run's keys, unchanged
    onnx_meta = meta["onnx"]
    assert onnx_meta["input"] == "image" and onnx_meta["layout"] == "NCHW"
    assert onnx_meta["normalisation"] == "inside the graph" and onnx_meta["opset"] == 18
    assert onnx_meta["dynamic_batch"] is True and onnx_meta["parity"]["source"] == "synthetic"
    # onnxruntime on the torch-free preprocessing vs the run's own predictor, on real files
    paths = photos(tmp_path / "photos")
    want = Predictor.from_run(run).predict_paths(paths).probs.numpy()
    got = ort_probs(run / "export", paths)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    # the export folder also rebuilds the PyTorch predictor
    assert Predictor.from_run(run / "export").labels == original["labels"]


def test_no_torch_preprocessing_matches_the_transform(tmp_path):
    """Before normalisation, onnx_preprocess equals torchvision's eval transform."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = [load_image(p) for p in photos(tmp_path)]
    for size, interpolation, crop_pct in [(64, "bicubic", 0.875), (32, "bilinear", 1.0)]:
        tf = eval_transform(size, mean, std, interpolation, crop_pct)
        pre = {"input_size": size, "interpolation": interpolation, "crop_pct": crop_pct}
        for im in images:
            x = torch.from_numpy(preprocess(im, pre))
            normalised = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            assert torch.allclose(normalised, tf(im), atol=1e-5), (im.size, size)
    with pytest.raises(ImgclfError, match="RGB"):
        preprocess(Image.new("L", (10, 10)), pre)
    code = (
        "import sys, imgclf.predict.onnx_preprocess, imgclf.data.images; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_trained_run_and_ensemble_export(run, tmp_path):
    out = tmp_path / "exp"
    result = export_onnx(run, out, log=lambda *_: None)
    assert result.source == "val/test" and result.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]  # fixed batch without --dynamic-batch
    paths = photos(tmp_path / "photos", 3)
    want = Predictor.from_run(run).predict_paths(paths).probs.numpy()
    assert np.abs(ort_probs(out, paths) - want).max() <= 1e-4
    with pytest.raises(ImgclfError, match="wrote opset 18; use --opset 18"):
        export_onnx(run, tmp_path / "old", opset=17, log=lambda *_: None)  # not silently 18
    assert not (tmp_path / "old").exists()
    # a hard-voting ensemble becomes one graph; its second member has perturbed weights
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    weights = {
        k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in load_file(other / "model.safetensors").items()
    }
    save_file(weights, other / "model.safetensors")
    folder = save_ensemble([run, other, run], "three", vote="hard", runs_dir=tmp_path / "runs")
    result = export_onnx(folder, dynamic_batch=True, log=lambda *_: None)
    assert result.max_abs_diff <= 1e-4
    meta = json.loads((folder / "export" / "model.json").read_text())
    assert meta["kind"] == "ensemble" and "definition" not in meta
    assert not (folder / "export" / "model.safetensors").exists()


def perturbed(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(init).copy()
    array += np.random.default_rng(0).normal(0, 1.0, array.shape).astype(array.dtype)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    return model.SerializeToString()


def test_export_refuses_when_parity_fails(run, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export_onnx(run, out, exporter="torchscript", log=lambda *_: None)
    (out / "model.onnx").write_bytes(perturbed((out / "model.onnx").read_bytes()))
    with pytest.raises(ImgclfError, match="parity check failed"):
        verify_export(out, run, log=lambda *_: None)
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--check"])
    assert result.exit_code != 0 and isinstance(result.exception, ImgclfError)
    # during export: nothing is written
    real = export_mod.onnx_bytes
    monkeypatch.setattr(export_mod, "onnx_bytes", lambda *a: perturbed(real(*a)))
    fresh = tmp_path / "fresh"
    with pytest.raises(ImgclfError, match="parity check failed"):
        export_onnx(run, fresh, exporter="torchscript", log=lambda *_: None)
    assert not fresh.exists()
