"""Datasets and samplers: reproducible per-sample augmentation, resumable order, bad images."""

import os

import torch
from torchvision.transforms import v2

from imgclf.data.loaders import (
    BadSample,
    EpochSampler,
    ManifestDataset,
    balanced_weights,
    make_loader,
)
from imgclf.data.manifest import Entry, LabelMap

import factory as fx

TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def noisy(img):
    """A transform whose output depends on the global torch RNG (like any augmentation)."""
    x = TO_TENSOR(img)
    return x + torch.rand(1)


def dataset(tmp_path, n_per_class=6, transform=noisy):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=n_per_class)
    entries = [
        Entry(path=str(p.relative_to(root)), label=p.parent.name)
        for p in sorted(root.rglob("*.png"))
    ]
    return ManifestDataset(root, entries, LabelMap(("a", "b")), transform), root


def epoch_batches(ds, workers, epoch=0, start=0, seed=0):
    sampler = EpochSampler(len(ds), seed)
    sampler.set_epoch(epoch, start=start)
    return [b for b in make_loader(ds, 4, workers=workers, sampler=sampler)]


def test_same_seed_same_batches_whatever_the_worker_count(tmp_path):
    ds, _ = dataset(tmp_path)
    serial = epoch_batches(ds, workers=0)
    parallel = epoch_batches(ds, workers=2)
    assert len(serial) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["x"], b["x"])
    other_epoch = epoch_batches(ds, workers=0, epoch=1)
    assert not torch.equal(serial[0]["index"], other_epoch[0]["index"])


def test_resuming_mid_epoch_sees_the_remaining_batches(tmp_path):
    ds, _ = dataset(tmp_path)
    full = epoch_batches(ds, workers=0, epoch=3)
    rest = epoch_batches(ds, workers=0, epoch=3, start=4)
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])


def test_loading_does_not_touch_the_global_rng(tmp_path):
    ds, _ = dataset(tmp_path)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    epoch_batches(ds, workers=0)
    assert torch.equal(before, torch.get_rng_state())


def test_an_image_that_turns_bad_mid_run_is_skipped(tmp_path):
    ds, _ = dataset(tmp_path)
    victim = ds.paths[2]
    os.remove(victim)
    fx.write_truncated_jpeg(ds.paths[5])
    assert isinstance(ds[2], BadSample) and "unreadable" in ds[2].reason
    assert "truncated or corrupt" in ds[5].reason
    batches = epoch_batches(ds, workers=2)
    bad = {b.index for batch in batches for b in batch["bad"]}
    good = sum(len(batch["index"]) for batch in batches if batch["index"] is not None)
    assert bad == {2, 5} and good == len(ds) - 2


def test_balanced_sampler_draws_classes_evenly():
    targets = [0] * 90 + [1] * 10
    sampler = EpochSampler(100, seed=0, weights=balanced_weights(targets, 2))
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [targets[i] for i, _ in sampler]
    share = sum(drawn) / len(drawn)
    assert 0.45 < share < 0.55, share
    assert balanced_weights([0, 0, 2], 3) == [0.5, 0.5, 1.0]
