"""Batches from the decode-once image cache, augmented as whole batches on the device.

With `data.cache` on, this replaces the DataLoader: for each batch of (index, seed) pairs from
the same `EpochSampler`, the uint8 squares are gathered from the cache and augmented on the
model's device by `BatchAugment` (`data/batch_aug.py`) under each sample's own seed.

Where the pixels are read from is decided once, by `place`, and handed to `CachedBatches` as its
`placement` — never inferred again from tensor devices (comparing `torch.device("cuda")` with a
tensor's `cuda:0` is False, which once sent GPU-resident pixels down the host path and crashed
in `pin_memory`):

- DEVICE: the pixels were moved onto the model's device (on a CPU run that is host memory);
  each batch is one `index_select` there, no copy through the host.
- HOST: the pixels stay in RAM or the memory map; each batch is gathered (into pinned memory
  when the model is on a GPU) one batch ahead on a background thread, then copied over.

Both branches run on a CPU in the tests (`data.cache_device=device` / `host`). Batches are the
DataLoader's batch dicts (x, y, index, bad), so the training loop and the evaluation pass do not
change, and a run resumed mid-epoch still sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from imgclf.data.loaders import BadSample
from imgclf.errors import ImgclfError

HOST, DEVICE = "host", "device"
# The names `data.cache_device` accepted before `host` / `device` existed.
_ALIASES = {"cpu": HOST, "cuda": DEVICE}


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
        placement: str = HOST,
        sampler=None,
        drop_last: bool = False,
        channels_last: bool = False,
        dataset: Any = None,
        pin: bool | None = None,
    ) -> None:
        if placement not in (HOST, DEVICE):
            raise ValueError(f"placement must be {HOST!r} or {DEVICE!r}, not {placement!r}")
        self.cache, self.augment, self.device = cache, augment, torch.device(device)
        self.placement = placement
        # Page-locked host batches make the copy to a GPU asynchronous; None: only for CUDA.
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.channels_last = channels_last
        self.dataset = dataset  # the ManifestDataset: its targets and paths, for callers
        self.ok = cache.ok.bool().cpu()

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
        """uint8 [B, S, S, 3] of `index`: on the model's device (DEVICE) or on the host, pinned
        for a GPU (HOST)."""
        images = self.cache.images
        if self.placement == DEVICE:
            if not same_device(images.device, self.device):
                raise ImgclfError(
                    f"internal error: the image cache was placed on the model's device "
                    f"({self.device}) but its pixels are on {images.device}"
                )
            return images.index_select(0, index.to(images.device))
        if images.device.type != "cpu":
            raise ImgclfError(
                f"internal error: the image cache is read from host memory but its pixels are "
                f"on {images.device}; place() decides where they live"
            )
        # One copy out of RAM or the memory map, straight into (pinned) batch memory.
        out = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=self.pin)
        return torch.index_select(images, 0, index, out=out)

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
        if self.placement == DEVICE:
            for chunk in chunks:
                yield self._batch(chunk, self._host_pixels(chunk))
            return
        # Fed from host memory: gather the next batch (a memcpy that releases the GIL) while
        # this one trains.
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._host_pixels, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                pixels = ahead.result()
                if i + 1 < len(chunks):
                    ahead = pool.submit(self._host_pixels, chunks[i + 1])
                yield self._batch(chunk, pixels)


def open_caches(cfg, manifest, datasets, pre, *, log, progress: bool) -> list:
    """The decode-once cache entry of each dataset (built on first use, reused after)."""
    from imgclf.data.image_cache import ImageCache

    cache = ImageCache(cfg.data.cache_dir)
    budget = int(cfg.data.cache_memory_gb * 2**30) if cfg.data.cache_memory_gb else None
    return [
        cache.open_or_build(
            manifest.root,
            ds.rel_paths,
            data_version=manifest.data_hash(),
            size=pre,  # input size, crop_pct and interpolation
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


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are one device when 0 is the current one (torch.device's == says no)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (
            current if b.index is None else b.index
        )
    return a.index == b.index or a.type == "cpu"


def place(caches: list, where: str, device: torch.device, log) -> str:
    """Decide where the cached pixels are read from, move them there, and return HOST or DEVICE.

    `where` is `data.cache_device`: `device` (the model's device, whatever it is), `host`, or
    `auto`: the GPU when they fit a quarter of its free memory (one gather per batch on the
    device, no host copy at all), else the host; on a CPU run `auto` keeps them where they are
    (host memory or the memory map), which is the HOST branch.
    """
    where = _ALIASES.get(where, where)
    if where not in ("auto", HOST, DEVICE):
        raise ImgclfError(f"data.cache_device must be auto, host or device, not {where!r}")
    if where == HOST or (where == "auto" and device.type != "cuda"):
        return HOST
    total = sum(c.nbytes for c in caches)
    if where == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if total > free // 4:
            log(f"image cache: {total / 2**30:.1f} GiB stays in host memory (GPU has "
                f"{free / 2**30:.1f} GiB free)")  # fmt: skip
            return HOST
    for c in caches:
        c.images = c.images.to(device)
    return DEVICE
