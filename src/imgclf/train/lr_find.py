"""The learning-rate range test, independent of any training loop.

`step(lr)` runs one real training step at that lr and returns its loss. The lr grows
exponentially from start_lr to end_lr; the loss is smoothed (exponential moving average,
bias-corrected) and the sweep stops once it exceeds `diverge` × the best smoothed loss. The sweep
trains the model: save its weights before and restore them after.

The suggestion is a tenth of the lr at the smoothed loss's minimum (Smith's and fastai's
`lr_min` rule), not the steepest descent. The minimum sits where training starts to become
unstable, so one decade below it is still in the fast-descending part of the curve with a
safety margin. The steepest slope depends on a derivative of a noisy, lagging curve (the moving
average shifts every feature towards larger lrs) and, on real sweeps, often landed right next to
the minimum — too aggressive for a whole stage.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.errors import ImgclfError


@dataclass
class LRFindResult:
    """The swept lrs, their smoothed losses, the suggested lr and how the sweep ended."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    reason: str
    raw_losses: list[float] = field(default_factory=list)
    # Seconds each step took (its batch fetched, forward, backward, update): a training speed
    # without the set-up before the first step (model build, image cache, loader start).
    step_seconds: list[float] = field(default_factory=list)


def lr_find(
    step: Callable[[float], float],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
    on_step: Callable[[float, float], None] | None = None,
) -> LRFindResult:
    """Sweep the lr exponentially, one `step(lr)` each, and suggest a tenth of the minimum's lr.

    `on_step(lr, loss)` is called after every step (progress).
    """
    if not (0 < start_lr < end_lr and num_steps >= 2 and 0 <= smooth < 1 and diverge > 1):
        raise ImgclfError(
            "lr_find needs 0 < start_lr < end_lr, num_steps ≥ 2, 0 ≤ smooth < 1 and diverge > 1; "
            f"got {start_lr=}, {end_lr=}, {num_steps=}, {smooth=}, {diverge=}"
        )
    ratio = end_lr / start_lr
    lrs: list[float] = []
    losses: list[float] = []
    raw: list[float] = []
    seconds: list[float] = []
    avg, best = 0.0, math.inf
    reason = f"reached end_lr {end_lr:g}"
    for i in range(num_steps):
        lr = start_lr * ratio ** (i / (num_steps - 1))
        t0 = time.perf_counter()
        loss = float(step(lr))
        seconds.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(lr, loss)
        if not math.isfinite(loss):
            reason = f"loss became {loss} at lr {lr:.3g}"
            break
        avg = smooth * avg + (1 - smooth) * loss
        smoothed = avg / (1 - smooth ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        raw.append(loss)
        if smoothed > diverge * best:
            reason = f"loss diverged (> {diverge:g} × best) at lr {lr:.3g}"
            break
        best = min(best, smoothed)
    if not lrs:
        raise ImgclfError(f"lr_find: {reason}, the very first step; check the model and data")
    suggestion, how = suggest(lrs, losses)
    return LRFindResult(lrs, losses, suggestion, f"{reason}; {how}", raw, seconds)


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, str]:
    """A tenth of the lr at the smoothed loss's minimum (see the module docstring), and why."""
    imin = int(np.argmin(losses))
    suggestion = lrs[imin] / 10
    how = f"suggestion {suggestion:.3g}: the minimum's lr {lrs[imin]:.3g} / 10"
    if imin == 0:
        how += " (the loss never fell: try a lower start lr)"
    return suggestion, how


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Save the loss-vs-lr curve with the suggestion marked as a PNG (atomic write)."""
    # The object API with the Agg canvas: no pyplot global state, safe without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if result.raw_losses:
        ax.plot(result.lrs, result.raw_losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggestion {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    if result.losses:
        # Keep the diverging tail from flattening the interesting part of the curve.
        low, high = min(result.losses + result.raw_losses), result.losses[0]
        ax.set_ylim(low - 0.1 * abs(high - low), max(high, low) + 0.5 * abs(high - low) + 1e-12)
    ax.legend()
    ax.set_title(result.reason, fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
