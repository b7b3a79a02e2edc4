"""Where the cached pixels live is decided once (`place`) and every branch a GPU takes also runs
here on the CPU: the cache on the model's device, in host memory with a transfer, memory-mapped.

The bug this guards against (issue 12): on a GPU, `place` moved the pixels to `cuda:0` while the
loader compared that with `torch.device("cuda")`, took the host branch and called
`pin_memory()` on a CUDA tensor. The placement is now handed over, and both branches check what
they are given; the "meta" device stands in for "not where you think" on a CPU-only machine.
"""

import pytest
import torch

from imgclf.data.batches import build_loaders
from imgclf.data.cached_batches import DEVICE, HOST, CachedBatches, place, same_device
from imgclf.data.prepare import prepare
from imgclf.errors import ImgclfError
from imgclf.models import build_model
from test_train import cfg_for

import factory as fx

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    return root, fx.make_class_folder(root / "d", classes=("a", "b"), per_class=10, size=(40, 30))


def loaders(data, cache: str, where: str):
    tmp, folder = data
    cfg = cfg_for(
        folder,
        tmp,
        f"data.cache={cache}",
        f"data.cache_device={where}",
        f"data.cache_dir={tmp / 'cache'}",
        "train.batch_size=4",
        "train.augment.preset=strong",
    )
    manifest, _ = prepare(cfg.data, progress=False)
    _, pre = build_model(cfg.model, len(manifest.labels), cfg.data.image_size)
    return build_loaders(cfg, manifest, pre, device=CPU, log=lambda *_: None)


def epoch(loader, sampler) -> list[torch.Tensor]:
    sampler.set_epoch(1)
    return [b["x"] for b in loader]


def test_every_placement_runs_on_cpu_and_gives_the_same_batches(data):
    """data.cache_device=device puts the pixels on the model's device (here the CPU) and reads
    each batch with one index_select there; host gathers on the prefetch thread; the memory map
    too. All of them yield exactly the same augmented batches, for training and validation."""
    seen = {}
    for cache, where, expected in [
        ("memory", "device", DEVICE),
        ("memory", "host", HOST),
        ("disk", "device", DEVICE),
        ("disk", "host", HOST),
        ("disk", "auto", HOST),  # auto on a CPU run keeps the pixels where they are
        ("memory", "cuda", DEVICE),  # the old names still work
    ]:
        train, sampler, val = loaders(data, cache, where)
        assert isinstance(train, CachedBatches)
        assert train.placement == val.placement == expected, (cache, where)
        assert not train.pin  # a CPU run never asks for page-locked memory
        seen[cache, where] = epoch(train, sampler) + [b["x"] for b in val]
    reference = seen["memory", "device"]
    assert len(reference) > 2
    for key, batches in seen.items():
        assert len(batches) == len(reference), key
        for a, b in zip(batches, reference, strict=True):
            assert torch.equal(a, b), key


class _Cache:
    """The two attributes CachedBatches reads, around pixels on any device."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.nbytes = images, images.numel()
        self.ok = torch.ones(len(images), dtype=torch.bool)
        self.reasons = [""] * len(images)


def test_host_branch_refuses_pixels_that_are_not_in_host_memory():
    """The crash of issue 12 reproduced on a CPU: pixels off the host ("meta" standing in for a
    GPU) read by the host branch for a CUDA model. It must be a clear internal error, never a
    `pin_memory()` of a device tensor."""
    off_host = _Cache(torch.empty(4, 8, 8, 3, dtype=torch.uint8, device="meta"))
    batches = CachedBatches(off_host, [0, 1, 0, 1], 2, augment=None, device="cuda",
                            placement=HOST)  # fmt: skip
    assert batches.pin  # a CUDA model gets pinned host batches...
    with pytest.raises(ImgclfError, match="read from host memory but its pixels are on meta"):
        batches._gather(torch.tensor([0, 1]))  # ...but only from host pixels


def test_device_branch_refuses_host_pixels_for_another_device():
    """A host tensor where the device copy is expected ("meta" standing in for the GPU)."""
    host = _Cache(torch.zeros(4, 8, 8, 3, dtype=torch.uint8))
    batches = CachedBatches(host, [0, 1, 0, 1], 2, augment=None, device="meta",
                            placement=DEVICE)  # fmt: skip
    with pytest.raises(ImgclfError, match="placed on the model's device"):
        batches._gather(torch.tensor([0, 1]))


def test_place_moves_the_pixels_and_says_where():
    caches = [_Cache(torch.zeros(2, 4, 4, 3, dtype=torch.uint8))]
    assert place(caches, "host", CPU, print) == HOST
    assert place(caches, "auto", CPU, print) == HOST
    assert place(caches, "device", CPU, print) == DEVICE
    assert caches[0].images.device == CPU
    with pytest.raises(ImgclfError, match="auto, host or device"):
        place(caches, "gpu", CPU, print)


def test_device_identity_ignores_a_missing_index():
    """`torch.device("cuda") == torch.device("cuda:0")` is False: the comparison that sent the
    GPU-resident cache down the host path. `same_device` is what the checks use."""
    assert torch.device("cpu") != torch.device("cpu", 0)  # the trap, shown on the CPU
    assert same_device(torch.device("cpu"), torch.device("cpu", 0))
    assert not same_device(torch.device("cpu"), torch.device("meta"))
    if torch.cuda.is_available():
        assert same_device(torch.device("cuda"), torch.device("cuda", torch.cuda.current_device()))
