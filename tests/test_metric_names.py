"""One metric vocabulary: names checked at load, one direction rule, one top-k."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import imgclf
from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.evaluate.metrics import compute_metrics, top_k_accuracy, top_k_hits
from imgclf.metric_names import (
    EPOCH_METRICS,
    EVALUATION_METRICS,
    FINAL_METRICS,
    check_epoch_metric,
    direction,
    lower_is_better,
)
from imgclf.runs.leaderboard import sort_rows
from imgclf.sweep.spec import load_sweep
from imgclf.train.fit import metric_mode
from imgclf.train.loop import classification_metrics
from imgclf.workflows.training import check_watched_metrics


def test_every_epoch_metric_training_measures_is_in_the_vocabulary():
    probs = torch.softmax(torch.randn(20, 7), 1)
    measured = {"train_loss", "train_accuracy"} | set(
        classification_metrics(probs, torch.randint(0, 7, (20,)), "val")
    )
    assert measured == set(EPOCH_METRICS)
    assert set(classification_metrics(probs, torch.randint(0, 7, (20,)), "test")) <= set(
        FINAL_METRICS
    )
    probs = torch.softmax(torch.randn(20, 7), 1).numpy()
    summary = compute_metrics(probs, np.arange(20) % 7, list("abcdefg")).summary
    assert set(summary) - {"images", "classes"} == set(EVALUATION_METRICS)


@pytest.mark.parametrize(
    "name, lower",
    [
        ("train_loss", True),
        ("val_loss", True),
        ("test_loss", True),
        ("train_accuracy", False),
        ("val_accuracy", False),
        ("val_top5", False),
        ("test_top5", False),
        ("top_5_accuracy", False),
        ("log_loss", True),
        ("ece", True),
        ("test.ece", True),  # a leaderboard column of the evaluation "test"
        ("holdout.log_loss", True),
        ("holdout.f1_macro", False),
        ("mean_confidence", False),
        # Outside the vocabulary (leaderboard columns): costs by their words, else higher first.
        ("train_s", False),
        ("params_total", False),
        ("some_error", True),
    ],
)
def test_one_direction_rule(name, lower):
    assert lower_is_better(name) is lower
    assert direction(name) == ("minimize" if lower else "maximize")


def test_every_old_copy_now_asks_the_vocabulary():
    for name in EPOCH_METRICS:
        assert metric_mode(name) == ("min" if lower_is_better(name) else "max")
    rows = [{"id": "a", "test.ece": 0.2}, {"id": "b", "test.ece": 0.1}]
    assert [r["id"] for r in sort_rows(rows, "test.ece")] == ["b", "a"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.best_metric=val_acuracy", "train.best_metric"),
        ("train.early_stopping.metric=val_acuracy", "train.early_stopping.metric"),
        ("train.stages.0.plateau.metric=val_acuracy", "train.stages.0.plateau.metric"),
    ],
)
def test_an_unknown_metric_fails_when_the_config_loads(override, key):
    near = r"unknown metric 'val_acuracy'; did you mean val_accuracy\?"
    with pytest.raises(ImgclfError, match=rf"{key}: {near}"):
        load_config(None, [override])


def test_a_yaml_config_with_an_unknown_metric_fails_at_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  best_metric: val_acuracy\n  early_stopping: {metric: val_los}\n")
    with pytest.raises(ImgclfError) as e:
        load_config(path)
    message = str(e.value)
    assert "train.best_metric: unknown metric 'val_acuracy'; did you mean val_accuracy?" in message
    assert (
        "train.early_stopping.metric: unknown metric 'val_los'; did you mean val_loss?" in message
    )


def test_a_final_metric_is_not_an_epoch_metric():
    with pytest.raises(ValueError, match="test_accuracy is measured after training"):
        check_epoch_metric("test_accuracy")
    assert load_config(None, ["train.best_metric=val_top5"]).train.best_metric == "val_top5"


def test_an_unknown_sweep_metric_fails_when_the_sweep_file_loads(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("metric: val_acuracy\nparameters: {seed: {values: [1, 2]}}\n")
    near = r"metric: unknown metric 'val_acuracy'; did you mean val_accuracy\?"
    with pytest.raises(ImgclfError, match=near):
        load_sweep(path)
    path.write_text("metric: train_loss\nparameters: {seed: {values: [1, 2]}}\n")
    assert load_sweep(path).maximize is False


def test_val_top5_on_five_classes_fails_before_the_first_epoch():
    cfg = load_config(None, ["train.best_metric=val_top5"]).train
    with pytest.raises(ImgclfError, match=r"train.best_metric=val_top5: val_top5 is measured only"):
        check_watched_metrics(cfg, 5)
    check_watched_metrics(cfg, 6)
    plateau = load_config(
        None, ["train.stages=[{schedule: plateau, plateau: {metric: val_top5}}]"]
    ).train
    with pytest.raises(ImgclfError, match=r"train.stages.0.plateau.metric=val_top5"):
        check_watched_metrics(plateau, 3)
    check_watched_metrics(load_config(None, []).train, 2)  # the defaults: always measured


def _argsort_top_k(probs, targets, k):  # the ranking evaluation used before (scikit-learn's)
    ranked = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return (ranked == targets[:, None]).any(1)


def test_one_top_k_ranks_as_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(100):
        n, c = int(rng.integers(1, 40)), int(rng.integers(2, 10))
        probs = rng.integers(0, 3, (n, c)).astype(np.float64) if trial % 2 else rng.random((n, c))
        targets = rng.integers(0, c, n)
        for k in range(1, c + 1):
            expected = _argsort_top_k(probs, targets, k)
            assert (top_k_hits(probs, targets, k) == expected).all()
            assert (top_k_hits(probs.astype(np.float32), targets, k) == expected).all()
    assert top_k_hits(np.zeros((0, 3)), np.zeros(0, dtype=int), 2).shape == (0,)


def test_val_top5_and_top_5_accuracy_are_one_measure():
    probs = torch.softmax(torch.randn(200, 9), 1)
    probs[:10] = 1 / 9  # exact ties: both names rank them the same way
    targets = torch.randint(0, 9, (200,))
    val = classification_metrics(probs, targets, "val")["val_top5"]
    evaluation = top_k_accuracy(probs.double().numpy(), targets.numpy(), 5)
    assert val == pytest.approx(evaluation, abs=1e-6)
    assert EPOCH_METRICS["val_top5"].alias_of == "top_5_accuracy"


def test_the_vocabulary_stays_torch_free():
    code = (
        "import sys, imgclf.metric_names, imgclf.config, imgclf.runs.leaderboard;"
        "assert 'torch' not in sys.modules"
    )
    src = str(Path(imgclf.__file__).parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": src})
