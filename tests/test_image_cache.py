"""The decode-once image cache (imgclf.data.image_cache): build, reuse, keys, bad images,
parity with the eval transform, disk and memory modes, interrupted and concurrent builders, a
full disk."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.data import image_cache_build
from imgclf.data.image_cache import (
    IMAGES_FILE,
    META_FILE,
    CacheSpec,
    ImageCache,
    cache_key,
    default_cache_root,
    default_memory_budget,
    estimate_bytes,
    stored_size,
)
from imgclf.data.images import load_image
from imgclf.data.transforms import eval_transform
from imgclf.errors import ImgclfError
from imgclf.files import file_sha256

import factory as fx

SIZE = 24  # stored = round(24 / 0.875) = 27


def rel_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(tmp_path / "d", per_class=3, size=(40, 30))


def build(cache: ImageCache, root: Path, paths=None, **kw):
    kw = {"data_version": "v1", "size": SIZE, "interpolation": "bilinear", "workers": 0, **kw}
    return cache.open_or_build(root, paths if paths is not None else rel_paths(root), **kw)


def reference(path: Path, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """eval_transform's pixels (identity normalisation) as uint8 HWC."""
    tf = eval_transform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation, crop_pct)
    image = load_image(path, size_hint=stored_size(size, crop_pct))
    return (tf(image) * 255).round().to(torch.uint8).permute(1, 2, 0)


def test_build_then_reuse_decodes_nothing(data, tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "c")
    first = build(cache, data)
    assert first.build_seconds > 0 and bool(first.ok.all()) and first.reasons == [""] * 9
    assert first.images.shape == (9, 27, 27, 3) and first.images.dtype == torch.uint8
    assert first.nbytes == estimate_bytes(9, 27) == (first.folder / IMAGES_FILE).stat().st_size
    assert first.images.float().std() > 10  # real pixels were written, not the zero fill

    def refuse(*a, **k):
        raise AssertionError("decoded an image although the entry was cached")

    monkeypatch.setattr(image_cache_build, "load_image", refuse)
    for mode in ("disk", "memory", "auto"):
        again = build(cache, data, mode=mode)
        assert again.build_seconds == 0.0 and again.key == first.key
        assert torch.equal(again.images, first.images)
    # The guard above is live: settings that need a new entry do reach the loader.
    with pytest.raises(AssertionError, match="decoded an image"):
        build(cache, data, size=SIZE + 8)


def test_key_changes_with_what_the_pixels_depend_on():
    paths = ["a/1.png", "a/2.png", "b/3.png"]
    spec = CacheSpec(SIZE)
    base = cache_key(paths, "v1", spec)
    assert base == cache_key(list(paths), "v1", CacheSpec(SIZE))  # deterministic
    variants = {
        "size": cache_key(paths, "v1", CacheSpec(SIZE + 1)),
        # The same stored square, a different crop inside it: the square's offset differs.
        "size, same stored": cache_key(paths, "v1", CacheSpec(SIZE + 1, crop_pct=25 / 27)),
        "crop_pct": cache_key(paths, "v1", CacheSpec(SIZE, crop_pct=0.95)),
        "interpolation": cache_key(paths, "v1", CacheSpec(SIZE, interpolation="bilinear")),
        "max_pixels": cache_key(paths, "v1", CacheSpec(SIZE, max_pixels=10_000)),
        "min_side": cache_key(paths, "v1", CacheSpec(SIZE, min_side=16)),
        "size_hint": cache_key(paths, "v1", CacheSpec(SIZE, size_hint=SIZE)),
        "crop_mode": cache_key(paths, "v1", CacheSpec(SIZE, crop_mode="squash")),
        "data version": cache_key(paths, "v2", spec),
        "order": cache_key(paths[::-1], "v1", spec),
        "one path fewer": cache_key(paths[:2], "v1", spec),
        "renamed": cache_key([*paths[:2], "b/4.png"], "v1", spec),
        "newline in a name": cache_key(["a/1.png\na/2.png", "b/3.png"], "v1", spec),
    }
    assert CacheSpec(SIZE + 1, crop_pct=25 / 27).stored == spec.stored
    assert base not in variants.values(), variants
    assert len(set(variants.values())) == len(variants)


def test_key_changes_on_disk(data, tmp_path):
    cache = ImageCache(tmp_path / "c")
    keys = {
        build(cache, data).key,
        build(cache, data, size=SIZE + 4).key,
        build(cache, data, data_version="v2").key,
        build(cache, data, paths=rel_paths(data)[:5]).key,
    }
    assert len(keys) == 4
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(keys)


