"""Typed run configuration: YAML + `section.key=value` overrides, validated once, at the edge.

Every key has a default, so an empty file is a valid config. Unknown or mistyped keys fail with
the nearest valid key. `resolve()` returns the full config with every default filled in; that is
what gets printed by `imgclf config show` and saved in each run folder.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imgclf.errors import ImgclfError
from imgclf.metric_names import check_epoch_metric


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A metric a run watches: one of the names training measures every epoch (metric_names.py),
# checked when the config loads, with the nearest name.
EpochMetric = Annotated[str, AfterValidator(check_epoch_metric)]


class SplitConfig(_Strict):
    """Stratified, duplicate-grouped, seeded split fractions (test may be 0 for train/val only)."""

    train: float = Field(0.65, gt=0, le=1)
    val: float = Field(0.20, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    resplit: bool = Field(
        False,
        description="recompute the split from these fractions and seed, replacing the one "
        "saved in the manifest (by `imgclf split` or an earlier run); false: the saved split is "
        "kept, and fractions or a seed set here that disagree with it are an error",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self

    def fractions(self) -> dict[str, float]:
        return {
            k: v for k, v in {"train": self.train, "val": self.val, "test": self.test}.items() if v
        }


class ScanConfig(_Strict):
    """What `scan` accepts as an image, and when it gives up."""

    max_pixels: int = Field(
        89_478_485, gt=0, description="width × height cap, checked from the header"
    )
    min_side: int = Field(8, ge=1, description="images with a shorter side are skipped")
    follow_symlinks: Literal["inside", "all", "none"] = Field(
        "inside", description="inside: follow links whose target stays inside the data root"
    )
    max_skipped_fraction: float = Field(0.5, ge=0, le=1, description="abort above this")
    label_conflicts: Literal["error", "skip"] = Field(
        "error", description="identical bytes under two labels: stop, or skip every copy"
    )
    workers: int = Field(0, ge=0, description="decode worker processes; 0 = one per core")


class DataConfig(_Strict):
    root: Path | None = Field(None, description="class-folder tree or CSV of path,label[,split]")
    manifest: Path | None = Field(None, description="manifest folder; default manifests/<name>")
    image_size: int | None = Field(None, ge=8, description="None: the model's default input size")
    crop_mode: Literal["center", "squash"] | None = Field(
        None,
        description="center: the short side resized, the centre square kept (cuts the ends of "
        "wide or tall images); squash: both sides resized, the whole image kept; None: the "
        "model's (center)",
    )
    split: SplitConfig = SplitConfig()
    scan: ScanConfig = ScanConfig()
    cache: Literal["none", "auto", "memory", "disk"] = Field(
        "none",
        description="decode-once image cache + batch augmentation on the device: memory (RAM, "
        "pinned for a GPU), disk (memory-mapped), auto (memory when it fits cache_memory_gb)",
    )
    cache_dir: Path | None = Field(None, description="None: $IMGCLF_CACHE/images")
    cache_memory_gb: float | None = Field(
        None, gt=0, description="auto's RAM budget; None: a quarter of RAM, at most 16 GiB"
    )
    cache_device: Literal["auto", "host", "device"] = Field(
        "auto",
        description="where cached pixels are read from: device (the model's, GPU or CPU), host "
        "(RAM or the memory map, copied per batch); auto: the GPU when they fit a quarter of its "
        "free memory, else host",
    )

    @field_validator("cache_device", mode="before")
    @classmethod
    def _old_cache_device_names(cls, v):
        return {"cpu": "host", "cuda": "device"}.get(v, v)  # the names before host / device


class HeadConfig(_Strict):
    """The classifier on top of the backbone's feature map."""

    pool: Literal["avg", "max", "avgmax", "flatten"] = "avg"
    hidden: list[int] = Field(default_factory=list, description="dense layers before the output")
    activation: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)


