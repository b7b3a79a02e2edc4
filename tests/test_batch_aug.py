"""Batch augmentation: its random draws against torchvision's own samplers, its geometry against
torchvision's step-by-step transforms, exact equality with the CPU eval transform, per-seed
reproducibility whatever the batch, and the comparison contact sheet."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from imgclf.config import AugmentConfig
from imgclf.data.batch_aug import BatchAugment, compare_sheet, contact_sheet, eval_square
from imgclf.data.preview import to_pil
from imgclf.data.transforms import eval_transform, resolve_augment
from imgclf.errors import ImgclfError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLACK = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)
WHITE = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)
N = 4000  # draws per distribution check
SEEDS = torch.arange(N) * 7919 + 13
QUANTILES = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
# Two independent samples of 4,000: the standard error of a difference of means of the area
# fraction (sd ≈ 0.2) is ≈ 0.0045 and of its 10/50/90 % quantiles ≈ 0.007; the tolerances are
# about 3.5 standard errors. 0.044 is the two-sample Kolmogorov–Smirnov critical value at
# α = 0.001 for n = m = 4,000.
MEAN_TOL, QUANTILE_TOL, KS_CRITICAL = 0.016, 0.025, 0.044


def _augment(preset="none", size=32, interpolation="bilinear", channels_last=False, **fields):
    aug = AugmentConfig(preset=preset, **fields)
    return BatchAugment(resolve_augment(aug), size, MEAN, STD, interpolation, None, channels_last)


def _photo(w=70, h=50, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth_square(side=64):
    """Low-frequency colour waves: resampling twice or once differs by little on it."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    waves = [
        128 + 100 * torch.sin(x / 9),
        128 + 100 * torch.cos(y / 7),
        128 + 60 * torch.sin((x + y) / 11),
    ]
    return torch.stack(waves, -1).round().to(torch.uint8)


def _batch(square, n):
    return square[None].expand(n, -1, -1, -1).contiguous()


