"""One predictions-CSV writer (issue 15): a run's predictions/{val,test}.csv, an evaluation's
predictions.csv and `imgclf predict`'s CSV all go through `predict.output.write_csv`: a header,
every row as wide as the header (a file that could not be read has empty values, never a short
row), probabilities with 6 decimals."""

import csv
from types import SimpleNamespace

import torch

from imgclf.evaluate.evaluate import _write_predictions
from imgclf.predict.predictor import Predictions
from imgclf.workflows.finalize import write_predictions

LABELS = ["cat", "dog", "fish"]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_a_runs_predictions_keep_their_columns_and_error_rows_are_full_width(tmp_path):
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=torch.float32)
    preds = Predictions(paths=["a", "b", "c"], probs=probs, ok=[0, 2], errors={1: "decode"})
    out = tmp_path / "val.csv"
    write_predictions(out, preds, LABELS, ["a.png", "b.png", "c.png"], ["dog", "cat", "fish"])
    rows = _rows(out)
    assert rows[0] == ["path", "label", "predicted", "confidence", "status", "p_cat", "p_dog",
                       "p_fish"]  # fmt: skip
    assert all(len(r) == len(rows[0]) for r in rows)
    assert rows[1] == ["a.png", "dog", "dog", "0.700000", "ok", "0.100000", "0.700000", "0.200000"]
    assert rows[2] == ["b.png", "cat", "", "", "error: decode", "", "", ""]
    assert rows[3][:5] == ["c.png", "fish", "cat", "0.500000", "ok"]  # first of the maxima
    assert out.read_text().count("\r") == 0  # "\n" line ends, as before


def test_an_evaluations_predictions_keep_their_columns_and_error_rows_are_full_width(tmp_path):
    samples = [
        SimpleNamespace(path="a.png", label="fish", status="ok"),
        SimpleNamespace(path="b.png", label="cat", status="skipped: truncated"),
    ]
    probs = torch.tensor([[0.2, 0.3, 0.5]]).numpy()
    _write_predictions(tmp_path, samples, {0: 0}, probs, LABELS)
    rows = _rows(tmp_path / "predictions.csv")
    head = ["path", "label", "predicted", "confidence", "p_true", "loss", "correct", "status"]
    assert rows[0] == [*head, "p_cat", "p_dog", "p_fish"]
    assert all(len(r) == len(rows[0]) for r in rows)
    assert rows[1][:8] == ["a.png", "fish", "fish", "0.500000", "0.500000", "0.693147", "1", "ok"]
    assert rows[1][8:] == ["0.200000", "0.300000", "0.500000"]
    assert rows[2] == ["b.png", "cat", "", "", "", "", "", "skipped: truncated", "", "", ""]