class ScratchConfig(_Strict):
    """The from-scratch CNN family (model.name: scratch_cnn, or a named preset)."""

    blocks: int = Field(4, ge=1, le=8)
    width: int = Field(32, ge=4, description="channels of the first block")
    schedule: Literal["double", "fixed", "inverted"] = "double"
    max_width: int = Field(256, ge=4)
    convs_per_block: int = Field(1, ge=1, le=4)
    kernel_size: int = Field(3, ge=1, le=11)
    batch_norm: bool = True
    dropout: float = Field(0.0, ge=0, lt=1, description="spatial dropout after each block")
    downsample: Literal["max", "avg", "stride"] = "max"


class ModelConfig(_Strict):
    name: str = Field("efficientnet_lite0", description="`imgclf models` lists the choices")
    pretrained: str = Field(
        "packaged", description="none | packaged | hub | file:PATH (state dict or safetensors)"
    )
    init_from: Path | None = Field(None, description="warm start from an earlier run's weights")
    head: HeadConfig = HeadConfig()
    scratch: ScratchConfig = ScratchConfig()
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth (timm models)")


TRAINABLE_KEYS = ("last_blocks", "last_fraction", "from_layer")


class StepSchedule(_Strict):
    every: int = Field(5, ge=1, description="epochs between decays")
    factor: float = Field(10.0, gt=1, description="divide the lr by this")
    min_lr: float = Field(0.0, ge=0)


class CyclicSchedule(_Strict):
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    base_lr_fraction: float = Field(0.1, gt=0, le=1, description="base_lr = lr × this; max = lr")
    half_cycle_epochs: float = Field(2.0, gt=0)
    gamma: float = Field(0.99, gt=0, le=1, description="exp_range decay per step")


class PlateauSchedule(_Strict):
    metric: EpochMetric = "val_loss"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(2, ge=0)
    min_lr: float = Field(0.0, ge=0)


class StageConfig(_Strict):
    """One training stage: what trains, for how long, with which optimizer and schedule."""

    name: str | None = None
    trainable: str | dict[str, Any] = Field(
        "all", description="head | all | {last_blocks: N} | {last_fraction: F} | {from_layer: NAME}"
    )
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="auto: from the number of training images, resolved when the run starts "
        "(head-only stages 2-10 epochs, others 3-30; train/recipe.py)",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["constant", "step", "cosine", "onecycle", "cyclic", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0, description="cosine floor")
    step: StepSchedule = StepSchedule()
    cyclic: CyclicSchedule = CyclicSchedule()
    plateau: PlateauSchedule = PlateauSchedule()
    backbone_lr_mult: float = Field(
        1.0, gt=0, description="discriminative lr: backbone = lr × this"
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="lr × decay^depth from the head"
    )
    ema: float | None = Field(
        None,
        gt=0,
        le=100,
        description="average the weights over about this many epochs (an exponential moving "
        "average, updated every step); validation and the kept best weights use the average",
    )
    bn: Literal["frozen-eval", "eval", "train"] = Field(
        "frozen-eval",
        description="frozen-eval: frozen BatchNorm layers keep their running statistics; "
        "eval: every BatchNorm does (keeps pretrained statistics when fine-tuning); "
        "train: every BatchNorm updates them",
    )

    @model_validator(mode="after")
    def _check_trainable(self) -> StageConfig:
        t = self.trainable
        if isinstance(t, str) and t not in ("head", "all"):
            raise ValueError(f"trainable must be head, all, or one of {TRAINABLE_KEYS}; got {t!r}")
        if isinstance(t, dict):
            if len(t) != 1 or next(iter(t)) not in TRAINABLE_KEYS:
                near = difflib.get_close_matches(next(iter(t), ""), TRAINABLE_KEYS, n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise ValueError(f"trainable takes one key of {TRAINABLE_KEYS}, got {t}{hint}")
            ((key, value),) = t.items()
            if key == "last_blocks" and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"trainable.last_blocks must be an integer ≥ 0, got {value!r}")
            if key == "last_fraction" and not (isinstance(value, float | int) and 0 < value <= 1):
                raise ValueError(f"trainable.last_fraction must be in (0, 1], got {value!r}")
            if key == "from_layer" and not (isinstance(value, str) and value):
                raise ValueError("trainable.from_layer must name a module, e.g. blocks.5")
        return self


