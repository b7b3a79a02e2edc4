"""The batches a run trains and validates on: the standard DataLoaders (decode and augment
per image in worker processes) or, with `data.cache` on, the decode-once image cache with the
whole batch augmented on the device. Both take the same resumable `EpochSampler`."""

from __future__ import annotations

import torch

from imgclf.config import RunConfig
from imgclf.data.batch_aug import BatchAugment
from imgclf.data.cached_batches import CachedBatches, open_caches, place
from imgclf.data.loaders import (
    EpochSampler,
    ManifestDataset,
    balanced_weights,
    make_loader,
    resolve_workers,
)
from imgclf.data.manifest import Manifest
from imgclf.data.transforms import eval_transform, resolve_augment, train_transform
from imgclf.errors import ImgclfError


def build_loaders(
    cfg: RunConfig,
    manifest: Manifest,
    pre,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    channels_last: bool = False,
    log=print,
    progress: bool = False,
):
    """Train loader (with its resumable sampler) and validation loader for a manifest.

    Under `world` processes each rank loads its share of every global batch and the whole
    validation set (every rank validates the same weights; rank 0's metrics are used). With
    `data.cache` on (and a `device`), batches come from the decode-once image cache and are
    augmented on the device (`data/cached_batches.py`).
    """
    size, t = pre.input_size, cfg.train
    # The model's whole preprocessing: the preset "none" train crop is the eval crop (crop_pct).
    train_tf = train_transform(t.augment, pre)
    eval_tf = eval_transform(pre)
    common = {
        "size_hint": size,
        "max_pixels": cfg.data.scan.max_pixels,
        "min_side": cfg.data.scan.min_side,
    }
    train_ds = ManifestDataset(
        manifest.root, manifest.split_entries("train"), manifest.labels, train_tf, **common
    )
    val_entries = manifest.split_entries("val")
    if not train_ds.paths or not val_entries:
        raise ImgclfError(
            f"training needs images in train and val splits; got {len(train_ds)} "
            f"train and {len(val_entries)} val (see data.split)"
        )
    val_ds = ManifestDataset(manifest.root, val_entries, manifest.labels, eval_tf, **common)
    weights = (
        balanced_weights(train_ds.targets, len(manifest.labels))
        if t.imbalance == "sampler"
        else None
    )
    sampler = EpochSampler(len(train_ds), cfg.seed, weights)
    if world > 1:
        if len(train_ds) < t.batch_size:
            raise ImgclfError(
                f"{len(train_ds)} training images are fewer than one global batch "
                f"(train.batch_size={t.batch_size}); lower the batch size"
            )
        sampler.shard(rank, world, t.batch_size)
    if cfg.data.cache != "none" and device is not None:
        train_cache, val_cache = open_caches(
            cfg, manifest, [train_ds, val_ds], pre, log=log, progress=progress
        )
        placement = place([train_cache, val_cache], cfg.data.cache_device, device, log)
        augment = BatchAugment(resolve_augment(t.augment), pre)
        batches = {"augment": augment, "device": device, "channels_last": channels_last,
                   "placement": placement}  # fmt: skip
        train_loader = CachedBatches(
            train_cache, train_ds.targets, t.batch_size // world, sampler=sampler,
            drop_last=len(train_ds) > t.batch_size, dataset=train_ds, **batches,
        )  # fmt: skip
        val_loader = CachedBatches(
            val_cache, val_ds.targets, (t.eval_batch_size or t.batch_size) // world,
            dataset=val_ds, **batches,
        )  # fmt: skip
        return train_loader, sampler, val_loader
    pin = torch.cuda.is_available()
    device_type = device.type if device is not None else ("cuda" if pin else "cpu")
    workers = resolve_workers(t.workers, len(train_ds), device_type, world)["workers"]
    # A last batch of one or two images makes BatchNorm statistics meaningless: drop it.
    train_loader = make_loader(
        train_ds,
        t.batch_size // world,
        workers=workers,
        sampler=sampler,
        pin_memory=pin,
        drop_last=len(train_ds) > t.batch_size,
    )
    val_loader = make_loader(
        val_ds, (t.eval_batch_size or t.batch_size) // world, workers=workers, pin_memory=pin
    )
    return train_loader, sampler, val_loader
