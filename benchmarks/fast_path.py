"""The fast path against a conventional pipeline and the on-device limit, in one run (issue 7).

    .venv/bin/python benchmarks/fast_path.py [--images 20000] [--photo 500x375] [--model
        tf_efficientnet_lite0] [--size 224] [--batch 256] [--epochs 10] [--workers 16]
        [--out bench_fast_path.json] [--sheet fast_path_sheet.png]

Pipelines, all on the same generated JPEG folder (made once under $IMGCLF_CACHE/bench/), the
same model, batch, precision (bf16 autocast on a GPU) and memory format (channels_last, as a run):
  (a) conventional — written here: torchvision ImageFolder + Pillow DataLoader (RandomResizedCrop
      + flip, pinned memory, persistent workers) and a plain PyTorch loop;
  (b) imgclf standard — imgclf's DataLoader pipeline (the one image loader, per-sample seeds)
      through imgclf's training loop, its step assembled as a run assembles it
      (`imgclf.train.step`: Fabric, precision, memory format, parameter groups, optimizer);
  (c) imgclf cached — decode-once image cache + batch augmentation on the device, same loop
      (the cache is deleted first, so its one-time build is inside the 10-epoch wall time);
  (d) synthetic — batches already on the device: the limit.
For each: time to the first completed step (from the pipeline's start, workers and cache
included), the one-time cache build, steady-state images/s (epochs 2…N), and the wall time of
N epochs including all start-up. Then (a)–(c) again with the loader limited to --few-workers
(4: a cloud machine with few cores per GPU) — the cache build then uses 4 processes too. The
cached pipeline is also timed once more with its cache present (first step once the cache
exists). A contact sheet of CPU-augmented next to batch-augmented samples is written.
Prints a markdown table with the GPU model, torch version, batch size, precision and memory
format, and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from imgclf.config import AugmentConfig, load_config
from imgclf.data.batch_aug import compare_sheet
from imgclf.data.batches import build_loaders
from imgclf.data.example import cache_dir
from imgclf.data.prepare import prepare
from imgclf.models import build_model, default_channels_last, set_train_mode
from imgclf.train.loop import EpochState, train_one_epoch
from imgclf.train.step import (
    assemble,
    prepare_model,
    seed_everything,
    setup_stage,
)

from photos import dataset

MEAN = STD = (0.5, 0.5, 0.5)  # the packaged Lite weights' normalisation; the same for all


class Clock:
    """Timestamps around an iterable of batches: the first completed step (one device sync when
    the second batch is asked for), and device-synced epoch ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t0, self.first_step = device, time.perf_counter(), None
        self.epochs: list[tuple[float, int]] = []  # (end time, images)

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def watch(self, batches, count):
        for i, batch in enumerate(batches):
            if i == 1 and self.first_step is None:
                self.first_step = self.sync() - self.t0
            yield batch
            count[0] += count[1](batch)

    def end_epoch(self, images: int) -> None:
        self.epochs.append((self.sync(), images))

    def figures(self) -> dict:
        ends = [self.t0] + [t for t, _ in self.epochs]
        later = self.epochs[1:] or self.epochs
        seconds = sum(ends[i + 1] - ends[i] for i in range(len(ends) - 1)[-len(later) :])
        return {
            "first_step_s": self.first_step,
            "steady_images_per_s": sum(n for _, n in later) / seconds,
            "wall_s": ends[-1] - self.t0,
        }


def channels_last(device) -> bool:
    """imgclf's default memory format on this device, for the reference loops too."""
    return default_channels_last(device.type)


def setup(args, device, model_name: str):
    model = timm.create_model(model_name, num_classes=10, pretrained=False).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, **fused)


