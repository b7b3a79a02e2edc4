"""Error analysis on top of the metrics: which classes get confused with which, which images the
model is most confidently wrong about, which labels look wrong, whether training over-fitted,
and the figures of an evaluation (confusion matrices, reliability diagram, per-class F1).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.evaluate.metrics import MetricReport
from imgclf.files import atomic_write_bytes
from imgclf.runs.layout import read_metrics

GROUP_THRESHOLD = 0.05
MOST_WRONG = 25


def symmetric_confusion(normalised: np.ndarray) -> np.ndarray:
    """How often classes i and j are mistaken for each other: mean of the two row-normalised
    rates, with a zero diagonal."""
    s = (np.asarray(normalised, dtype=np.float64) + np.asarray(normalised).T) / 2
    np.fill_diagonal(s, 0.0)
    return s


def _linkage(normalised: np.ndarray) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    # Rates are in [0, 1]: 1 - rate is a distance, 0 for a pair always mistaken for each other.
    dist = 1.0 - np.clip(symmetric_confusion(normalised), 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    return linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)


def cluster_order(normalised: np.ndarray) -> list[int]:
    """A class order that puts classes confused with each other next to each other."""
    c = len(normalised)
    if c < 3:
        return list(range(c))
    from scipy.cluster.hierarchy import leaves_list

    return [int(i) for i in leaves_list(_linkage(normalised))]


def confusion_groups(
    normalised: np.ndarray, labels: Sequence[str], threshold: float = GROUP_THRESHOLD
) -> list[list[str]]:
    """Groups of classes most confused with each other: the coarse classes of a two-stage model.

    Average-linkage clustering of the symmetrised row-normalised confusion: two groups merge while
    the mean confusion rate between their classes is at least `threshold`. Every class lands in
    exactly one group (unconfused classes alone); groups come largest first, classes in
    label-map order.
    """
    c = len(labels)
    if c == 0:
        return []
    if c == 1:
        return [[labels[0]]]
    from scipy.cluster.hierarchy import fcluster

    ids = fcluster(_linkage(normalised), t=1.0 - threshold, criterion="distance")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(int(g), []).append(i)
    groups = sorted(members.values(), key=lambda m: (-len(m), m[0]))
    return [[labels[i] for i in m] for m in groups]


def most_wrong(
    paths: Sequence[str],
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    k: int = MOST_WRONG,
) -> list[dict[str, Any]]:
    """The k wrong predictions made with the highest confidence."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != targets)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:k]
    return [
        {
            "path": paths[i],
            "true": labels[targets[i]],
            "predicted": labels[pred[i]],
            "probability": float(probs[i, pred[i]]),
            "p_true": float(probs[i, targets[i]]),
        }
        for i in order
    ]


