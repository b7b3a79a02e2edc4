"""Evaluation: every metric against scikit-learn, the analysis functions on hand-built inputs, and
`imgclf evaluate` on a real tiny run (its own split, a new folder, TTA, bad files)."""

import csv
import hashlib
import json
import os
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.evaluate import analysis
from imgclf.evaluate.evaluate import evaluate_run
from imgclf.evaluate.metrics import TOP_K, calibration, compute_metrics
from imgclf.predict.predictor import Predictor
from imgclf.workflows.training import train

import factory as fx

CLASSES = ("class_1", "class_2", "class_10")  # natural order: class_1, class_2, class_10
EVAL_FILES = {
    "metrics.json",
    "per_class.csv",
    "predictions.csv",
    "confusion.csv",
    "confusion_groups.json",
    "most_wrong.csv",
    "label_issues.csv",
    "confusion.png",
    "confusion_clustered.png",
    "confusion_normalised.png",
    "reliability.png",
    "per_class_f1.png",
}


# ---------------------------------------------------------------- metrics vs scikit-learn


def random_predictions(n: int, c: int, seed: int):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.7), size=n)
    targets = rng.integers(0, c, size=n)
    return probs, targets


def assert_matches_sklearn(probs, targets, c):
    labels = [f"k{i}" for i in range(c)]
    r = compute_metrics(probs, targets, labels)
    s = r.summary
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the very edge cases we test
        assert s["accuracy"] == pytest.approx(skm.accuracy_score(targets, pred))
        for k in TOP_K:
            if k < c and c > 2:
                expected = skm.top_k_accuracy_score(targets, probs, k=k, labels=range(c))
                assert s[f"top_{k}_accuracy"] == pytest.approx(expected), k
            else:
                assert (f"top_{k}_accuracy" in s) == (k < c)
        assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(targets, pred))
        for avg in ("macro", "weighted"):
            p, rec, f1, _ = skm.precision_recall_fscore_support(
                targets, pred, average=avg, zero_division=0
            )
            assert (s[f"precision_{avg}"], s[f"recall_{avg}"], s[f"f1_{avg}"]) == pytest.approx(
                (p, rec, f1)
            ), avg
        p, rec, f1, sup = skm.precision_recall_fscore_support(
            targets, pred, labels=range(c), average=None, zero_division=0
        )
        assert s["log_loss"] == pytest.approx(skm.log_loss(targets, probs, labels=range(c)))
    rows = r.per_class
    assert [x["precision"] for x in rows] == pytest.approx(p)
    assert [x["recall"] for x in rows] == pytest.approx(rec)
    assert [x["f1"] for x in rows] == pytest.approx(f1)
    assert [x["support"] for x in rows] == list(sup)
    cm = skm.confusion_matrix(targets, pred, labels=range(c))
    np.testing.assert_array_equal(r.confusion, cm)
    norm = skm.confusion_matrix(targets, pred, labels=range(c), normalize="true")
    np.testing.assert_allclose(r.confusion_normalised, np.nan_to_num(norm))
    return r


@pytest.mark.parametrize(("n", "c", "seed"), [(50, 2, 0), (200, 4, 1), (300, 7, 2), (80, 12, 3)])
def test_metrics_agree_with_sklearn_on_random_predictions(n, c, seed):
    probs, targets = random_predictions(n, c, seed)
    assert_matches_sklearn(probs, targets, c)


def test_metrics_agree_with_sklearn_on_edge_cases():
    probs, targets = random_predictions(120, 6, 7)
    # class 0 is never predicted
    never = probs.copy()
    never[:, 0] = 0.0
    never /= never.sum(1, keepdims=True)
    r = assert_matches_sklearn(never, targets, 6)
    assert r.per_class[0]["predicted"] == 0 and r.per_class[0]["precision"] == 0.0
    # class 5 is absent from the targets (but predicted), class 4 absent from both
    absent = np.where(targets >= 4, 1, targets)
    skewed = probs.copy()
    skewed[:, 4] = 0.0
    skewed /= skewed.sum(1, keepdims=True)
    r = assert_matches_sklearn(skewed, absent, 6)
    assert r.per_class[5]["support"] == 0 and r.per_class[5]["predicted"] > 0
    assert r.confusion_normalised[5].sum() == 0.0
    # a perfect and a certain prediction: log loss clips instead of returning inf
    onehot = np.eye(6)[targets]
    assert_matches_sklearn(onehot, targets, 6)
    assert_matches_sklearn(np.roll(onehot, 1, axis=1), targets, 6)


