"""Cached backbone features (`train.features: cache`): head stages train on them, the cache is
shared between runs, and a later stage still fine-tunes end to end."""

import json

import pytest
from safetensors.torch import load_file

from imgclf.config import load_config
from imgclf.workflows.training import train

import factory as fx

BASE = [
    *fx.TINY_MODEL,
    "train.features=cache",
    "train.feature_views=2",
    "tracking.mlflow=false",
]


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )


def run(data, tmp_path, *extra, log=None):
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp_path / 'runs'}",
            f"data.manifest={tmp_path / 'm'}",
            f"train.feature_cache={tmp_path / 'features'}",
            *BASE,
            *extra,
        ],
    )
    lines = []
    path = train(cfg, progress=False, log=lambda m, *_: lines.append(str(m)))
    return path, lines


def test_head_stage_on_cached_features_then_fine_tuning(data, tmp_path):
    stages = "train.stages=[{trainable: head, epochs: 3, lr: 0.05}, {trainable: all, epochs: 1}]"
    path, lines = run(data, tmp_path, stages)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 4
    caching = [ln for ln in lines if ln.startswith("caching backbone features")]
    assert len(caching) == 3, caching  # two training views and the validation set
    weights = load_file(path / "model.safetensors")
    assert any(k.startswith("backbone.") for k in weights) and any(
        k.startswith("head.") for k in weights
    )
    assert (path / "predictions" / "test.csv").is_file()
    # The same backbone, data and preprocessing: a second run reuses every cached view.
    _, again = run(data, tmp_path, stages, "model.head.dropout=0.3", "train.stages.0.lr=0.01")
    assert not [ln for ln in again if ln.startswith("caching")]
    assert len(list((tmp_path / "features").iterdir())) == 3


def test_cache_keys_follow_what_the_features_depend_on(data, tmp_path):
    stage = "train.stages=[{trainable: head, epochs: 1}]"
    run(data, tmp_path, stage)
    _, lines = run(data, tmp_path, stage, "model.head.pool=max")  # other pooling: other features
    assert len([ln for ln in lines if ln.startswith("caching")]) == 3
    fx.write_png(data / "a" / "extra.png", size=(40, 40), seed=77)  # new data version
    _, lines = run(data, tmp_path, stage)
    assert len([ln for ln in lines if ln.startswith("caching")]) == 3


def test_cached_head_training_follows_the_image_path(data, tmp_path):
    """Without augmentation both paths see the same batches: same losses, same accuracy."""
    import csv

    stage = "train.stages=[{trainable: head, epochs: 3, lr: 0.05}]"
    rows = {}
    for features in ("cache", "none"):
        path, _ = run(
            data,
            tmp_path,
            stage,
            "train.augment={preset: none}",
            f"train.features={features}",
            "model.head.dropout=0.0",
        )
        with open(path / "metrics.csv") as f:
            rows[features] = list(csv.DictReader(f))
    for a, b in zip(rows["cache"], rows["none"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), key
        assert a["val_accuracy"] == b["val_accuracy"]
