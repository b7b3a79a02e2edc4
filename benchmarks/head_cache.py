"""Head training from cached backbone features against the same head through the frozen backbone.

    .venv/bin/python benchmarks/head_cache.py [--epochs 10] [--views 4] [--size 64]

Same data (the digits example), model (EfficientNet-Lite0, packaged weights, frozen), head,
optimizer, schedule, epochs and seed; (a) `train.features: cache` with K augmented views per
training image, once with an empty cache (the one-time extraction included) and once with the
cache already there (as every later run or sweep trial sees it); (b) `train.features: none`,
augmenting and running the backbone every epoch. Prints the training time of the epochs, the
whole fit time, test accuracy and the ratios (target: ≥ 20× faster, accuracy within 1 point).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

from imgclf.config import load_config
from imgclf.configs import config_path
from imgclf.data.example import digits_folder
from imgclf.workflows.training import train


def one(tmp: Path, features: str, args, cache: Path, augment: str, views: int) -> dict:
    overrides = [
        # the whole mapping: the recipe's explicit rotation / scale would outlive a preset change
        f"train.augment={{preset: {augment}}}",
        f"data.root={digits_folder()}",
        f"data.manifest={tmp / 'manifest'}",
        f"runs_dir={tmp / 'runs'}",
        f"data.image_size={args.size}",
        f"train.features={features}",
        f"train.feature_views={views}",
        f"train.feature_cache={cache}",
        "tracking.mlflow=false",
        f"train.stages=[{{trainable: head, epochs: {args.epochs}, lr: 0.01, schedule: cosine}}]",
    ]
    run = train(
        load_config(config_path("digits_lite0"), overrides), progress=False, log=lambda *_: None
    )
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv") as f:
        epochs = sum(float(r["seconds"]) for r in csv.DictReader(f))
    return {
        "epochs_s": epochs,
        "fit_s": summary["train_seconds"],
        "test_accuracy": summary["test"]["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    print(
        f"digits, efficientnet_lite0 (packaged, frozen) at {args.size}px, {args.epochs} epochs, CPU"
    )
    # No augmentation: both paths see identical inputs and batches (the target's comparison).
    # With augmentation, (a) cycles through K cached views while (b) draws a fresh one per epoch.
    for augment, views in (("none", 1), ("light", args.views)):
        tmp = Path(tempfile.mkdtemp(prefix="imgclf-head-cache-"))
        try:
            cache = tmp / "features"
            cold = one(tmp, "cache", args, cache, augment, views)
            warm = one(tmp, "cache", args, cache, augment, views)
            full = one(tmp, "none", args, cache, augment, views)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report(f"augment {augment}, {views} cached view(s)", cold, warm, full)


def report(title: str, cold: dict, warm: dict, full: dict) -> None:
    print(title)
    rows = (
        ("(a) cache, first run (extracts)", cold),
        ("(a) cache, cache present", warm),
        ("(b) backbone every epoch", full),
    )
    for name, r in rows:
        print(
            f"  {name:34s} epochs {r['epochs_s']:8.2f} s   fit {r['fit_s']:8.2f} s   "
            f"test accuracy {r['test_accuracy']:.4f}"
        )
    print(
        f"  speed-up of the training epochs:          {full['epochs_s'] / warm['epochs_s']:8.1f}x "
        "(target >= 20x)"
    )
    print(f"  speed-up of the whole fit, cache present: {full['fit_s'] / warm['fit_s']:8.1f}x")
    print(f"  speed-up of the whole fit, incl. caching: {full['fit_s'] / cold['fit_s']:8.1f}x")
    gap = 100 * (full["test_accuracy"] - warm["test_accuracy"])
    print(f"  accuracy (b) - (a): {gap:+.2f} points (target within 1 point)")


if __name__ == "__main__":
    main()