def test_bad_images_are_recorded_and_the_rest_cached(data, tmp_path):
    fx.write_truncated_jpeg(data / "cat" / "trunc.jpg")
    fx.write_text_as_jpg(data / "dog" / "html.jpg")
    fx.write_tiny_png(data / "fish" / "tiny.png", size=(4, 4))
    paths = rel_paths(data)
    got = build(ImageCache(tmp_path / "c"), data, paths=paths, workers=2, progress=True)
    bad = {p: r for p, r, ok in zip(paths, got.reasons, got.ok.tolist(), strict=True) if not ok}
    assert set(bad) == {"cat/trunc.jpg", "dog/html.jpg", "fish/tiny.png"}
    assert bad["cat/trunc.jpg"].startswith("truncated or corrupt")
    assert bad["dog/html.jpg"].startswith("not an image")
    assert bad["fish/tiny.png"].startswith("too small")
    for i, p in enumerate(paths):
        if p in bad:
            assert not got.images[i].any()
        else:
            assert torch.equal(got.eval_crop()[i], reference(data / p, SIZE, 0.875, "bilinear"))
    meta = json.loads((got.folder / META_FILE).read_text())
    assert meta["ok"] == got.ok.tolist() and meta["reasons"] == got.reasons
    assert meta["sha256"][IMAGES_FILE] == file_sha256(got.folder / IMAGES_FILE)
    assert (meta["n"], meta["stored"], meta["size"], meta["interpolation"]) == (
        len(paths),
        27,
        SIZE,
        "bilinear",
    )


# (file writer, its size w×h, crop size, crop_pct, interpolation). The first two make the naive
# "centre the square, then centre the crop" off by one pixel (torchvision rounds half to even);
# the large JPEG takes the reduced-size decode; the mid one would take it (and then be upscaled)
# with size_hint=size instead of stored.
PARITY = [
    ("wide.jpg", fx.write_jpeg, (84, 74), 32, 0.875, "bilinear"),
    ("tall.png", fx.write_png, (74, 84), 32, 0.875, "bicubic"),
    ("odd.png", fx.write_png, (101, 57), 20, 0.9, "nearest"),
    ("big.jpg", fx.write_jpeg, (400, 300), 32, 0.875, "bilinear"),
    ("mid.jpg", fx.write_jpeg, (90, 70), 32, 0.875, "bilinear"),
    ("square.png", fx.write_png, (50, 50), 32, 1.0, "bilinear"),
]


@pytest.mark.parametrize(("name", "writer", "wh", "size", "crop_pct", "interp"), PARITY)
def test_eval_crop_equals_eval_transform(tmp_path, name, writer, wh, size, crop_pct, interp):
    path = writer(tmp_path / "d" / "c" / name, size=wh, seed=3)
    got = build(
        ImageCache(tmp_path / "c"),
        tmp_path / "d",
        paths=[f"c/{name}"],
        size=size,
        crop_pct=crop_pct,
        interpolation=interp,
    )
    assert got.stored == stored_size(size, crop_pct) and bool(got.ok.all())
    crop = got.eval_crop()[0]
    assert torch.equal(crop, reference(path, size, crop_pct, interp))
    # The same after ImageNet normalisation, as training will see it.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = eval_transform(size, mean, std, interp, crop_pct)(
        load_image(path, size_hint=got.stored)
    )
    mine = (crop.permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std
    )[:, None, None]
    torch.testing.assert_close(mine, expected, atol=1e-6, rtol=0)


def test_exif_rotated_image_is_cached_upright(tmp_path):
    path = fx.write_exif_rotated_jpeg(tmp_path / "d" / "c" / "r.jpg", orientation=6, size=(64, 32))
    got = build(ImageCache(tmp_path / "c"), tmp_path / "d", paths=["c/r.jpg"])
    assert torch.equal(got.eval_crop()[0], reference(path, SIZE, 0.875, "bilinear"))