def test_calibration_by_hand():
    # ten images at confidence 0.9 with 9 right: calibrated; five at 0.55 with 1 right: off by 0.35
    probs = np.array([[0.9, 0.1]] * 10 + [[0.55, 0.45]] * 5)
    targets = np.array([0] * 9 + [1] + [0] + [1] * 4)
    ece, bins = calibration(probs, targets)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 15
    assert ece == pytest.approx(5 / 15 * abs(0.2 - 0.55))
    b9 = next(b for b in bins if b["lower"] < 0.9 <= b["upper"])
    assert b9["count"] == 10 and b9["accuracy"] == pytest.approx(0.9)
    assert compute_metrics(probs, targets, ["a", "b"]).summary["ece"] == pytest.approx(ece)


def test_per_class_names_the_classes_each_is_confused_with():
    labels = ["a", "b", "c", "d"]
    targets = np.array([0] * 6 + [1] * 3 + [2] * 2 + [3])
    pred = np.array([1, 1, 1, 2, 2, 0, 1, 1, 1, 2, 3, 3])  # a: 3× b, 2× c
    r = compute_metrics(np.eye(4)[pred], targets, labels)
    a = r.per_class[0]
    assert (a["confused_1"], a["confused_1_count"]) == ("b", 3)
    assert (a["confused_2"], a["confused_2_count"]) == ("c", 2)
    assert (a["confused_3"], a["confused_3_count"]) == ("", 0)


# ---------------------------------------------------------------- analysis


def hand_confusion():
    """Five classes: 'cat' and 'lynx' (indices 0 and 3) are mistaken for each other a lot."""
    cm = np.diag([50, 50, 50, 50, 50]).astype(float)
    cm[0, 3], cm[3, 0] = 20, 15
    cm[1, 4] = 2
    return cm / cm.sum(1, keepdims=True)


def test_cluster_order_puts_the_confused_pair_together():
    order = analysis.cluster_order(hand_confusion())
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert abs(order.index(0) - order.index(3)) == 1


def test_confusion_groups_cover_every_class_once():
    labels = ["cat", "dog", "fox", "lynx", "wolf"]
    groups = analysis.confusion_groups(hand_confusion(), labels, threshold=0.05)
    assert groups[0] == ["cat", "lynx"]
    assert sorted(c for g in groups for c in g) == labels
    assert all(len(g) == 1 for g in groups[1:])  # dog→wolf at 2 % stays below 5 %
    loose = analysis.confusion_groups(hand_confusion(), labels, threshold=0.01)
    assert ["dog", "wolf"] in loose


def test_most_wrong_and_label_issues_by_hand():
    labels = ["a", "b", "c"]
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.05, 0.9, 0.05],  # labelled a, looks like b: a label issue
            [0.1, 0.8, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.1, 0.8],
            [0.3, 0.1, 0.6],  # labelled c, predicted c
            [0.5, 0.2, 0.3],  # labelled c, predicted a with 0.5
        ]
    )
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    paths = [f"img{i}.png" for i in range(len(targets))]
    wrong = analysis.most_wrong(paths, probs, targets, labels)
    assert [w["path"] for w in wrong] == ["img2.png", "img7.png"]
    assert wrong[0]["predicted"] == "b" and wrong[0]["probability"] == pytest.approx(0.9)
    issues = analysis.label_issues(paths, probs, targets, labels)
    assert issues[0]["path"] == "img2.png" and issues[0]["suggested"] == "b"
    # thresholds: a = mean(0.9, 0.8, 0.05) = 0.583; img7 has p_a 0.5 < 0.583: not suggested a
    assert "img7.png" not in [i["path"] for i in issues]


def test_overfitting_indicators_by_hand():
    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.0 / e * (1 + 0.1 * e),
            "train_accuracy": 0.5 + 0.1 * e,
            "val_accuracy": 0.5 + 0.05 * e,
        }
        for e in range(1, 5)
    ]
    o = analysis.overfitting(history, best_epoch=2)
    assert o["best_epoch"] == 2
    assert o["accuracy_gap"] == pytest.approx(0.7 - 0.6)
    assert o["loss_gap"] == pytest.approx(0.5 * 1.2 - 0.5)
    assert o["loss_ratio_slope"] == pytest.approx(0.1)  # ratio = 1 + 0.1·epoch
    assert analysis.overfitting([], None) == {}


# ---------------------------------------------------------------- imgclf evaluate on a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    data = fx.make_class_folder(tmp / "data", classes=CLASSES, per_class=10, size=(40, 40))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / 'manifest'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 2, lr: 0.01}]",
            "data.split.train=0.6",
            "data.split.val=0.2",
            "data.split.test=0.2",
            "tracking.mlflow=false",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


