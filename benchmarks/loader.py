"""imgclf's standard training loader against a plain torchvision script, on the CPU (issue 12).

    .venv/bin/python benchmarks/loader.py [--images 400] [--photo 500x375] [--size 224]
        [--batch 32] [--epochs 3] [--workers 0,2] [--rounds 5] [--out bench_loader.json]

No model: only the loaders, so the figure is the data pipeline's own speed. On the same generated
JPEG folder (made once under $IMGCLF_CACHE/bench/), with the same workers and batch size:
  reference — torchvision ImageFolder + DataLoader, RandomResizedCrop (the `light` preset's
      scale, so both do the same work) + horizontal flip + ToTensor + Normalize, shuffled,
      persistent workers: what a careful hand-written script does; over the images of
      imgclf's train split, so both load as many batches per epoch;
  light / default — imgclf's training loader (`build_loaders`, data.cache=none) at that preset:
      the one image loader (EXIF orientation, colour normalisation), per-sample seeds (exact
      resume, worker-count independent augmentation), bad-image skipping.
Each pipeline runs --epochs epochs per round (the first, with worker start-up, is not counted);
within a round the pipelines run back to back in a rotating order and the ratios are taken per
round, then the median over rounds is reported, so drift in the machine's speed (large on a
shared host) hits both sides of each ratio alike. Prints images/s per pipeline and worker count
and the ratios the issue's targets are written in: light / reference (target ≥ 1.0) and
default's cost per image / light's (target ≤ 1.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from imgclf.config import load_config
from imgclf.data.batches import build_loaders
from imgclf.data.example import cache_dir
from imgclf.data.prepare import prepare
from imgclf.models import build_model

from photos import dataset

MEAN = STD = (0.5, 0.5, 0.5)
LIGHT_SCALE = (0.6, 1.0)  # transforms.PRESETS["light"]["scale"]


def reference(folder: Path, size: int, batch: int, workers: int, files: set[str]):
    """`files`: the images imgclf trains on (its train split), so both sides load as many
    batches per epoch (11 batches against 12 over 2 workers once cost imgclf 8 % here)."""
    tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=LIGHT_SCALE),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(folder, tf, is_valid_file=lambda p: str(Path(p).resolve()) in files),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return loader, lambda epoch: None, lambda b: len(b[0])


def imgclf_config(folder: Path, size: int, batch: int, workers: int, preset: str):
    return load_config(
        None,
        [
            f"data.root={folder}",
            f"data.manifest={folder.parent / (folder.name + '-manifest')}",
            "data.split.train=0.9",
            "data.split.val=0.05",
            "data.split.test=0.05",
            f"data.image_size={size}",
            "data.cache=none",
            "model.name=scratch_cnn",
            "model.pretrained=none",
            f"train.batch_size={batch}",
            f"train.workers={workers}",
            f"train.augment.preset={preset}",
        ],
    )


def train_files(folder: Path, size: int) -> set[str]:
    """The images of imgclf's train split (absolute paths)."""
    manifest, _ = prepare(imgclf_config(folder, size, 32, 0, "light").data, progress=False)
    return {str((Path(manifest.root) / e.path).resolve()) for e in manifest.split_entries("train")}


def imgclf_loader(folder: Path, size: int, batch: int, workers: int, preset: str):
    cfg = imgclf_config(folder, size, batch, workers, preset)
    manifest, _ = prepare(cfg.data, progress=False)
    _, pre = build_model(cfg.model, len(manifest.labels), cfg.data.image_size, cfg.data.crop_mode)
    # torchvision's defaults: the same normalisation and bilinear resampling on both sides.
    pre = dataclasses.replace(pre, mean=MEAN, std=STD, interpolation="bilinear")
    loader, sampler, _ = build_loaders(cfg, manifest, pre, device=torch.device("cpu"))
    return loader, sampler.set_epoch, lambda b: 0 if b["x"] is None else len(b["x"])


def images_per_s(made, epochs: int) -> tuple[float, int]:
    loader, set_epoch, count = made
    images, seconds = 0, 0.0
    for epoch in range(epochs):
        set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(count(b) for b in loader)
        if epoch:  # the first epoch pays for worker start-up
            images, seconds = images + n, seconds + time.perf_counter() - t0
    return images / seconds, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--photo", default="500x375", help="W x H of the generated JPEGs")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench_loader.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting; the same for workers=0
    w, h = (int(v) for v in args.photo.lower().split("x"))
    folder = dataset(cache_dir() / "bench" / f"photos-{args.images}-{w}x{h}", args.images, w, h)
    files = train_files(folder, args.size)
    pipelines = {
        "reference": lambda k: reference(folder, args.size, args.batch, k, files),
        "light": lambda k: imgclf_loader(folder, args.size, args.batch, k, "light"),
        "default": lambda k: imgclf_loader(folder, args.size, args.batch, k, "default"),
    }
    rows = []
    names = list(pipelines)
    for workers in (int(x) for x in args.workers.split(",")):
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            # Back to back, in a rotating order: each round's ratios compare like with like
            # even when the machine's speed drifts (shared hosts do, by ±20 %).
            for name in names[r % 3 :] + names[: r % 3]:
                rate, _n = images_per_s(pipelines[name](workers), args.epochs)
                rates[name].append(rate)
        light_ratio = [a / b for a, b in zip(rates["light"], rates["reference"], strict=True)]
        default_cost = [a / b for a, b in zip(rates["light"], rates["default"], strict=True)]
        row = {
            "workers": workers,
            **{f"{name}_images_per_s": statistics.median(rates[name]) for name in names},
            "light_vs_reference": statistics.median(light_ratio),
            "light_vs_reference_rounds": light_ratio,
            "default_cost_vs_light": statistics.median(default_cost),
            "default_cost_vs_light_rounds": default_cost,
        }
        rows.append(row)
        print(
            f"workers {workers}: reference {row['reference_images_per_s']:.0f} img/s, imgclf "
            f"light {row['light_images_per_s']:.0f}, default {row['default_images_per_s']:.0f} "
            f"(medians of {args.rounds} rounds) | light / reference "
            f"{row['light_vs_reference']:.2f} (target ≥ 1.0; rounds "
            f"{', '.join(f'{x:.2f}' for x in light_ratio)}), default cost / light "
            f"{row['default_cost_vs_light']:.2f} (target ≤ 1.5)"
        )
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                   indent=2))  # fmt: skip
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
