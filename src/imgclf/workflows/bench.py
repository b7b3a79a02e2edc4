"""`imgclf bench`: where the time goes, measured on the user's own data and machine.

- `bench loader`: one pass of the standard training DataLoader (decode + augment per image in
  worker processes, no model) for each worker count — the epoch-time-against-workers table —
  and the smallest count within 5 % of the best, recommended for `train.workers`.
- `bench train`: the same model, batch, precision and memory format fed three ways in one run:
  the standard pipeline, the cached pipeline (decode-once image cache + batch augmentation on
  the device) and synthetic batches already on the device — the limit no loader can beat.
  Each through imgclf's own training loop: time to the first step (set-up, workers, first
  batches), the one-time cache build, and steady-state images/s after warm-up.
- `bench predict`: images/s of a run's Predictor over a folder of images.
Figures from a shared machine vary between runs; compare pipelines within one run (ratios).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from imgclf.config import RunConfig
from imgclf.data.batches import build_loaders
from imgclf.data.prepare import prepare
from imgclf.errors import ImgclfError
from imgclf.models import build_model
from imgclf.train.loop import EpochState, train_one_epoch
from imgclf.train.recipe import resolve_recipe
from imgclf.train.step import (
    assemble,
    maybe_compile,
    prepare_model,
    resolve_precision,
    seed_everything,
    setup_stage,
    use_channels_last,
)

Log = Callable[[str], None]
PIPELINES = ("standard", "cached", "synthetic")


def bench_loader(cfg: RunConfig, workers: Sequence[int], max_batches: int | None, log: Log):
    """Rows of (workers, seconds, images/s) for one pass of the standard training loader."""
    manifest, _ = prepare(cfg.data, progress=False)
    model_cfg = cfg.model.model_copy(update={"pretrained": "none"})  # only its preprocessing
    _, pre = build_model(model_cfg, len(manifest.labels), cfg.data.image_size, cfg.data.crop_mode)
    rows = []
    for w in workers:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.workers, run_cfg.data.cache = w, "none"
        loader, sampler, _ = build_loaders(run_cfg, manifest, pre)
        sampler.set_epoch(0)
        t0, seen = time.perf_counter(), 0
        for batch in islice(loader, max_batches):
            seen += 0 if batch["x"] is None else len(batch["x"])
        seconds = time.perf_counter() - t0
        rows.append({"workers": w, "seconds": seconds, "images_per_s": seen / seconds})
        log(f"workers {w:>2}: {seen} images in {seconds:.2f} s = {seen / seconds:,.0f} images/s")
    return rows


def recommend_workers(rows: list[dict]) -> int:
    """The fewest workers within 5 % of the fastest: more only cost memory and start-up."""
    best = max(r["images_per_s"] for r in rows)
    return min(r["workers"] for r in rows if r["images_per_s"] >= 0.95 * best)


def bench_train(
    cfg: RunConfig,
    pipelines: Sequence[str] = PIPELINES,
    *,
    steps: int = 30,
    warmup: int = 5,
    log: Log = print,
) -> list[dict]:
    """One row per pipeline: first-step seconds, cache build seconds, steady images/s."""
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise ImgclfError(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    manifest, _ = prepare(cfg.data, progress=False)
    parts = assemble(cfg)  # one process, whatever WORLD_SIZE says
    fabric, device, channels_last = parts.fabric, parts.device, parts.channels_last
    rows = []
    for name in pipelines:
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        model, pre = build_model(
            cfg.model, len(manifest.labels), cfg.data.image_size, cfg.data.crop_mode
        )
        model = prepare_model(cfg, parts, model)
        # The first stage a run would train, its `auto` epochs as numbers (train/recipe.py).
        random_backbone = model.spec.get("pretrained") == "none"
        n_train = len(manifest.split_entries("train"))
        stage = resolve_recipe(cfg.train, n_train, random_backbone).first_trained
        built = setup_stage(
            fabric, model, stage, steps + warmup + 1, compiled=maybe_compile(cfg, model)
        )
        wrapped, optimizer, schedule = built.model, built.optimizer, built.schedule
        build_seconds = 0.0
        if name == "synthetic":
            batches = _synthetic(cfg, pre.input_size, len(manifest.labels), device)
            loader: Iterable = _cycle(batches)
        else:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.data.cache = "none" if name == "standard" else _cache_mode(cfg)
            loader, sampler, val = build_loaders(
                run_cfg, manifest, pre, device=device, channels_last=channels_last, log=log
            )
            build_seconds = _cache_seconds(loader) + _cache_seconds(val)
            loader = _epochs(loader, sampler)
        it = iter(loader)

        def run(n: int, sync_every: int, it=it, wrapped=wrapped, optimizer=optimizer,
                schedule=schedule) -> float:  # fmt: skip
            state = train_one_epoch(
                fabric, wrapped, islice(it, n), torch.nn.CrossEntropyLoss(), optimizer,
                schedule, state=EpochState(), channels_last=channels_last, sync_every=sync_every,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            return state.seen

        run(1, 1)
        first_step = time.perf_counter() - t0
        run(warmup, warmup)
        t1 = time.perf_counter()
        seen = run(steps, steps)
        rate = seen / (time.perf_counter() - t1)
        row = {
            "pipeline": name,
            "first_step_s": first_step,
            "cache_build_s": build_seconds,
            "images_per_s": rate,
        }
        rows.append(row)
        log(
            f"{name:>9}: {rate:,.0f} images/s steady, first step after {first_step:.1f} s"
            + (f" (cache built in {build_seconds:.1f} s)" if build_seconds else "")
        )
    return rows


def describe(cfg: RunConfig) -> dict[str, Any]:
    """What every figure depends on, printed with it."""
    device = "cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu"
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "batch_size": cfg.train.batch_size,
        "precision": resolve_precision(cfg),
        "memory_format": "channels_last" if use_channels_last(cfg, device) else "contiguous",
        "augment": cfg.train.augment.preset,
    }


def bench_predict(run: Path, paths: Sequence[Path], batch_size: int, workers: int, log: Log):
    """images/s of the run's Predictor over `paths` (model loading excluded), best of two."""
    from imgclf.predict.predictor import Predictor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor.from_run(run, device=device)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        predictor.predict_paths(paths, batch_size=batch_size, workers=workers)
        best = max(best, len(paths) / (time.perf_counter() - t0))
    log(f"predict: {len(paths)} images, {best:,.0f} images/s (batch {batch_size}, {workers} "
        f"workers, {device})")  # fmt: skip
    return {"images": len(paths), "images_per_s": best, "device": device}


def _cache_mode(cfg: RunConfig) -> str:
    return cfg.data.cache if cfg.data.cache != "none" else "auto"


def _cache_seconds(loader) -> float:
    cache = getattr(loader, "cache", None)
    return float(cache.build_seconds) if cache is not None else 0.0


def _epochs(loader, sampler):
    """Batches without end: epoch after epoch, as training sees them."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _cycle(batches: list[dict]):
    while True:
        yield from batches


def _synthetic(cfg: RunConfig, size: int, classes: int, device) -> list[dict]:
    """A few distinct batches already on the device: what the model alone can do."""
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    return [
        {
            "x": torch.randn(b, 3, size, size, generator=g).to(device),
            "y": torch.randint(0, classes, (b,), generator=g).to(device),
            "bad": [],
        }
        for _ in range(4)
    ]