def _ks(a, b):
    """Two-sample Kolmogorov–Smirnov statistic."""
    grid = torch.cat([a, b]).unique()
    cdf = [torch.searchsorted(v.sort().values, grid, right=True) / len(v) for v in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


def _assert_same_distribution(ours, theirs):
    assert abs(ours.mean().item() - theirs.mean().item()) < MEAN_TOL
    diff = (ours.quantile(QUANTILES) - theirs.quantile(QUANTILES)).abs()
    assert diff.max().item() < QUANTILE_TOL, diff
    assert _ks(ours, theirs) < KS_CRITICAL


@pytest.mark.parametrize("preset", ["default", "strong"])
def test_crop_area_and_ratio_follow_torchvision_random_resized_crop(preset):
    side, r = 64, resolve_augment(AugmentConfig(preset=preset))
    p = _augment(preset, size=56).sample_params(SEEDS, side)
    torch.manual_seed(0)
    reference = v2.RandomResizedCrop(56, scale=tuple(r["scale"]))
    boxes = [reference.make_params([torch.empty(3, side, side)]) for _ in range(N)]
    theirs = {k: torch.tensor([b[k] for b in boxes], dtype=torch.float64) for k in boxes[0]}
    ours = {k: getattr(p, k).double() for k in ("top", "left", "height", "width")}
    for boxes_ in (ours, theirs):  # inside the square
        assert (boxes_["top"] >= 0).all() and (boxes_["top"] + boxes_["height"] <= side).all()
        assert (boxes_["left"] >= 0).all() and (boxes_["left"] + boxes_["width"] <= side).all()
    area = {k: b["height"] * b["width"] / side**2 for k, b in (("o", ours), ("t", theirs))}
    ratio = {k: b["width"] / b["height"] for k, b in (("o", ours), ("t", theirs))}
    _assert_same_distribution(area["o"], area["t"])
    _assert_same_distribution(ratio["o"], ratio["t"])
    assert area["o"].min() >= r["scale"][0] - 0.02 and area["o"].max() <= 1
    centre = {k: (b["left"] + b["width"] / 2) / side for k, b in (("o", ours), ("t", theirs))}
    _assert_same_distribution(centre["o"], centre["t"])


def test_flip_affine_and_jitter_draws_follow_the_preset():
    p = _augment("strong", size=32).sample_params(SEEDS, 37)
    assert abs(p.hflip.double().mean().item() - 0.5) < 0.03 and not p.vflip.any()
    q = _augment("strong", hflip=0.2, vflip=0.7).sample_params(SEEDS, 37)
    assert abs(q.hflip.double().mean().item() - 0.2) < 0.03
    assert abs(q.vflip.double().mean().item() - 0.7) < 0.03
    # Uniform on (-20°, 20°): ten equal bins of ~400 draws each (sd ≈ 19), both ends reached.
    assert p.angle.abs().max() <= 20 and p.angle.min() < -19.5 and p.angle.max() > 19.5
    counts = torch.histc(p.angle.float(), bins=10, min=-20, max=20)
    assert counts.min() > 320 and counts.max() < 480, counts
    for shear in (p.shear_x, p.shear_y):  # both axes, uniform on ±10°: sd 10 / √3
        assert shear.abs().max() <= 10 and abs(shear.std().item() - 10 / 3**0.5) < 0.3
    for shift in (p.translate_x, p.translate_y):  # whole pixels, up to 0.1 × 32 = 3.2
        assert torch.equal(shift, shift.round()) and set(shift.tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    brightness, contrast, saturation, hue = p.jitter.T
    for factor in (brightness, contrast, saturation):
        assert factor.min() >= 0.6 and factor.max() <= 1.4 and factor.max() > 1.39
    assert hue.abs().max() <= 0.1 and hue.abs().max() > 0.099
    assert (p.jitter_order.sort(1).values == torch.arange(4)).all()  # permutations
    first = torch.bincount(p.jitter_order[:, 0], minlength=4) / N
    assert (first - 0.25).abs().max() < 0.03, first  # each op first a quarter of the time


def test_erasing_rate_and_box_sizes_follow_torchvision_random_erasing():
    size = 32
    p = _augment("strong", size=size).sample_params(SEEDS, 37)
    top, left, h, w = p.erase.T.double()
    erased = h > 0
    assert abs(erased.double().mean().item() - 0.25) < 0.03
    assert (top[erased] + h[erased] <= size).all() and (left[erased] + w[erased] <= size).all()
    torch.manual_seed(0)
    reference = v2.RandomErasing(p=1.0, value=0)  # the box given that one is drawn
    boxes = [reference.make_params([torch.empty(3, size, size)]) for _ in range(N)]
    theirs = torch.tensor([b["h"] * b["w"] / size**2 for b in boxes if b["v"] is not None])
    ours = (h * w / size**2)[erased]
    assert abs(ours.mean().item() - theirs.double().mean().item()) < 0.015
    assert (ours.quantile(QUANTILES) - theirs.double().quantile(QUANTILES)).abs().max() < 0.03


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("size", "photo"), [(32, (70, 50)), (24, (70, 50)), (40, (45, 90))])
def test_none_preset_train_and_eval_equal_the_cpu_eval_transform(interpolation, size, photo):
    images = [_photo(*photo, seed=i) for i in range(3)]
    squares = torch.stack([eval_square(im, size, interpolation=interpolation) for im in images])
    assert squares.shape == (3, round(size / 0.875), round(size / 0.875), 3)
    expected = torch.stack([eval_transform(size, MEAN, STD, interpolation)(im) for im in images])
    batch = _augment("none", size, interpolation)
    assert torch.equal(batch.eval(squares), expected)
    assert torch.equal(batch.train(squares, torch.tensor([1, 2, 3])), expected)


def test_flip_only_gives_exactly_the_mirrored_eval_crop():
    squares = torch.stack([eval_square(_photo(seed=i), 32) for i in range(4)])
    seeds = torch.tensor([5, 6, 7, 8])
    plain = _augment("none").eval(squares)
    assert torch.equal(_augment("none", hflip=1.0).train(squares, seeds), plain.flip(-1))
    assert torch.equal(_augment("none", vflip=1.0).train(squares, seeds), plain.flip(-2))
    half = _augment("none", hflip=0.5)
    flipped = half.sample_params(seeds, squares.shape[1]).hflip
    assert 0 < flipped.sum() < 4  # these seeds give both cases
    out = half.train(squares, seeds)
    for k in range(4):
        assert torch.equal(out[k], plain[k].flip(-1) if flipped[k] else plain[k])


@pytest.mark.parametrize("seed", [0, 1])
def test_one_resampling_matches_torchvision_crop_flip_affine_step_by_step(seed):
    """Same parameters through torchvision's tensor kernels (crop+resize, flips, affine with the
    crop's bilinear coverage compositing the fill): equal up to resampling once instead of
    twice; where the reference's coverage is 0 the output is exactly the fill."""
    side, size, n = 64, 56, 12
    geometry = AugmentConfig(
        preset="strong", hflip=0.5, vflip=0.5, fill="white", color_jitter=0, noise=0, erasing=0
    )
    batch = BatchAugment(resolve_augment(geometry), size, (0, 0, 0), (1, 1, 1), "bilinear")
    square = _smooth_square(side)
    p = batch.sample_params(torch.arange(n) + 100 * seed, side)
    assert p.hflip.any() and p.vflip.any() and (p.angle.abs() > 5).any()
    out = batch.apply(_batch(square, n), p) * 255
    src = square.permute(2, 0, 1).float()
    for k in range(n):
        box = [int(t[k]) for t in (p.top, p.left, p.height, p.width)]
        x = F.resized_crop(src, *box, [size, size], InterpolationMode.BILINEAR, antialias=False)
        x = F.horizontal_flip(x) if p.hflip[k] else x
        x = F.vertical_flip(x) if p.vflip[k] else x
        affine = dict(
            angle=float(p.angle[k]),
            translate=[float(p.translate_x[k]), float(p.translate_y[k])],
            scale=1.0,
            shear=[float(p.shear_x[k]), float(p.shear_y[k])],
            interpolation=InterpolationMode.BILINEAR,
            fill=None,
        )
        coverage = F.affine(torch.ones(1, size, size), **affine)
        reference = F.affine(x, **affine) + (1 - coverage) * 255
        diff = (out[k] - reference).abs()
        assert diff.mean() < 0.25 and diff.quantile(0.99) < 2.0 and diff.max() < 6, k
        outside = (coverage[0] == 0).expand(3, -1, -1)
        assert torch.equal(out[k][outside], torch.full_like(out[k][outside], 255.0))


@pytest.mark.parametrize("fill", ["black", "white", "mean"])
def test_a_45_degree_rotation_fills_the_corners_and_keeps_the_centre(fill):
    side = 33
    square = _smooth_square(side)
    batch = BatchAugment(
        resolve_augment(AugmentConfig(preset="none", rotation=45, fill=fill)), side, MEAN, STD
    )
    p = batch.sample_params(torch.tensor([0]), side)
    zero = torch.zeros(1, dtype=torch.long)
    p = dataclasses.replace(p, top=zero, left=zero, angle=torch.tensor([45.0]))
    out = batch.apply(square[None], p)[0]
    colour = {"black": (0, 0, 0), "white": (255, 255, 255), "mean": [round(255 * m) for m in MEAN]}
    expected = torch.tensor(
        [(v / 255 - m) / s for v, m, s in zip(colour[fill], MEAN, STD, strict=True)]
    )
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1), (2, 2)):
        assert torch.allclose(out[:, y, x], expected.float(), atol=1e-6)
    centre = (square[16, 16].float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 16, 16], centre, atol=1e-4)
    assert (out[:, 16, 1] - expected).abs().max() > 0.1  # the middle of an edge is image


