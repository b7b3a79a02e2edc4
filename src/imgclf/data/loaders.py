"""Datasets, samplers and DataLoaders over a manifest.

Reproducibility comes from the sampler, not from worker start-up: the sampler yields
(index, sample_seed) pairs, and each image is augmented under its own seed (`seeded_cpu_rng`).
So the augmentation of image i in epoch e is the same whatever the worker count, and a run
resumed mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from imgclf.data.images import ImageLoadError, load_image
from imgclf.data.manifest import Entry, LabelMap


@dataclass(frozen=True)
class BadSample:
    """An image that failed to load mid-run (deleted, changed, unreadable): skipped and counted."""

    index: int
    reason: str


class ManifestDataset(Dataset):
    """Images of one split through the one image loader; items are (tensor, target, index)."""

    def __init__(
        self,
        root: Path,
        entries: Sequence[Entry],
        labels: LabelMap,
        transform: Callable,
        *,
        size_hint: int | None = None,
        max_pixels: int = 89_478_485,
        min_side: int = 1,
    ) -> None:
        self.paths = [str(Path(root) / e.path) for e in entries]
        self.rel_paths = [e.path for e in entries]
        self.targets = [labels.index(e.label) for e in entries]
        self.transform = transform
        self.load_kw = {"size_hint": size_hint, "max_pixels": max_pixels, "min_side": min_side}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            image = load_image(self.paths[index], **self.load_kw)
        except ImageLoadError as e:
            return BadSample(index, str(e))
        if seed is None:
            return self.transform(image), self.targets[index], index
        with seeded_cpu_rng(seed):
            return self.transform(image), self.targets[index], index


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the CPU transforms under `seed`, leaving the global CPU generator as it was.

    The transforms draw only from torch's default CPU generator, so that is all this seeds:
    `torch.manual_seed` also seeds every CUDA device, and before CUDA is initialised it queues
    that call with a formatted stack trace each time (~0.5 ms per image), and `fork_rng` copies
    device states too. Saving and restoring the one state keeps the main process's draws
    (dropout, MixUp) unaffected with workers=0; the values drawn are those of
    `torch.manual_seed(seed)`.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class EpochSampler(Sampler):
    """A seeded permutation (or class-balanced draw) per epoch, resumable at any position.

    Under several processes (`shard`) each global batch of the epoch's order is split between
    the ranks by stride, so the ranks together see exactly the batches one process would, and
    only whole global batches are used (every rank takes the same number of steps).
    """

    def __init__(self, n: int, seed: int, weights: Sequence[float] | None = None) -> None:
        self.n, self.seed = n, seed
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch, self.start = 0, 0
        self.rank, self.world, self.global_batch = 0, 1, 1

    def shard(self, rank: int, world: int, global_batch: int) -> None:
        self.rank, self.world, self.global_batch = rank, world, global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: position in the global order (batches done × global batch)."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            idx = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return torch.stack([idx, seeds], 1)

    def _mine(self) -> torch.Tensor:
        rest = self.order()[self.start :]
        if self.world == 1:
            return rest
        whole = len(rest) // self.global_batch * self.global_batch
        return rest[:whole][self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from (tuple(pair) for pair in self._mine().tolist())

    def __len__(self) -> int:
        rest = self.n - self.start
        if self.world == 1:
            return rest
        return rest // self.global_batch * self.global_batch // self.world


AUTO_WORKERS_MIN_IMAGES = 512  # below this, starting workers costs more than they save
AUTO_WORKERS_MAX = 16


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask or cgroup share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(
    setting: int | str, images: int, device_type: str, processes: int = 1
) -> dict[str, int | str]:
    """`train.workers` as a number, with what it was derived from (saved in environment.json).

    auto: the cores this process may use, shared between the training processes on this machine
    (torchrun's LOCAL_WORLD_SIZE); on a GPU all of them but one (the main process feeds the
    GPU), at most 16; on a CPU half of them, at most 4 (the model's own threads need the rest);
    0 below 512 training images, where starting the workers costs more than they save.
    """
    cores = usable_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes) or 1)
    share = max(1, cores // max(local, 1))
    if setting != "auto":
        workers = int(setting)
    elif images < AUTO_WORKERS_MIN_IMAGES:
        workers = 0
    elif device_type == "cuda":
        workers = min(AUTO_WORKERS_MAX, max(1, share - 1))
    else:
        workers = min(4, max(1, share // 2))
    return {"setting": setting, "workers": workers, "cores": cores, "processes_here": local}


def balanced_weights(targets: Sequence[int], num_classes: int) -> list[float]:
    """Per-sample weights 1 / class count: every class equally likely per draw."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes).double()
    per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return per_class[torch.as_tensor(targets)].tolist()


def collate(batch: list) -> dict:
    """Stack the good samples; report the bad ones instead of crashing (docs/RELIABILITY.md F10)."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b for b in batch if isinstance(b, BadSample)]
    if not good:
        return {"x": None, "y": None, "index": None, "bad": bad}
    xs, ys, idx = zip(*good, strict=True)
    # default_collate stacks straight into shared memory inside a worker process; a plain
    # torch.stack would be copied there once more on its way to the main process.
    x = default_collate(list(xs))
    return {"x": x, "y": torch.tensor(ys), "index": torch.tensor(idx), "bad": bad}


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    workers: int = 0,
    sampler: EpochSampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """Training loaders get an EpochSampler (and drop a ragged last batch); evaluation loaders
    keep manifest order and every image."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        # Workers stay up between epochs (start-up is paid once; the sampler, which decides
        # every epoch's order, lives in this process anyway).
        persistent_workers=bool(workers),
        # Its own generator: creating an epoch's iterator must not draw from the global RNG,
        # or a run resumed mid-epoch would see different dropout / mixup draws.
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if workers else None,
    )


class PathsDataset(Dataset):
    """Unlabelled files for prediction; items are (tensor, -1, index) or a BadSample."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable,
        *,
        size_hint: int | None = None,
        max_pixels: int = 89_478_485,
        min_side: int = 1,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.load_kw = {"size_hint": size_hint, "max_pixels": max_pixels, "min_side": min_side}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index], **self.load_kw)
        except ImageLoadError as e:
            return BadSample(index, str(e))
        return self.transform(image), -1, index
