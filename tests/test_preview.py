"""Contact sheets from a real scanned manifest: layout, the raw tiles are the eval view, the
augmented tiles follow the preset and the seed, bad images become grey tiles, and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.config import AugmentConfig, ScanConfig
from imgclf.data.images import load_image
from imgclf.data.manifest import read_manifest
from imgclf.data.preview import (
    _GAP,
    _HEADER,
    _PAD,
    augmented_batch,
    contact_sheet,
    pick_samples,
    to_pil,
)
from imgclf.data.scan import scan_to
from imgclf.data.transforms import eval_transform
from imgclf.errors import ImgclfError

import factory as fx

CLASSES = ("cat", "dog", "fish")


@pytest.fixture
def manifest(tmp_path):
    data = fx.make_class_folder(tmp_path / "data", classes=CLASSES, per_class=5, size=(48, 40))
    scan_to(data, tmp_path / "m", ScanConfig(workers=1), progress=False)
    return tmp_path / "m"


def tiles(sheet: Image.Image, rows: int, per_class: int, size: int):
    """(raw, augmented) tile arrays per row and column, located from the right edge."""
    a = np.asarray(sheet)
    block = per_class * (size + _PAD)
    right0 = a.shape[1] - block
    left0 = right0 - _GAP - block
    out = []
    for r in range(rows):
        y = _HEADER + r * (size + _PAD)
        out.append(
            [
                (
                    a[y : y + size, left0 + c * (size + _PAD) :][:, :size],
                    a[y : y + size, right0 + c * (size + _PAD) :][:, :size],
                )
                for c in range(per_class)
            ]
        )
    return out


def test_sheet_layout_raw_view_and_augmentation(manifest, tmp_path):
    out = tmp_path / "sheet.png"
    sheet = contact_sheet(manifest, per_class=3, preset="strong", size=32, seed=1, out=out)
    assert (sheet.classes, sheet.per_class, sheet.skipped) == (3, 3, 0)
    im = Image.open(out)
    assert im.format == "PNG" and im.height == _HEADER + 3 * (32 + _PAD) + _PAD
    m = read_manifest(manifest)
    picked = pick_samples(m, 3, seed=1)
    assert list(picked) == list(CLASSES) and all(len(v) == 3 for v in picked.values())
    raw_tf = eval_transform(32, (0.5,) * 3, (0.5,) * 3, "bilinear", crop_pct=1.0)
    grid = tiles(im.convert("RGB"), 3, 3, 32)
    for r, entries in enumerate(picked.values()):
        for c, entry in enumerate(entries):
            expected = np.asarray(to_pil(raw_tf(load_image(m.root / entry.path))))
            raw, aug = grid[r][c]
            assert np.array_equal(raw, expected), (r, c)
            assert np.abs(aug.astype(int) - raw.astype(int)).mean() > 5  # strong changes it
    # Same seed: the same sheet, byte for byte; another seed: other augmentations.
    again = contact_sheet(
        manifest, per_class=3, preset="strong", size=32, seed=1, out=tmp_path / "b.png"
    )
    assert (tmp_path / "b.png").read_bytes() == out.read_bytes() and again.skipped == 0
    contact_sheet(manifest, per_class=3, preset="strong", size=32, seed=2, out=tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() != out.read_bytes()


def test_preset_none_shows_the_raw_view_and_bad_images_are_grey(manifest, tmp_path):
    m = read_manifest(manifest)
    victim = m.root / pick_samples(m, 2, seed=0)["dog"][0].path
    victim.write_bytes(b"not an image any more")
    out = tmp_path / "none.png"
    sheet = contact_sheet(manifest, per_class=2, preset="none", size=24, seed=0, out=out)
    assert sheet.skipped == 1
    grid = tiles(Image.open(out).convert("RGB"), 3, 2, 24)
    for r in range(3):
        for c in range(2):
            raw, aug = grid[r][c]
            assert np.array_equal(raw, aug)
    grey = grid[1][0][0]
    assert (grey == 220).all()
    assert not list(tmp_path.glob(".none.png.*"))  # written atomically, no temporary left


def test_split_filter_and_errors(manifest, tmp_path):
    m = read_manifest(manifest)
    with pytest.raises(ImgclfError, match="no usable images in split 'val'"):
        pick_samples(m, 2, split="val")
    with pytest.raises(ImgclfError, match="unknown augment preset 'wild'"):
        contact_sheet(manifest, preset="wild", out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_augmented_batch_for_tensorboard(manifest):
    batch = augmented_batch(
        read_manifest(manifest), AugmentConfig(preset="light"), 16, (0.5,) * 3, (0.5,) * 3, n=4
    )
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_cli(manifest, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "imgclf", "data", "preview", str(manifest)]
    out = tmp_path / "cli.png"
    res = subprocess.run(
        [*cmd, "--per-class", "2", "--augment", "light", "--size", "40", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "3 classes × 2 samples" in res.stdout
    assert Image.open(out).height == _HEADER + 3 * (40 + _PAD) + _PAD
    bad = subprocess.run([*cmd, "--augment", "wild"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Invalid value for '--augment'" in bad.stderr


def test_a_run_configs_augmentation_and_mixup_are_drawn(manifest, tmp_path):
    """Issue 14: the preview takes the run config's own augmentation (every override, not only
    a preset name) and shows MixUp as training mixes: each tile with the class above it."""
    from typer.testing import CliRunner

    from imgclf.cli import app

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  augment: {preset: none, hflip: 1.0}\n  mixup: 0.4\n")
    out = tmp_path / "mix.png"
    result = CliRunner().invoke(
        app,
        ["data", "preview", str(manifest), "-c", str(cfg), "--per-class", "2", "--size", "24",
         "-o", str(out), "--seed", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 classes × 2 samples (+ MixUp / CutMix)" in result.output
    a = np.asarray(Image.open(out).convert("RGB")).astype(float)
    block = 2 * (24 + _PAD)
    mixed0 = a.shape[1] - block
    aug0, raw0 = mixed0 - _GAP - block, mixed0 - 2 * (_GAP + block)

    def tile(left, r, c):
        y = _HEADER + r * (24 + _PAD)
        return a[y : y + 24, left + c * (24 + _PAD) :][:, :24]

    lambdas = []
    for r in range(3):
        for c in range(2):
            raw, aug = tile(raw0, r, c), tile(aug0, r, c)
            assert np.array_equal(aug, raw[:, ::-1]), (r, c)  # hflip 1.0 from the config
            # the partner: the tile before it in the column-by-column batch (the class above)
            pr, pc = (r - 1, c) if r else (2, c - 1 if c else 1)
            other, mixed = tile(aug0, pr, pc), tile(mixed0, r, c)
            differ = np.abs(aug - other) > 20
            assert differ.sum() > 20, (r, c)  # different classes, different pixels
            lambdas.append(((mixed - other)[differ] / (aug - other)[differ]).mean())
    # One λ for the whole batch (MixUp), strictly between the two images.
    assert min(lambdas) > 0.0 and max(lambdas) < 1.0 and max(lambdas) - min(lambdas) < 0.05

    # Overrides alone work too, and a folder that is not a run is refused by name.
    again = CliRunner().invoke(
        app,
        ["data", "preview", str(manifest), "train.augment.preset=light", "--per-class", "1",
         "--size", "16", "-o", str(tmp_path / "o.png")],
    )  # fmt: skip
    assert again.exit_code == 0 and "MixUp" not in again.output, again.output
    bad = CliRunner().invoke(app, ["data", "preview", str(manifest), "-c", str(tmp_path)])
    assert isinstance(bad.exception, ImgclfError), bad.output  # the CLI's main prints it, exit 2
    assert "without config.yaml" in str(bad.exception)


def test_the_sheet_draws_the_crop_mode_a_run_uses(manifest, tmp_path):
    """A run with data.crop_mode: squash sees each 48×40 image whole; the sheet drawn from its
    config (or with --crop-mode squash) shows that, not the centre square."""
    from typer.testing import CliRunner

    from imgclf.cli import app

    m = read_manifest(manifest)
    picked = pick_samples(m, 2, seed=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  crop_mode: squash\ntrain:\n  augment: {preset: none}\n")
    sheets = {}
    for name, args in (("config", ["-c", str(cfg)]), ("flag", ["--crop-mode", "squash"]),
                       ("center", [])):  # fmt: skip
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(
            app,
            ["data", "preview", str(manifest), *args, "--per-class", "2", "--size", "24",
             "-o", str(out), "--augment", "none"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        sheets[name] = tiles(Image.open(out).convert("RGB"), 3, 2, 24)
    for mode, names in (("squash", ("config", "flag")), ("center", ("center",))):
        tf = eval_transform(24, (0.5,) * 3, (0.5,) * 3, "bilinear", crop_pct=1.0, crop_mode=mode)
        for r, entries in enumerate(picked.values()):
            for c, entry in enumerate(entries):
                expected = np.asarray(to_pil(tf(load_image(m.root / entry.path))))
                for name in names:
                    assert np.array_equal(sheets[name][r][c][0], expected), (name, r, c)
    assert not np.array_equal(sheets["flag"][0][0][0], sheets["center"][0][0][0])