# The recipe `imgclf train` uses when a config names no stages: transfer learning in two stages,
# each as long as the data size calls for (train/recipe.py). bn: eval keeps the pretrained
# BatchNorm statistics while fine-tuning (see configs/digits_lite0.yaml).
DEFAULT_STAGES: tuple[dict[str, Any], ...] = (
    {"name": "head", "trainable": "head", "epochs": "auto", "optimizer": "adamw", "lr": 3e-3,
     "schedule": "cosine"},
    {"name": "finetune", "trainable": "all", "epochs": "auto", "optimizer": "adamw", "lr": 3e-4,
     "schedule": "cosine", "warmup_epochs": 1, "bn": "eval"},
)  # fmt: skip


class AugmentConfig(_Strict):
    """A preset, with any single transform overridable (None: the preset's value)."""

    preset: Literal["none", "light", "default", "strong"] = "default"
    hflip: float | None = Field(None, ge=0, le=1)
    vflip: float | None = Field(None, ge=0, le=1)
    rotation: float | None = Field(None, ge=0, le=180, description="degrees")
    scale: tuple[float, float] | None = Field(None, description="random resized crop area range")
    color_jitter: float | None = Field(None, ge=0, le=1)
    shear: float | None = Field(None, ge=0, le=45)
    translate: float | None = Field(None, ge=0, le=0.5)
    erasing: float | None = Field(None, ge=0, le=1)
    noise: float | None = Field(None, ge=0, le=1, description="Gaussian noise std (0–1 scale)")
    fill: Literal["black", "white", "mean"] = Field(
        "black", description="rotation/affine fill colour, applied before normalisation"
    )


class EarlyStopping(_Strict):
    metric: EpochMetric = "val_loss"
    patience: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="epochs without improvement before a stage ends (a stage's warm-up epochs "
        "are not judged); None: never stop early; "
        "auto: 3 for stages with epochs: auto, never for stages with a fixed number of epochs",
    )
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="the global batch: all processes together")
    eval_batch_size: int | None = Field(None, ge=1)
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes; auto: from the cores this process may use "
        "and the processes sharing them, 0 below 512 training images (see environment.json)",
    )
    augment: AugmentConfig = AugmentConfig()
    imbalance: Literal["none", "weighted_loss", "sampler", "focal"] = "none"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="Beta(α, α); 0 = off")
    cutmix: float = Field(0.0, ge=0, description="Beta(α, α); 0 = off")
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1)
    stages: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(**s) for s in DEFAULT_STAGES],
        min_length=1,
        description="trained in order; the default: a new head on the frozen backbone, then "
        "the whole model at a 10x lower lr with BatchNorm on its pretrained statistics, each "
        "for auto epochs (on a random backbone the head stage is skipped and BatchNorm "
        "learns its statistics)",
    )
    early_stopping: EarlyStopping = EarlyStopping()
    best_metric: EpochMetric = Field("val_accuracy", description="chooses the saved best epoch")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    channels_last: bool | None = Field(None, description="None: on for CUDA and the CPU")
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    max_bad_images: int = Field(100, ge=0, description="images failing mid-run before stopping")
    features: Literal["none", "cache"] = Field(
        "none", description="cache: head-only stages train on cached backbone features"
    )
    feature_views: int = Field(1, ge=1, description="augmented views per training image cached")
    feature_cache: Path | None = Field(None, description="None: $IMGCLF_CACHE/features")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also save a resumable checkpoint every N batches mid-epoch"
    )
    compile: bool = Field(False, description="torch.compile the model (pays off on GPUs)")
    predict_test: bool = Field(
        True,
        description="predict the test split with the best weights when the run ends; imgclf "
        "fit sets false for its candidates and measures the test split once, for the model it "
        "chooses",
    )
    sync_bn: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over the global batch"
    )