def test_a_90_degree_rotation_is_clockwise_rot90_and_shear_moves_opposite_corners_out():
    side = 32
    square = torch.from_numpy(np.array(_photo(side, side)))
    batch = BatchAugment(
        resolve_augment(AugmentConfig(preset="none", rotation=90, shear=30, fill="white")),
        side,
        (0, 0, 0),
        (1, 1, 1),
    )
    p = batch.sample_params(torch.tensor([0]), side)
    z = torch.zeros(1)
    p = dataclasses.replace(p, angle=torch.tensor([90.0]), shear_x=z, shear_y=z)
    rotated = batch.apply(square[None], p)[0] * 255
    # F.affine's (and RandomAffine's) angle is clockwise, unlike F.rotate's.
    expected = torch.rot90(square.permute(2, 0, 1).float(), -1, dims=(-2, -1))
    assert (rotated - expected).abs().max() < 0.05
    p = dataclasses.replace(p, angle=z, shear_x=torch.tensor([30.0]))
    sheared = batch.apply(square[None], p)[0] * 255
    corners = ((0, 0), (0, -1), (-1, 0), (-1, -1))
    white = [bool((sheared[:, y, x] > 254.99).all()) for y, x in corners]
    assert white in ([True, False, False, True], [False, True, True, False])