def conventional(args, folder: Path, workers: int, device) -> dict:
    """(a): what a careful hand-written PyTorch script does."""
    torch.manual_seed(0)
    clock = Clock(device)
    model, opt = setup(args, device, args.model)
    tf = T.Compose(
        [
            T.RandomResizedCrop(args.size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(folder, tf),
        batch_size=args.batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
        prefetch_factor=4 if workers else None,
    )
    for _ in range(args.epochs):
        count = [0, lambda b: len(b[0])]
        for x, y in clock.watch(loader, count):
            x = x.to(device, non_blocking=True)
            if channels_last(device):
                x = x.contiguous(memory_format=torch.channels_last)
            step(model, opt, x, y.to(device, non_blocking=True))
        clock.end_epoch(count[0])
    return clock.figures()


def step(model, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    """One plain PyTorch training step (bf16 autocast on a GPU)."""
    cuda = x.device.type == "cuda"
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cuda):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def imgclf_pipeline(args, folder: Path, cache: str, workers: int, device) -> dict:
    """(b) with cache "none", (c) otherwise: imgclf's loaders and loop."""
    cfg = load_config(
        None,
        [
            f"data.root={folder}",
            f"data.manifest={folder.parent / (folder.name + '-manifest')}",
            "data.split.train=0.9",
            "data.split.val=0.05",
            "data.split.test=0.05",
            f"data.image_size={args.size}",
            f"data.cache={cache}",
            f"data.scan.workers={workers}",
            f"model.name={args.model}",
            "model.pretrained=none",
            f"train.batch_size={args.batch}",
            f"train.workers={workers}",
            "train.augment.preset=light",
            "train.augment.scale=[0.08, 1.0]",  # the conventional pipeline's crop
            "train.stages=[{epochs: 1}]",  # the whole model, as the conventional script trains
        ],
    )
    manifest, _ = prepare(cfg.data, progress=False)
    parts = assemble(cfg)  # on a GPU: bf16 autocast, channels_last, as a run trains
    device, channels_last = parts.device, parts.channels_last
    seed_everything(0)
    clock = Clock(device)
    raw, pre = build_model(cfg.model, len(manifest.labels), cfg.data.image_size, cfg.data.crop_mode)
    raw = prepare_model(cfg, parts, raw)
    loader, sampler, val = build_loaders(cfg, manifest, pre, device=device,
                                         channels_last=channels_last)  # fmt: skip
    build = sum(x.cache.build_seconds for x in (loader, val) if hasattr(x, "cache"))
    step = setup_stage(parts.fabric, raw, cfg.train.stages[0], len(loader))
    model, opt, schedule = step.model, step.optimizer, step.schedule
    set_train_mode(raw, True, cfg.train.stages[0].bn)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        count = [0, lambda b: 0 if b["x"] is None else len(b["x"])]
        train_one_epoch(
            parts.fabric,
            model,
            clock.watch(loader, count),
            torch.nn.CrossEntropyLoss(),
            opt,
            schedule,
            state=EpochState(),
            channels_last=channels_last,
            sync_every=25 if device.type == "cuda" else 1,
        )
        clock.end_epoch(count[0])
    return {**clock.figures(), "cache_build_s": build}


def synthetic(args, device) -> dict:
    """(d): the same model on batches already on the device."""
    torch.manual_seed(0)
    clock = Clock(device)
    model, opt = setup(args, device, args.model)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, args.size, args.size, generator=g) for _ in range(4)]
    xs = [x.to(device).contiguous(memory_format=torch.channels_last) for x in xs]
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    steps = max(args.steps_per_epoch, 2)
    for _ in range(args.epochs):
        count = [0, lambda b: args.batch]
        for x in clock.watch((xs[i % 4] for i in range(steps)), count):
            step(model, opt, x, y)
        clock.end_epoch(count[0])
    return clock.figures()


def contact_sheet(folder: Path, size: int, path: Path) -> Path:
    files = sorted(folder.rglob("*.jpg"))[:8]
    images = [Image.open(f).convert("RGB") for f in files]
    aug = AugmentConfig(preset="strong")
    return compare_sheet(images, aug, size, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--photo", default="500x375", help="W x H of the generated JPEGs")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--few-workers", type=int, default=4)
    ap.add_argument("--pipelines", default="a,b,c,d")
    ap.add_argument("--out", type=Path, default=Path("bench_fast_path.json"))
    ap.add_argument("--sheet", type=Path, default=Path("fast_path_sheet.png"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.photo.lower().split("x"))
    folder = dataset(cache_dir() / "bench" / f"photos-{args.images}-{w}x{h}", args.images, w, h)
    args.steps_per_epoch = int(args.images * 0.9) // args.batch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup_info = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "memory_format": "channels_last" if channels_last(device) else "contiguous",
        "images": args.images,
        "photo": args.photo,
        "epochs": args.epochs,
    }
    print(", ".join(f"{k} {v}" for k, v in setup_info.items()))
    wanted = set(args.pipelines.split(","))
    rows = []

    def record(name: str, workers: int | None, figures: dict) -> None:
        rows.append({"pipeline": name, "workers": workers, **figures})
        print(f"{name} ({workers} workers): " + ", ".join(
            f"{k} {v:.2f}" for k, v in figures.items() if v is not None))  # fmt: skip

    image_cache = cache_dir() / "images"
    for workers in (args.workers, args.few_workers):
        if "a" in wanted:
            record("a conventional", workers, conventional(args, folder, workers, device))
        if "b" in wanted:
            record("b imgclf standard", workers, imgclf_pipeline(args, folder, "none", workers,
                                                                  device))  # fmt: skip
        if "c" in wanted:
            shutil.rmtree(image_cache, ignore_errors=True)  # the build counts in the wall time
            record("c imgclf cached", workers, imgclf_pipeline(args, folder, "auto", workers,
                                                                device))  # fmt: skip
    if "c" in wanted:
        record("c cached, cache present", None, imgclf_pipeline(args, folder, "auto", 0, device))
    if "d" in wanted:
        record("d synthetic (limit)", None, synthetic(args, device))
    print("\n| pipeline | workers | first step s | cache build s | steady img/s | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        workers = "–" if r["workers"] is None else r["workers"]
        print(
            f"| {r['pipeline']} | {workers} | {r['first_step_s']:.1f} | "
            f"{r.get('cache_build_s', 0):.1f} | {r['steady_images_per_s']:,.0f} | "
            f"{r['wall_s']:.1f} |"
        )
    print(f"\ncontact sheet: {contact_sheet(folder, args.size, args.sheet)}")
    args.out.write_text(json.dumps({"setup": setup_info, "rows": rows}, indent=2))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
