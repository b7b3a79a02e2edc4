"""Training curves as static PNGs (matplotlib, Agg), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt

from imgclf.files import atomic_write_bytes


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss and accuracy per epoch, train vs validation, stage boundaries marked."""
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            if any(key in r for r in history):
                ax.plot(
                    epochs, [r.get(key, float("nan")) for r in history], style, ms=3, label=split
                )
        for prev, row in itertools.pairwise(history):
            if row["stage"] != prev["stage"]:
                ax.axvline(prev["epoch"] + 0.5, color="grey", ls="--", lw=1)
                ax.text(
                    prev["epoch"] + 0.6,
                    ax.get_ylim()[1],
                    f"stage {row['stage']}",
                    va="top",
                    fontsize=8,
                    color="grey",
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
