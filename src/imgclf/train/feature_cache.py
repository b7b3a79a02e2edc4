"""Frozen-backbone feature cache: pooled embeddings computed once, heads trained on them.

A stage whose backbone is frozen (`trainable: head`) re-runs the same backbone on the same
images every epoch; with `train.features: cache` the pooled features are computed once per
(backbone weights, preprocessing, pooling, data version, split, augmentation view) and kept as
memory-mapped .npy files under a content-hashed key, shared by every run and sweep trial that
asks for the same thing. K augmented views per training image (`train.feature_views`) keep
augmentation in head training: epoch e trains on view e mod K. Each entry's `meta.json` records
the sha256 of its .npy files (`sha256`: {file: hex}) so `imgclf doctor` can verify it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from imgclf.data.loaders import ManifestDataset, make_loader
from imgclf.files import file_sha256
from imgclf.runs.checkpoint import digest

FEATURE_FORMAT = 1


class _ViewSampler(Sampler):
    """Manifest order, each image with the seed of its view: a view is reproducible."""

    def __init__(self, n: int, seed: int, view: int) -> None:
        self.n, self.seed, self.view = n, seed, view

    def __iter__(self):
        for i in range(self.n):
            yield i, ((self.seed * 1_000_003 + self.view) * 10_000_019 + i) % 2**62

    def __len__(self) -> int:
        return self.n


@dataclass
class FeatureSet:
    """Features, targets and a load mask: numpy (memory-mapped) in the cache, tensors in use."""

    x: Any  # (N, D) float32
    y: Any  # (N,) int64
    ok: Any  # (N,) bool: False where the image failed to load


class FeatureCache:
    """Content-addressed folders of features; each written atomically (temp dir + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> FeatureSet | None:
        folder = self.root / key
        if not (folder / "meta.json").is_file():
            return None
        return FeatureSet(*(np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("x", "y", "ok")))

    def put(self, key: str, fs: FeatureSet, meta: dict) -> FeatureSet:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            for name in ("x", "y", "ok"):
                np.save(tmp / f"{name}.npy", getattr(fs, name))
            files = {f"{n}.npy": file_sha256(tmp / f"{n}.npy") for n in ("x", "y", "ok")}
            (tmp / "meta.json").write_text(json.dumps({**meta, "sha256": files}, indent=2))
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another process cached the same key first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cached = self.get(key)
        assert cached is not None
        return cached


@torch.inference_mode()
def extract(
    model: nn.Module,
    dataset: ManifestDataset,
    sampler: Sampler | None,
    device,
    batch_size: int,
    channels_last: bool = False,
) -> FeatureSet:
    """Pooled backbone features for every item of `dataset` in order (zeros where unreadable)."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    x = np.zeros((n, model.head.pooled_dim), np.float32)
    ok = np.zeros(n, bool)
    for batch in make_loader(dataset, batch_size, sampler=sampler):
        if batch["x"] is None:
            continue
        imgs = batch["x"].to(device)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        pooled = model.head.pool(model.forward_features(imgs)).float().cpu().numpy()
        idx = batch["index"].numpy()
        x[idx], ok[idx] = pooled, True
    model.train(was_training)
    return FeatureSet(x, np.asarray(dataset.targets, np.int64), ok)


def feature_key(model: nn.Module, dataset: ManifestDataset, parts: dict) -> str:
    """Hash of what the features depend on: backbone weights, pooling, preprocessing, images."""
    h = hashlib.sha256()
    h.update(digest(model.backbone.state_dict()).encode())
    h.update(
        json.dumps(
            {"format": FEATURE_FORMAT, "pool": model.head.pool_kind, **parts},
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update("\n".join(dataset.rel_paths).encode())
    return h.hexdigest()[:24]


class StageFeatures:
    """The cached features one head-only stage trains and validates on."""

    def __init__(self, cache: FeatureCache, views: int, seed: int, describe: dict) -> None:
        self.cache, self.views, self.seed, self.describe = cache, views, seed, describe
        self.train_views: list[FeatureSet] = []
        self.val: FeatureSet | None = None

    def prepare(
        self,
        model: nn.Module,
        train_ds: ManifestDataset,
        val_ds: ManifestDataset,
        device,
        batch_size: int,
        channels_last: bool,
        log=print,
    ) -> None:
        """Load or compute every view; idempotent."""
        if self.val is not None:
            return
        for view in range(self.views):
            key = feature_key(
                model,
                train_ds,
                {**self.describe, "split": "train", "view": view, "seed": self.seed},
            )
            self.train_views.append(
                self._get(
                    key,
                    model,
                    train_ds,
                    _ViewSampler(len(train_ds), self.seed, view),
                    device,
                    batch_size,
                    channels_last,
                    log,
                )
            )
        key = feature_key(model, val_ds, {**self.describe, "split": "val", "view": "eval"})
        self.val = self._get(key, model, val_ds, None, device, batch_size, channels_last, log)

    def _get(self, key, model, ds, sampler, device, batch_size, channels_last, log) -> FeatureSet:
        """From the cache (or computed into it), as in-memory tensors for head training."""
        found = self.cache.get(key)
        if found is None:
            log(f"caching backbone features for {len(ds)} images ({key})")
            fs = extract(model, ds, sampler, device, batch_size, channels_last)
            found = self.cache.put(key, fs, {"images": len(ds), **self.describe})
        return FeatureSet(*(torch.from_numpy(np.array(a)) for a in (found.x, found.y, found.ok)))

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(batches(torch.arange(len(self.train_views[0].ok)), batch_size))


def train_head_epoch(
    head: nn.Module,
    fs: FeatureSet,
    loss_fn: nn.Module,
    optimizer,
    schedule,
    *,
    batch_size: int,
    order: torch.Tensor,
    device,
    grad_clip: float | None = None,
) -> dict:
    """One epoch of head training on cached features: the same optimizer and schedule.

    `order` is the image loader's sample order for this epoch (its EpochSampler), and a ragged
    last batch is dropped as the loader drops it: the same batches, features instead of images.
    """
    x_all, y_all = fs.x, fs.y
    loss_sum, correct, seen = torch.zeros(()), torch.zeros(()), 0
    head.train()
    for idx in batches(order, batch_size):
        idx = idx[fs.ok[idx]]  # images that failed to load are skipped, as in the loader
        if not len(idx):
            continue
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        logits = head.classify(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
        optimizer.step()
        schedule.step_batch()
        loss_sum += loss.detach().cpu() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum().cpu()
        seen += len(idx)
    n = max(seen, 1)
    return {"train_loss": loss_sum.item() / n, "train_accuracy": correct.item() / n, "seen": seen}


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of `order`, the ragged last one dropped when there is more than one."""
    n = len(order)
    full = n // batch_size if n > batch_size else 1
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


@torch.inference_mode()
def head_probs(head: nn.Module, fs: FeatureSet, device, batch_size: int = 1024) -> torch.Tensor:
    head.eval()
    x = fs.x[fs.ok]
    out = [
        torch.softmax(head.classify(x[i : i + batch_size].to(device)).float(), 1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def labels_of(fs: FeatureSet) -> torch.Tensor:
    return fs.y[fs.ok]


def default_cache_root() -> Path:
    from imgclf.data.example import cache_dir

    return cache_dir() / "features"