def test_colour_jitter_applies_torchvision_blends_in_each_samples_order():
    squares = torch.stack([eval_square(_photo(seed=i), 32) for i in range(2)])
    batch = _augment("none", color_jitter=0.5)
    plain = batch.eval(squares) * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    p = batch.sample_params(torch.tensor([1, 2]), squares.shape[1])
    factors = torch.tensor([[1.5, 0.5, 1.3, 0.0], [1.5, 0.5, 0.7, 0.0]])
    orders = torch.tensor([[0, 1, 2, 3], [2, 1, 0, 3]])
    out = batch.apply(squares, dataclasses.replace(p, jitter=factors, jitter_order=orders))
    steps = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for k in range(2):
        x = plain[k]
        for op in orders[k].tolist():
            x = steps[op](x, factors[k, op].item())
        assert torch.allclose(out[k], F.normalize(x, MEAN, STD), atol=1e-5)
    # Hue: +1/6 turns red towards yellow (as an HSV shift does) and keeps YIQ's luma.
    red = torch.tensor([153, 102, 102], dtype=torch.uint8).expand(1, 32, 32, 3).contiguous()
    hue = torch.tensor([[1.0, 1.0, 1.0, 1 / 6]])
    q = batch.sample_params(torch.tensor([0]), 32)
    shifted = batch.apply(red, dataclasses.replace(q, jitter=hue, jitter_order=orders[:1]))
    r, g, b = (shifted[0, :, 5, 5] * torch.tensor(STD) + torch.tensor(MEAN)).tolist()
    assert r > b + 0.1 and g > b + 0.1
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert abs(luma @ torch.tensor([r, g, b]) - luma @ torch.tensor([0.6, 0.4, 0.4])) < 1e-3


def test_noise_and_erasing():
    squares = torch.full((2, 37, 37, 3), 128, dtype=torch.uint8)
    plain = _augment("none").eval(squares)
    noisy = _augment("none", noise=0.1).train(squares, torch.tensor([1, 2]))
    diff = (noisy - plain) * torch.tensor(STD).view(3, 1, 1)  # back on the 0–1 scale
    assert abs(diff.std().item() - 0.1) < 0.005 and abs(diff.mean().item()) < 0.005
    assert (diff[0] - diff[1]).abs().max() > 0.1  # each sample its own noise
    batch = _augment("none", erasing=1.0)
    seeds = torch.tensor([3, 4, 5])
    p = batch.sample_params(seeds, 37)
    out = batch.train(torch.cat([squares, squares[:1]]), seeds)
    for k, (top, left, h, w) in enumerate(p.erase.tolist()):
        assert h > 0
        box = torch.zeros(32, 32, dtype=torch.bool)
        box[top : top + h, left : left + w] = True
        assert (out[k][:, box] == 0).all() and torch.equal(out[k][:, ~box], plain[0][:, ~box])


