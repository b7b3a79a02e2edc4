"""Batches from the decode-once image cache, augmented as whole batches on the device.

With `data.cache` on, this replaces the DataLoader: for each batch of (index, seed) pairs from
the same `EpochSampler`, the uint8 squares are gathered from the cache (on the GPU when they
live there; otherwise from RAM or the memory map into pinned memory, one batch ahead on a
background thread), moved to the device in one copy, and augmented there by `BatchAugment`
(`data/batch_aug.py`) under each sample's own seed. It yields the DataLoader's batch dicts
(x, y, index, bad), so the training loop and the evaluation pass do not change, and a run
resumed mid-epoch still sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from imgclf.data.loaders import BadSample


class CachedBatches:
    """An iterable of batches over one cached split (training when `sampler` is given)."""

    def __init__(
        self,
        cache,  # data.cache.CachedImages
        targets: Sequence[int],
        batch_size: int,
        augment,  # data.batch_aug.BatchAugment
        device: torch.device,
        *,
        sampler=None,
        drop_last: bool = False,
        channels_last: bool = False,
        dataset: Any = None,
    ) -> None:
        self.cache, self.augment, self.device = cache, augment, torch.device(device)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.channels_last = channels_last
        self.dataset = dataset  # the ManifestDataset: its targets and paths, for callers
        self.ok = cache.ok.bool().cpu()
        self.on_device = cache.images.device == self.device

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _pairs(self) -> torch.Tensor:
        if self.sampler is None:  # evaluation: manifest order, no randomness
            n = len(self.targets)
            return torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
        pairs = list(self.sampler)
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)

    def _chunks(self) -> Iterator[torch.Tensor]:
        pairs = self._pairs()
        for _ in range(len(self)):
            chunk, pairs = pairs[: self.batch_size], pairs[self.batch_size :]
            yield chunk

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] of `index`, on the host (pinned for a GPU) or on the device."""
        if self.on_device:
            return self.cache.images.index_select(0, index.to(self.device))
        pixels = self.cache.images[index]  # a copy out of RAM or the memory map
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def _batch(self, chunk: torch.Tensor, pixels: torch.Tensor | None) -> dict:
        index, seeds = chunk[:, 0], chunk[:, 1]
        good = self.ok[index]
        bad = [BadSample(int(i), self.cache.reasons[int(i)]) for i in index[~good]]
        if pixels is None:
            return {"x": None, "y": None, "index": None, "bad": bad}
        index, seeds = index[good], seeds[good]
        images = pixels.to(self.device, non_blocking=True)
        train = self.sampler is not None
        x = self.augment.train(images, seeds) if train else self.augment.eval(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"x": x, "y": self.targets[index], "index": index, "bad": bad}

    def _host_pixels(self, chunk: torch.Tensor) -> torch.Tensor | None:
        index = chunk[:, 0][self.ok[chunk[:, 0]]]
        return self._gather(index) if len(index) else None

    def __iter__(self) -> Iterator[dict]:
        chunks = list(self._chunks())
        if self.on_device or self.device.type != "cuda":
            for chunk in chunks:
                yield self._batch(chunk, self._host_pixels(chunk))
            return
        # A GPU fed from host memory: gather the next batch while this one trains.
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._host_pixels, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                pixels = ahead.result()
                if i + 1 < len(chunks):
                    ahead = pool.submit(self._host_pixels, chunks[i + 1])
                yield self._batch(chunk, pixels)


def open_caches(cfg, manifest, datasets, pre, *, log, progress: bool) -> list:
    """The decode-once cache entry of each dataset (built on first use, reused after)."""
    from imgclf.data.cache import ImageCache

    cache = ImageCache(cfg.data.cache_dir)
    budget = int(cfg.data.cache_memory_gb * 2**30) if cfg.data.cache_memory_gb else None
    return [
        cache.open_or_build(
            manifest.root,
            ds.rel_paths,
            data_version=manifest.data_hash(),
            size=pre.input_size,
            crop_pct=pre.crop_pct,
            interpolation=pre.interpolation,
            max_pixels=cfg.data.scan.max_pixels,
            min_side=cfg.data.scan.min_side,
            # The loaders' and the Predictor's reduced-size JPEG decode: the same pixels.
            size_hint=pre.input_size,
            mode=cfg.data.cache,
            memory_budget_bytes=budget,
            workers=cfg.data.scan.workers or None,  # the scan's decode processes (0: per core)
            progress=progress,
            log=log,
        )
        for ds in datasets
    ]


def place(caches: list, where: str, device: torch.device, log) -> None:
    """Move the cached pixels onto the GPU when asked, or when `auto` and they fit a quarter of
    its free memory (one gather per batch on the device, no host copy at all)."""
    if device.type != "cuda" or where == "cpu":
        return
    total = sum(c.nbytes for c in caches)
    if where == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if total > free // 4:
            log(f"image cache: {total / 2**30:.1f} GiB stays in host memory (GPU has "
                f"{free / 2**30:.1f} GiB free)")  # fmt: skip
            return
    for c in caches:
        c.images = c.images.to(device)