def tree_hashes(folder, skip=()):
    out = {}
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_split_cli_writes_every_file_and_leaves_training_untouched(run):
    before = tree_hashes(run, skip={"evaluations"})
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "evaluations/test" in result.output
    assert tree_hashes(run, skip={"evaluations"}) == before
    folder = run / "evaluations" / "test"
    assert {p.name for p in folder.iterdir()} == EVAL_FILES
    record = json.loads((folder / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # the same predictor as training's finalize: the same numbers
    assert record["metrics"]["accuracy"] == pytest.approx(summary["test"]["test_accuracy"])
    assert record["metrics"]["log_loss"] == pytest.approx(summary["test"]["test_loss"], abs=1e-5)
    rows = read_rows(folder / "predictions.csv")
    assert len(rows) == record["images"]["evaluated"] == 6
    probs = np.array([[float(x[f"p_{c}"]) for c in CLASSES] for x in rows])
    targets = np.array([CLASSES.index(x["label"]) for x in rows])
    assert record["metrics"]["f1_macro"] == pytest.approx(
        skm.f1_score(targets, probs.argmax(1), average="macro", zero_division=0), abs=1e-5
    )
    groups = json.loads((folder / "confusion_groups.json").read_text())
    assert sorted(c for g in groups for c in g) == sorted(CLASSES)
    assert record["overfitting"]["epochs"] == 2
    assert set(record["overfitting"]) >= {"accuracy_gap", "loss_gap", "loss_ratio_slope"}
    assert [r["class"] for r in read_rows(folder / "per_class.csv")] == list(CLASSES)
    for png in (p for p in EVAL_FILES if p.endswith(".png")):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_data_maps_through_the_run_label_map(run, tmp_path):
    # a subset of the classes, created in another order, plus files that cannot be read
    new = fx.make_class_folder(tmp_path / "fresh", classes=("class_10", "class_1"), seed=5)
    fx.write_truncated_jpeg(new / "class_10" / "cut.jpg")
    fx.write_text_as_jpg(new / "class_1" / "page.jpg")
    before = sorted(p.relative_to(new) for p in new.rglob("*"))
    result = evaluate_run(run, data=new)
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == before, "user folder untouched"
    assert result.folder == run / "evaluations" / "fresh"
    rec = result.record
    assert rec["labels"] == list(CLASSES) and rec["missing_classes"] == ["class_2"]
    assert any("class_2" in w for w in rec["warnings"])
    assert rec["images"]["total"] == 10 and rec["images"]["evaluated"] == 8
    rows = {r["path"]: r for r in read_rows(result.folder / "predictions.csv")}
    assert rows["class_10/cut.jpg"]["status"].startswith("skipped")
    assert rows["class_1/page.jpg"]["status"].startswith("skipped")
    # the probability columns are in the run's order, and the truth came from folder names
    predictor = Predictor.from_run(run)
    path = "class_10/class_10_0.png"
    direct = predictor.predict_paths([new / path]).probs[0].numpy()
    got = [float(rows[path][f"p_{c}"]) for c in CLASSES]
    assert got == pytest.approx(direct, abs=1e-5)
    assert rows[path]["label"] == "class_10"
    assert rows[path]["correct"] == str(int(CLASSES[int(np.argmax(direct))] == "class_10"))
    confusion = read_rows(result.folder / "confusion.csv")
    assert [r["true \\ predicted"] for r in confusion] == list(CLASSES)
    assert sum(int(v) for k, v in confusion[1].items() if k in CLASSES) == 0  # class_2: absent
    assert sum(int(v) for k, v in confusion[2].items() if k in CLASSES) == 4


def test_unknown_class_is_an_error_naming_it(run, tmp_path):
    new = fx.make_class_folder(tmp_path / "other", classes=("class_1", "Class_2", "zebra"))
    with pytest.raises(ImgclfError) as e:
        evaluate_run(run, data=new)
    msg = str(e.value)
    assert "'zebra'" in msg and "did you mean 'class_2'" in msg and "class_10" in msg
    assert not (run / "evaluations" / "other").exists()


@pytest.mark.parametrize("mode", ["flip", "multi-crop"])
def test_tta_names_the_evaluation_and_gives_probabilities(run, mode):
    result = evaluate_run(run, split="val", tta=mode)
    assert result.folder.name == f"val-tta-{mode}" and result.record["tta"] == mode
    rows = read_rows(result.folder / "predictions.csv")
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert probs.shape == (6, 3) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    if mode == "flip":  # (multi-crop of a crop_pct 1.0 model is five identical views)
        root = json.loads((run / "data.json").read_text())["root"]
        plain = Predictor.from_run(run).predict_paths([f"{root}/{r['path']}" for r in rows])
        assert not np.allclose(plain.probs.numpy(), probs, atol=1e-6), "flip changed nothing"


def test_bad_arguments_are_errors(run, tmp_path):
    with pytest.raises(ImgclfError, match="either --split or --data"):
        evaluate_run(run, split="test", data=tmp_path)
    with pytest.raises(ImgclfError, match="--name"):
        evaluate_run(run, split="test", name="../escape")
    with pytest.raises(ImgclfError, match="does not exist"):
        evaluate_run(tmp_path / "nope")