class TrackingConfig(_Strict):
    """Mirrors of the run folder (the source of truth) into tracking tools."""

    mlflow: bool = Field(True, description="mirror each run to MLflow")
    uri: str | None = Field(None, description="MLflow tracking URI; None: sqlite next to the runs")
    experiment: str = "imgclf"
    tensorboard: bool = Field(False, description="also write TensorBoard logs into the run")


class RunConfig(_Strict):
    """One run: data, model, training, tracking, and where it is written."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    runs_dir: Path = Path("runs")
    name: str | None = Field(None, description="a label for the run id")
    tags: dict[str, str] = Field(default_factory=dict, description="e.g. {sweep: ID}; in summary")
    seed: int = 0


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """YAML file (optional) + `a.b=value` overrides → validated RunConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ImgclfError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ImgclfError(f"{path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ImgclfError(
                f"{path} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        raw = loaded or {}
    if any(re.search(r"\.\d+(\.|=)", item) for item in overrides):
        # `train.stages.0.lr=…` indexes a list that may exist only as a default: fill in just
        # the indexed lists, so every other key stays unset (a saved split is kept unless the
        # config sets data.split; see data/prepare.py).
        full = resolve(validate(raw, source=str(path) if path else "config"))
        for item in overrides:
            if m := re.match(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.\d+(\.|=)", item):
                _fill_default(raw, full, m.group(1).split("."))
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path) if path else "overrides")


def _fill_default(raw: dict[str, Any], full: dict[str, Any], keys: list[str]) -> None:
    """Copy `full`'s value at `keys` into `raw` where `raw` does not have it yet."""
    node, ref = raw, full
    for k in keys[:-1]:
        if not isinstance(node, dict) or not isinstance(ref, dict) or k not in ref:
            return  # an unknown key: validation names it later
        node, ref = node.setdefault(k, {}), ref[k]
    if isinstance(node, dict) and isinstance(ref, dict) and keys[-1] in ref:
        node.setdefault(keys[-1], copy.deepcopy(ref[keys[-1]]))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-3, true, [1,2])."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ImgclfError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for p in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, p, item)
            continue
        child = node.setdefault(p, {})
        if not isinstance(child, dict | list):
            raise ImgclfError(f"override {item!r}: {p} is a value, not a section")
        node = child
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(node, list):
        node[_index(node, parts[-1], item)] = parsed
    else:
        node[parts[-1]] = parsed


def _index(items: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ImgclfError(
            f"override {item!r}: {part!r} is not an index of a {len(items)}-item list"
        )
    return int(part)


def _list_item(items: list, part: str, item: str) -> Any:
    return items[_index(items, part, item)]


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ImgclfError(f"invalid {source}:\n" + "\n".join(explain(e, RunConfig))) from None


def explain(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per problem; an unknown key gets the nearest valid key at its level."""
    lines = []
    for item in err.errors():
        loc = list(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = fields_at(root, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = "".join(f"{p}." for p in loc[:-1])
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            lines.append(f"  {dotted}: unknown key{hint} (valid: {', '.join(valid)})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = f" (got {_short(item.get('input'))})" if loc else ""
            lines.append(f"  {dotted}: {msg}{got}")
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fields_at(root: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names of the model reached by walking `loc` from `root` (list indices and free
    dict keys step into the item type, so `train.stages.0.x` is checked against a stage)."""
    ann: Any = root
    for part in loc:
        if typing.get_origin(ann) in (list, dict):
            ann = typing.get_args(ann)[-1]
            continue
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        field = ann.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
    while typing.get_origin(ann) in (list, dict):
        ann = typing.get_args(ann)[-1]
    return list(ann.model_fields) if isinstance(ann, type) and issubclass(ann, BaseModel) else []


def resolve(cfg: RunConfig) -> dict[str, Any]:
    """The full config as plain values, every default filled in."""
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(resolve(cfg), sort_keys=False, allow_unicode=True)
