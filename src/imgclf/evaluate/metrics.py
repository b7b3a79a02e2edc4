"""Classification metrics from predicted probabilities, in numpy, each matching scikit-learn.

Conventions (chosen to agree with scikit-learn's defaults on the same predictions):
- macro and weighted precision / recall / F1 average over the classes present in the targets or
  the predictions (sklearn's default `labels`); an ill-defined ratio (0 / 0) counts as 0;
- balanced accuracy is the mean recall over the classes present in the targets;
- log loss clips probabilities to [eps, 1 - eps] (float64 eps) and does not renormalise;
- top-k ranks classes as sklearn does (on exact ties the higher class index wins).
Calibration: expected calibration error over 15 equal-width bins of the top-1 confidence, each
bin holding the confidences in (lower, upper] (the first also holds 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOP_K = (1, 3, 5)
ECE_BINS = 15
CONFUSED_WITH = 3


@dataclass
class MetricReport:
    """Everything computed from one set of predictions."""

    summary: dict[str, Any]  # scalar metrics, JSON-ready
    per_class: list[dict[str, Any]]  # one row per class of the label map, in its order
    confusion: np.ndarray  # counts, rows = true class, columns = predicted class
    confusion_normalised: np.ndarray  # each row divided by its support (0 for empty rows)
    reliability: list[dict[str, Any]] = field(default_factory=list)  # one row per bin


def as_numpy(probs: Any) -> np.ndarray:
    """An (N, C) float64 array from a torch tensor, array or nested list."""
    if hasattr(probs, "detach"):
        probs = probs.detach().cpu().numpy()
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {arr.shape}")
    return arr


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the target."""
    return float(np.mean(probs.argmax(1) == targets)) if len(targets) else float("nan")


def top_k_hits(probs: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the target among the k most probable classes? The one top-k of imgclf:
    training's `val_top5` and evaluation's `top_k_accuracy` both count these hits.

    Ranks as scikit-learn does (on exact ties the higher class index wins): the target's rank is
    the number of classes more probable than it, plus the equally probable ones with a higher
    index. No sort: O(N × C), so it runs every epoch on a large validation split.
    """
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(t) == 0:
        return np.zeros(0, dtype=bool)
    p_target = np.take_along_axis(probs, t[:, None], axis=1)
    above = (probs > p_target).sum(1)
    tied_after = ((probs == p_target) & (np.arange(probs.shape[1]) > t[:, None])).sum(1)
    return above + tied_after < k


def top_k_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among the k most probable classes."""
    return float(np.mean(top_k_hits(probs, targets, k)))


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    flat = targets.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def normalise_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total; rows of a class absent from the targets stay 0."""
    support = cm.sum(1, keepdims=True)
    return np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where a ratio is 0 / 0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)  # = 2PR / (P + R), and 0 when tp is 0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def averaged_scores(cm: np.ndarray) -> dict[str, float]:
    """Macro and weighted precision / recall / F1 over classes seen in targets or predictions."""
    s = per_class_scores(cm)
    seen = (cm.sum(0) + cm.sum(1)) > 0
    weights = s["support"][seen]
    out = {}
    for name in ("precision", "recall", "f1"):
        values = s[name][seen]
        out[f"{name}_macro"] = float(values.mean()) if values.size else float("nan")
        out[f"{name}_weighted"] = (
            float(np.average(values, weights=weights)) if weights.sum() else float("nan")
        )
    return out


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the targets."""
    support = cm.sum(1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else 0.0


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log probability of the target class."""
    eps = np.finfo(np.float64).eps
    p = np.clip(probs[np.arange(len(targets)), targets], eps, 1 - eps)
    return float(-np.log(p).mean())


def calibration(
    probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error and the reliability-diagram rows (top-1 confidence)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], conf, side="left")  # (lower, upper] per bin
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else None
        mean_conf = float(conf[mask].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(acc - mean_conf)
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": n,
                "accuracy": acc,
                "confidence": mean_conf,
            }
        )
    return float(ece), rows


def most_confused_with(cm: np.ndarray, labels: Sequence[str], k: int = CONFUSED_WITH) -> list:
    """Per true class, up to k (class, count) pairs it was most often predicted as."""
    out = []
    for i, row in enumerate(cm):
        off = [(int(row[j]), j) for j in range(len(row)) if j != i and row[j] > 0]
        off.sort(key=lambda t: (-t[0], t[1]))
        out.append([(labels[j], n) for n, j in off[:k]])
    return out


def compute_metrics(probs: Any, targets: Any, labels: Sequence[str]) -> MetricReport:
    """All metrics for (N, C) probabilities and integer targets over the label map `labels`."""
    p = as_numpy(probs)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    c = len(labels)
    if p.shape != (len(t), c):
        raise ValueError(f"probabilities {p.shape} do not match {len(t)} targets × {c} classes")
    if len(t) == 0:
        raise ValueError("no predictions to evaluate")
    cm = confusion_matrix(t, p.argmax(1), c)
    summary: dict[str, Any] = {"images": len(t), "classes": c, "accuracy": accuracy(p, t)}
    for k in TOP_K:
        if k < c:
            summary[f"top_{k}_accuracy"] = top_k_accuracy(p, t, k)
    summary["balanced_accuracy"] = balanced_accuracy(cm)
    summary.update(averaged_scores(cm))
    summary["log_loss"] = log_loss(p, t)
    summary["ece"], reliability = calibration(p, t)
    summary["mean_confidence"] = float(p.max(1).mean())
    return MetricReport(
        summary=summary,
        per_class=_per_class_rows(cm, labels),
        confusion=cm,
        confusion_normalised=normalise_rows(cm),
        reliability=reliability,
    )


def _per_class_rows(cm: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    s = per_class_scores(cm)
    confused = most_confused_with(cm, labels)
    rows = []
    for i, name in enumerate(labels):
        row: dict[str, Any] = {
            "class": name,
            "support": int(s["support"][i]),
            "predicted": int(cm[:, i].sum()),
            "precision": float(s["precision"][i]),
            "recall": float(s["recall"][i]),
            "f1": float(s["f1"][i]),
        }
        for r in range(CONFUSED_WITH):
            other, n = confused[i][r] if r < len(confused[i]) else ("", 0)
            row[f"confused_{r + 1}"] = other
            row[f"confused_{r + 1}_count"] = n
        rows.append(row)
    return rows


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)