def test_a_samples_output_depends_on_its_seed_not_on_its_batch():
    squares = torch.stack([eval_square(_photo(seed=i), 32) for i in range(4)])
    batch = _augment("strong", interpolation="bicubic", fill="mean")
    first = batch.train(squares, torch.tensor([11, 22, 33, 44]))
    again = batch.train(squares[[2, 0, 3]], torch.tensor([33, 9, 44]))
    assert torch.equal(again[0], first[2]) and torch.equal(again[2], first[3])
    assert not torch.allclose(again[1], first[0])  # another seed, another augmentation
    p = batch.sample_params(torch.tensor([11, 22, 33, 44]), 37)
    q = batch.sample_params(torch.tensor([33]), 37)
    for field in dataclasses.fields(p):
        assert torch.equal(getattr(p, field.name)[2:3], getattr(q, field.name)), field.name


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("preset", ["none", "light", "strong"])
def test_outputs_are_normalised_float_batches_in_the_asked_layout(preset, channels_last):
    squares = torch.stack([eval_square(_photo(seed=i), 24) for i in range(3)])
    batch = _augment(preset, 24, channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for out in (batch.train(squares, torch.tensor([1, 2, 3])), batch.eval(squares)):
        assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
        assert out.device == squares.device and out.is_contiguous(memory_format=layout)
        # Inside the image of [0, 1] under Normalize, per channel, and not a constant.
        assert (out >= BLACK - 1e-5).all() and (out <= WHITE + 1e-5).all() and out.std() > 0.3


def test_bad_inputs_are_errors_naming_the_fix():
    batch = _augment("default")
    with pytest.raises(ImgclfError, match=r"uint8 squares \[B, S, S, 3\]"):
        batch.eval(torch.zeros(2, 37, 37, 3))
    with pytest.raises(ImgclfError, match=r"uint8 squares"):
        batch.train(torch.zeros(2, 3, 37, 37, dtype=torch.uint8), torch.tensor([1, 2]))
    with pytest.raises(ImgclfError, match="smaller than the output size 32"):
        batch.eval(torch.zeros(2, 30, 30, 3, dtype=torch.uint8))
    with pytest.raises(ImgclfError, match="bilinear, bicubic, nearest"):
        _augment(interpolation="lanczos")
    with pytest.raises(ImgclfError, match="crop_pct"):
        eval_square(_photo(), 32, crop_pct=1.2)
    with pytest.raises(ImgclfError, match="black, white, mean"):
        BatchAugment(resolve_augment(AugmentConfig()), 32, MEAN, STD, fill="grey")


def test_contact_sheet_puts_the_cpu_row_above_the_batch_row(tmp_path):
    squares = torch.stack([eval_square(_photo(seed=i), 32) for i in range(3)])
    batch = _augment("default")
    cpu = batch.eval(squares)
    gpu = batch.train(squares, torch.tensor([1, 2, 3]))
    path = contact_sheet(cpu, gpu, tmp_path / "sheet.png", MEAN, STD)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    tile = np.asarray(to_pil(gpu[2], MEAN, STD))
    hits = [
        (y, x)
        for y in range(sheet.shape[0] - 31)
        for x in range(sheet.shape[1] - 31)
        if np.array_equal(sheet[y : y + 32, x : x + 32], tile)
    ]
    assert len(hits) == 1  # the third batch tile, once: second row, third column
    (y, x), first = hits[0], np.asarray(to_pil(cpu[0], MEAN, STD))
    assert y > 32 and np.array_equal(sheet[y - 36 : y - 4, x - 72 : x - 40], first)
    out = compare_sheet([_photo(seed=i) for i in range(4)], AugmentConfig(), 32, tmp_path / "c.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 4 * 32 and im.height > 2 * 32
    with pytest.raises(ImgclfError, match="one shape"):
        contact_sheet(cpu, gpu[:2], tmp_path / "bad.png")