def label_issues(
    paths: Sequence[str], probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> list[dict[str, Any]]:
    """Suspected label errors, confident-learning style (Northcutt et al., "cleanlab").

    Each class j gets a threshold t_j: the mean probability of j over the images labelled j
    (its average self-confidence). An image labelled y is suspect when p_y < t_y while some
    other class j reaches p_j >= t_j; the suggestion is the most probable such j. Sorted by the
    margin p_suggested - p_given, largest first. Classes with no images have no threshold and are
    never suggested.
    """
    c = probs.shape[1]
    thresholds = np.full(c, np.inf)
    for j in range(c):
        mine = targets == j
        if mine.any():
            thresholds[j] = probs[mine, j].mean()
    above = probs >= thresholds[None, :]
    rows = []
    for i, y in enumerate(targets):
        if probs[i, y] >= thresholds[y]:
            continue
        others = np.flatnonzero(above[i])
        others = others[others != y]
        if not others.size:
            continue
        j = int(others[np.argmax(probs[i, others])])
        rows.append(
            {
                "path": paths[i],
                "given": labels[y],
                "suggested": labels[j],
                "p_given": float(probs[i, y]),
                "p_suggested": float(probs[i, j]),
                "threshold_given": float(thresholds[y]),
                "margin": float(probs[i, j] - probs[i, y]),
            }
        )
    rows.sort(key=lambda r: -r["margin"])
    return rows


def read_history(metrics_csv: Path) -> list[dict[str, float]]:
    """A run's metrics.csv as rows of floats (empty cells become NaN); [] when absent."""
    return read_metrics(metrics_csv)


def overfitting(history: list[dict[str, float]], best_epoch: int | None) -> dict[str, Any]:
    """Train–validation gaps at the best epoch and the trend of val_loss / train_loss.

    The slope (least squares, per epoch) of the loss ratio is the KenyanFood13 "overfitting
    metric": above 0 the validation loss grows relative to the training loss. Training metrics
    are measured in train mode (augmentation, dropout), so small negative gaps are normal.
    """
    keys = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
    rows = [r for r in history if all(math.isfinite(r.get(k, math.nan)) for k in keys)]
    if not rows:
        return {}
    best = next((r for r in rows if best_epoch is not None and r["epoch"] == best_epoch), None)
    best = best or min(rows, key=lambda r: r["val_loss"])
    out: dict[str, Any] = {
        "best_epoch": int(best["epoch"]),
        "accuracy_gap": best["train_accuracy"] - best["val_accuracy"],
        "loss_gap": best["val_loss"] - best["train_loss"],
        "loss_ratio": _safe_ratio(best["val_loss"], best["train_loss"]),
        "epochs": len(rows),
    }
    ratios = [(r["epoch"], _safe_ratio(r["val_loss"], r["train_loss"])) for r in rows]
    ratios = [(e, v) for e, v in ratios if v is not None]
    if len(ratios) >= 2:
        x, y = np.array(ratios).T
        out["loss_ratio_slope"] = float(np.polyfit(x, y, 1)[0])
    else:
        out["loss_ratio_slope"] = None
    return out


def _safe_ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


# ---------------------------------------------------------------- figures (matplotlib, Agg)


def write_figures(folder: Path, report: MetricReport, order: list[int], labels: list[str]) -> None:
    """confusion (counts, normalised, clustered), reliability and per-class F1 PNGs in `folder`."""
    norm = report.confusion_normalised
    _save(folder / "confusion.png", _matrix_figure(report.confusion, labels, "counts", "d"))
    _save(folder / "confusion_normalised.png", _matrix_figure(norm, labels, "row-normalised"))
    clustered = norm[np.ix_(order, order)]
    title = "clustered, row-normalised"
    _save(
        folder / "confusion_clustered.png",
        _matrix_figure(clustered, [labels[i] for i in order], title),
    )
    _save(folder / "reliability.png", _reliability_figure(report))
    _save(folder / "per_class_f1.png", _f1_figure(report.per_class))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix_figure(m: np.ndarray, labels: list[str], title: str, fmt: str = ".2f"):
    plt = _pyplot()
    c = len(labels)
    side = min(max(4.0, 0.35 * c + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 60:  # beyond that, names overlap: the CSV has them
        size = 9 if c <= 20 else 6
        ax.set_xticks(range(c), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(c), labels, fontsize=size)
    if c <= 20:
        top = m.max() or 1
        for (i, j), v in np.ndenumerate(m):
            if v:
                colour = "white" if v > top / 2 else "black"
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})")
    return fig


def _reliability_figure(report: MetricReport):
    plt = _pyplot()
    bins = report.reliability
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    filled = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar(
        [b["lower"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        "o",
        ms=3,
        color="crimson",
        label="mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {report.summary['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _f1_figure(per_class: list[dict]):
    plt = _pyplot()
    c = len(per_class)
    fig, ax = plt.subplots(figsize=(6, min(max(2.5, 0.25 * c + 1), 40)))
    y = np.arange(c)
    ax.barh(y, [r["f1"] for r in per_class], color="steelblue")
    ax.set_yticks(
        y, [f"{r['class']} ({r['support']})" for r in per_class], fontsize=8 if c <= 60 else 5
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (support in brackets)")
    ax.set_title("per-class F1")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _save(path: Path, fig) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
