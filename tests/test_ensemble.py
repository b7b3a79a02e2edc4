"""Ensembles: soft / hard voting semantics on hand-made probabilities, label-map checks, an
on-the-fly ensemble of runs with different input sizes, and a saved ensemble folder."""

import json
import shutil

import pytest
import torch

from imgclf.commands.predict import predict_files
from imgclf.errors import ImgclfError
from imgclf.predict.ensemble import Ensemble, check_labels, combine, parse_weights
from imgclf.predict.predictor import Predictor, load_predictor
from imgclf.workflows.ensemble import save_ensemble
from test_predict import train_tiny

import factory as fx


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs on one manifest, at different input sizes."""
    tmp = tmp_path_factory.mktemp("ensemble")
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=8, size=(40, 40))
    first = train_tiny(tmp, data, size=32, seed=0, name="r32")
    second = train_tiny(tmp, None, size=24, seed=1, name="r24")
    return first, second


def test_soft_vote_is_the_weighted_mean():
    p = torch.tensor(
        [
            [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]],
            [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
        ]
    )
    out = combine(p, torch.tensor([3.0, 1.0]), "soft")
    want = (3 * p[0] + p[1]) / 4
    assert torch.allclose(out, want)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_hard_vote_majority_and_tie_break_by_mean_probability():
    p = torch.tensor(
        [
            [[0.5, 0.4, 0.1], [0.5, 0.4, 0.1]],
            [[0.5, 0.4, 0.1], [0.1, 0.45, 0.45]],
            [[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]],
        ]
    )
    out = combine(p, torch.ones(3), "hard")
    # image 0: votes a, a, c → a with a 2/3 share (the winner's nudge is 1e-6)
    assert out[0].argmax() == 0
    assert out[0].tolist() == pytest.approx([2 / 3, 0, 1 / 3], abs=1e-5)
    # image 1: votes a, b, c → a three-way tie; mean probabilities 0.233, 0.317, 0.45 → c
    assert out[1].argmax() == 2
    assert out[1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=1e-5)
    two = combine(p[:2, 1:], torch.ones(2), "hard")  # votes a, b: tie; means 0.3 vs 0.425 → b
    assert two[0].argmax() == 1
    weighted = combine(p[:2, 1:], torch.tensor([2.0, 1.0]), "hard")  # a has 2 of 3 votes
    assert weighted[0].argmax() == 0 and weighted[0, 0] == pytest.approx(2 / 3, abs=1e-5)


def test_label_maps_must_match_exactly():
    assert check_labels([("r1", ["a", "b"]), ("r2", ["a", "b"])]) == ["a", "b"]
    with pytest.raises(ImgclfError, match=r"r2 lacks \['b'\] and adds \['z'\]"):
        check_labels([("r1", ["a", "b"]), ("r2", ["a", "z"])])
    with pytest.raises(ImgclfError, match="position 0 is 'a' in r1 but 'b' in r2"):
        check_labels([("r1", ["a", "b"]), ("r2", ["b", "a"])])
    with pytest.raises(ImgclfError, match="2 values for 3 members"):
        parse_weights("1,2", 3)
    with pytest.raises(ImgclfError, match="≥ 0"):
        parse_weights("1,-1", 2)


def test_mismatched_run_is_refused(runs, tmp_path):
    other = tmp_path / "reordered"
    shutil.copytree(runs[0], other)
    meta = json.loads((other / "model.json").read_text())
    meta["labels"] = ["b", "a", "c"]
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ImgclfError, match=r"share the label map.*position 0"):
        Ensemble.from_runs([runs[0], other])


def test_on_the_fly_ensemble_mixes_input_sizes(runs, tmp_path):
    images = fx.make_class_folder(tmp_path / "imgs", classes=("x",), per_class=4, size=(50, 30))
    paths = sorted(str(p) for p in (images / "x").iterdir())
    fx.write_zero_byte(tmp_path / "imgs" / "zero.jpg")
    paths.append(str(tmp_path / "imgs" / "zero.jpg"))
    members = [Predictor.from_run(r) for r in runs]
    assert [m.preprocessing.input_size for m in members] == [32, 24]
    parts = [m.predict_paths(paths, batch_size=3) for m in members]
    ens = Ensemble.from_runs(runs, "1,3", "soft")
    got = ens.predict_paths(paths, batch_size=3)
    assert got.ok == [0, 1, 2, 3] and list(got.errors) == [4]
    assert torch.allclose(got.probs, (parts[0].probs + 3 * parts[1].probs) / 4, atol=1e-6)
    # the CLI with two runs is the same ensemble
    rows = predict_files([str(runs[0]), str(runs[1]), *paths], weights="1,3", probs=True)
    cli = torch.tensor([[r[f"p_{n}"] for n in "abc"] for r in rows[:4]], dtype=torch.float64)
    assert torch.allclose(cli, got.probs.double(), atol=1e-6)
    assert rows[4]["status"] == "error"
    with pytest.raises(ImgclfError, match="different input sizes"):
        ens.probability_module()  # one ONNX input cannot feed 32 px and 24 px members


def test_saved_ensemble_round_trip(runs, tmp_path):
    copies = []
    for r in runs:  # copies, so that removing one later leaves the module's runs alone
        copies.append(tmp_path / "runs" / r.name)
        shutil.copytree(r, copies[-1])
    folder = save_ensemble(copies, "pair", vote="hard", runs_dir=tmp_path / "runs")
    spec = json.loads((folder / "ensemble.json").read_text())
    assert spec["members"] == [c.name for c in copies] and spec["vote"] == "hard"
    assert json.loads((folder / "model.json").read_text())["kind"] == "ensemble"
    summary = json.loads((folder / "summary.json").read_text())
    assert (
        summary["status"] == "completed" and summary["model"] == "ensemble[scratch_cnn,scratch_cnn]"
    )
    assert (folder / "data.json").is_file() and (folder / "config.yaml").is_file()
    loaded = load_predictor(folder)
    assert isinstance(loaded, Ensemble) and loaded.vote == "hard"
    # val accuracy of the saved summary = the loaded ensemble on the shared val split
    from imgclf.data.manifest import read_manifest

    manifest = read_manifest(json.loads((folder / "data.json").read_text())["manifest"])
    val = manifest.split_entries("val")
    preds = loaded.predict_paths([manifest.root / e.path for e in val])
    targets = torch.tensor([loaded.labels.index(e.label) for e in val])
    acc = (preds.probs.argmax(1) == targets).float().mean().item()
    assert summary["val"]["val_accuracy"] == pytest.approx(acc)
    assert summary["test"]["test_accuracy"] >= 0  # scored on val and test by default
    with pytest.raises(ImgclfError, match="already exists"):
        save_ensemble(copies, "pair", runs_dir=tmp_path / "runs")
    shutil.rmtree(copies[1])
    with pytest.raises(ImgclfError, match="missing"):
        load_predictor(folder)


def test_a_fit_exports_an_ensemble_of_differently_sized_members_one_graph_each(runs, tmp_path):
    """One ONNX input cannot feed members at 32 and 24 px: `imgclf fit` exports each member on
    its own, and ensemble.json says how to combine them; done as it says, onnxruntime gives the
    ensemble's own probabilities."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from imgclf.predict.export import export_model_or_members
    from imgclf.predict.onnx_preprocess import preprocess_batch

    copies = [tmp_path / "runs" / r.name for r in runs]
    for r, c in zip(runs, copies, strict=True):
        shutil.copytree(r, c)
    # as `imgclf fit` saves it: scored on val only (the fit predicts test once, at the end)
    folder = save_ensemble(copies, "mixed", runs_dir=tmp_path / "runs", splits=("val",))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val"]["val_accuracy"] >= 0 and summary["test"] == {}
    record = export_model_or_members(folder, tmp_path / "export", log=lambda *_: None)
    assert [m["folder"] for m in record["members"]] == [c.name for c in copies]
    assert all(m["parity"] <= 1e-4 for m in record["members"])
    spec = json.loads((tmp_path / "export" / "ensemble.json").read_text())
    assert spec["vote"] == "soft" and spec["members"] == [c.name for c in copies]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)) for _ in range(3)]
    parts = []
    for name in spec["members"]:
        meta = json.loads((tmp_path / "export" / name / "model.json").read_text())
        session = ort.InferenceSession(str(tmp_path / "export" / name / "model.onnx"))
        x = preprocess_batch(images, meta["preprocessing"])
        parts.append(
            np.concatenate([session.run(None, {"image": x[i : i + 1]})[0] for i in range(3)])
        )
    w = np.asarray(spec["weights"], np.float32)[:, None, None]
    combined = (w * np.stack(parts)).sum(0) / w.sum()
    want = load_predictor(folder).predict_images(images).numpy()
    assert np.abs(combined - want).max() < 1e-4
    # a single run (or an ensemble that resizes alike) is still one graph
    one = export_model_or_members(copies[0], tmp_path / "single", log=lambda *_: None)
    assert "members" not in one and (tmp_path / "single" / "model.onnx").is_file()