def _mapping_of(address: int) -> str | None:
    """The file a virtual address is mapped from ('' for anonymous memory), per /proc."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else ""
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_disk_mode_is_a_memmap_and_memory_mode_a_ram_copy(data, tmp_path):
    cache = ImageCache(tmp_path / "c")
    disk = build(cache, data, mode="disk")
    memory = build(cache, data, mode="memory")
    assert disk.mode == "disk" and memory.mode == "memory"
    assert torch.equal(disk.images, memory.images) and torch.equal(disk.ok, memory.ok)
    file = str(disk.folder / IMAGES_FILE)
    assert isinstance(disk.array, np.memmap) and disk.images.data_ptr() == disk.array.ctypes.data
    assert _mapping_of(disk.images.data_ptr()) == file
    assert not isinstance(memory.array, np.memmap)
    assert _mapping_of(memory.images.data_ptr()) != file
    assert memory.images.is_pinned() == torch.cuda.is_available()
    # "auto" picks by the budget.
    assert build(cache, data, mode="auto", memory_budget_bytes=disk.nbytes).mode == "memory"
    assert build(cache, data, mode="auto", memory_budget_bytes=disk.nbytes - 1).mode == "disk"
    # Writing into the disk-mode tensor never changes the cached file (copy-on-write).
    before = file_sha256(file)
    disk.images[0].fill_(7)
    disk.array.flush()
    assert file_sha256(file) == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_half_written_entries_are_ignored_and_rebuilt(data, tmp_path):
    cache = ImageCache(tmp_path / "c")
    good = build(cache, data)
    expected = good.images.clone()
    shutil.rmtree(good.folder)
    # A killed builder's temporary folder, and an entry folder without its meta.json.
    dead = cache.root / f".{good.key}.deadbeef"
    dead.mkdir()
    (dead / IMAGES_FILE).write_bytes(b"\x01" * 100)
    (dead / ".owner").write_text(f"{os.uname().nodename}\n{_dead_pid()}\n")
    alive = cache.root / f".{good.key}.stillbsy"
    alive.mkdir()
    (alive / ".owner").write_text(f"{os.uname().nodename}\n{os.getpid()}\n")
    good.folder.mkdir()
    (good.folder / IMAGES_FILE).write_bytes(b"\x02" * good.nbytes)
    assert cache.read_meta(good.key) is None

    again = build(cache, data)
    assert again.build_seconds > 0 and torch.equal(again.images, expected)
    assert not dead.exists() and alive.is_dir()  # a live builder's folder is left alone
    left = sorted(p.name for p in cache.root.iterdir())
    assert left == sorted([good.key, alive.name])
    # An entry whose file size disagrees with meta.json is not trusted either.
    with open(again.folder / IMAGES_FILE, "ab") as f:
        f.write(b"\0")
    assert cache.read_meta(good.key) is None
    assert build(cache, data).build_seconds > 0


def _child_build(cache_root: str, data_root: str, barrier, out: str) -> None:
    """Build the same entry as a sibling process; both publish only after both have built."""
    original = ImageCache._publish

    def publish_together(self, tmp, key):
        barrier.wait(timeout=120)
        original(self, tmp, key)

    ImageCache._publish = publish_together
    got = build(ImageCache(Path(cache_root)), Path(data_root))
    result = {
        "key": got.key,
        "built": got.build_seconds > 0,
        "sha256": file_sha256(got.folder / IMAGES_FILE),
        "pixels": int(got.images.long().sum()),
    }
    Path(out).write_text(json.dumps(result))


def test_two_processes_building_the_same_entry(data, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [
        ctx.Process(target=_child_build, args=(str(tmp_path / "c"), str(data), barrier, str(out)))
        for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["built"] and b["built"]  # both decoded: one lost the rename and used the winner's
    assert a == b
    cache = ImageCache(tmp_path / "c")
    meta = cache.read_meta(a["key"])
    assert meta is not None and meta["sha256"][IMAGES_FILE] == a["sha256"]
    assert [p.name for p in cache.root.iterdir()] == [a["key"]]  # the loser cleaned up
    assert torch.equal(build(cache, data).images, build(ImageCache(tmp_path / "x"), data).images)


def test_full_disk_is_a_clear_error(data, tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "c")

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(ImgclfError) as e:
        build(cache, data)
    for part in (str(cache.root), "data.cache=none", "IMGCLF_CACHE", "no space left"):
        assert part in str(e.value)
    assert list(cache.root.iterdir()) == []  # nothing half-written left behind


def test_too_little_free_space_fails_before_decoding(data, tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)._replace(free=estimate_bytes(9, 27) - 1)
    monkeypatch.setattr(image_cache_build.shutil, "disk_usage", lambda p: free)
    monkeypatch.setattr(image_cache_build, "load_image", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImgclfError, match=r"data\.cache=none"):
        build(ImageCache(tmp_path / "c"), data)


def test_sizes_defaults_and_settings(tmp_path):
    assert stored_size(224, 0.875) == 256 and stored_size(32, 1.0) == 32
    assert estimate_bytes(1000, 256) == 1000 * 256 * 256 * 3
    assert default_cache_root() == tmp_path / "cache" / "images"  # $IMGCLF_CACHE (conftest)
    assert ImageCache().root == default_cache_root()
    assert 0 < default_memory_budget() <= 16 * 2**30
    with pytest.raises(ImgclfError, match="bilinear, bicubic, nearest"):
        CacheSpec(SIZE, interpolation="lanczos")
    with pytest.raises(ImgclfError, match="crop_pct"):
        CacheSpec(SIZE, crop_pct=1.5)
    with pytest.raises(ImgclfError, match="auto"):
        ImageCache(tmp_path / "c").open_or_build(tmp_path, [], data_version="v", size=8, mode="x")


def test_empty_list_gives_an_empty_entry(tmp_path):
    got = build(ImageCache(tmp_path / "c"), tmp_path, paths=[], mode="disk")
    assert got.images.shape == (0, 27, 27, 3) and got.ok.shape == (0,)
