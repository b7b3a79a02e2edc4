"""Model names → builders: scratch presets and every timm architecture, with their weights.

`build_model` is the one entry point for training; `model_from_spec` rebuilds the same
architecture from model.json in a fresh process, with no weights, network or packages.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg
from torch import nn

from imgclf.config import HeadConfig, ModelConfig, ScratchConfig
from imgclf.errors import ImgclfError
from imgclf.models.backbones import FeatureInfo, probe_backbone, remove_modules
from imgclf.models.heads import Head
from imgclf.models.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImgclfModel,
    Preprocessing,
    as_triple,
)
from imgclf.models.pretrained import (
    PACKAGED,
    PACKAGED_ALIASES,
    create_hub_backbone,
    load_backbone_state,
    packaged_preprocessing,
    packaged_state_dict,
    parse_pretrained,
    read_state_dict,
)
from imgclf.models.scratch import (
    SCRATCH_INPUT_SIZE,
    SCRATCH_PRESETS,
    ScratchCNN,
    check_input_size,
    preset_config,
)

SPEC_FORMAT = 1
# timm without its classifier and pooling: forward_features gives the map our head pools.
BACKBONE_ARGS: dict[str, Any] = {"num_classes": 0, "global_pool": ""}
SCRATCH_PREPROCESSING = Preprocessing(SCRATCH_INPUT_SIZE, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)


def list_models(filter: str | None = None) -> list[str]:
    """Scratch presets, then every timm architecture; `filter` is a glob ("*lite*")."""
    names = list(SCRATCH_PRESETS) + timm.list_models()
    if not filter:
        return names
    # A bare word means "contains": `imgclf models lite` is what people type.
    pattern = filter.lower() if any(c in filter for c in "*?[") else f"*{filter.lower()}*"
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern)]


def has_packaged_weights(name: str) -> bool:
    """Whether `pretrained: packaged` works for `name` (weights installed, no network)."""
    return PACKAGED_ALIASES.get(name, name) in PACKAGED


def resolve_name(name: str) -> tuple[str, str]:
    """User's model name → (kind, architecture); unknown names suggest close ones."""
    if name in SCRATCH_PRESETS:
        return "scratch", name
    if name in PACKAGED_ALIASES:
        return "timm", PACKAGED_ALIASES[name]
    if timm.is_model(name):
        return "timm", name
    near = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ImgclfError(
        f"model.name {name!r} is not a known model{hint} (scratch presets: "
        f"{', '.join(SCRATCH_PRESETS)}; `imgclf models` lists all {len(list_models())})"
    )


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    image_size: int | None = None,
    crop_mode: str | None = None,
) -> tuple[ImgclfModel, Preprocessing]:
    """Build the model named in cfg, load its pretrained weights, return its preprocessing
    (`crop_mode`: the data's choice, `data.crop_mode`; None keeps the model's centre crop)."""
    model, prep = _build(cfg, num_classes, image_size)
    if crop_mode is not None:
        prep = dataclasses.replace(prep, crop_mode=crop_mode)
    return model, prep


def _build(
    cfg: ModelConfig, num_classes: int, image_size: int | None
) -> tuple[ImgclfModel, Preprocessing]:
    kind, arch = resolve_name(cfg.name)
    source, path = parse_pretrained(cfg.pretrained)
    if kind == "scratch":
        return _build_scratch(cfg, arch, num_classes, image_size, source, path)
    # packaged_preprocessing is also the error for architectures without packaged weights.
    prep = packaged_preprocessing(arch) if source == "packaged" else _timm_preprocessing(arch)
    if image_size is not None:
        prep = dataclasses.replace(prep, input_size=image_size)
    kwargs = _timm_kwargs(arch, cfg.drop_path, prep.input_size)
    if source == "hub":
        backbone = create_hub_backbone(arch, **BACKBONE_ARGS, **kwargs)
    else:
        backbone = _create_timm(arch, kwargs)
    info = probe_backbone(backbone, prep.input_size, cfg.name)
    head_cfg = cfg.head
    spec = _spec(cfg.name, "timm", arch, kwargs, head_cfg, None, num_classes, prep, info, source)
    model = _assemble(backbone, spec, info)
    # The classifier keys belong to timm's own head; our head has num_classes outputs.
    drop = tuple(f"{m}." for m in [*_classifier_names(arch), *info.removed_modules])
    if source == "packaged":
        state = packaged_state_dict(arch)
        load_backbone_state(backbone, state, f"packaged weights for {arch}", drop)
        if head_cfg == HeadConfig() and num_classes == 1000:
            model.head.fc.load_state_dict(
                {"weight": state["classifier.weight"], "bias": state["classifier.bias"]}
            )
    elif source == "file":
        assert path is not None
        load_backbone_state(backbone, read_state_dict(path), str(path), drop)
    return model, prep


def _build_scratch(
    cfg: ModelConfig,
    preset: str,
    num_classes: int,
    image_size: int | None,
    source: str,
    path: Path | None,
) -> tuple[ImgclfModel, Preprocessing]:
    if source == "hub":
        raise ImgclfError(
            f"{preset} is trained from scratch and has no hub weights; use `pretrained: none` "
            f"or `pretrained: file:PATH` (weights saved from the same scratch architecture)"
        )
    scratch = preset_config(preset, cfg.scratch)
    head_cfg = cfg.head
    default_hidden = SCRATCH_PRESETS[preset].default_hidden
    if default_hidden and not head_cfg.hidden:
        head_cfg = head_cfg.model_copy(update={"hidden": list(default_hidden)})
    size = image_size or SCRATCH_INPUT_SIZE
    check_input_size(scratch, size)
    prep = dataclasses.replace(SCRATCH_PREPROCESSING, input_size=size)
    backbone = ScratchCNN(scratch)
    info = probe_backbone(backbone, size, cfg.name)
    # `packaged` is the config default; a scratch model by definition starts from no weights.
    used = "file" if source == "file" else "none"
    spec = _spec(cfg.name, "scratch", preset, {}, head_cfg, scratch, num_classes, prep, info, used)
    model = _assemble(backbone, spec, info)
    if source == "file":
        assert path is not None
        load_backbone_state(backbone, read_state_dict(path), str(path))
    return model, prep


def model_from_spec(spec: dict[str, Any]) -> ImgclfModel:
    """Rebuild a model's architecture from its spec (model.json), with untrained weights."""
    required = ("kind", "architecture", "head", "num_classes", "feature_channels", "fmap_size")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ImgclfError(f"model spec is missing {missing}; was model.json written by imgclf?")
    if spec.get("format", SPEC_FORMAT) > SPEC_FORMAT:
        raise ImgclfError(
            f"model spec format {spec['format']} is newer than this imgclf understands "
            f"({SPEC_FORMAT}); upgrade imgclf"
        )
    if spec["kind"] == "scratch":
        backbone: nn.Module = ScratchCNN(ScratchConfig.model_validate(spec["scratch"]))
    elif spec["kind"] == "timm":
        backbone = _create_timm(spec["architecture"], dict(spec.get("timm_kwargs", {})))
        remove_modules(backbone, list(spec.get("removed_modules", [])))
    else:
        raise ImgclfError(f"model spec kind {spec['kind']!r} is unknown; valid: scratch, timm")
    info = FeatureInfo(
        channels=int(spec["feature_channels"]),
        fmap_size=(int(spec["fmap_size"][0]), int(spec["fmap_size"][1])),
        feature_format=spec.get("feature_format", "NCHW"),
        prefix_tokens=int(spec.get("prefix_tokens", 0)),
        frozen_params=list(spec.get("frozen_params", [])),
    )
    return _assemble(backbone, spec, info)


def _assemble(backbone: nn.Module, spec: dict[str, Any], info: FeatureInfo) -> ImgclfModel:
    head_cfg = HeadConfig.model_validate(spec["head"])
    head = Head(info.channels, int(spec["num_classes"]), head_cfg, info.fmap_size)
    params = dict(backbone.named_parameters())
    for name in info.frozen_params:
        params[name].requires_grad_(False)
    return ImgclfModel(backbone, head, spec)


def _spec(
    name: str,
    kind: str,
    arch: str,
    timm_kwargs: dict[str, Any],
    head: HeadConfig,
    scratch: ScratchConfig | None,
    num_classes: int,
    prep: Preprocessing,
    info: FeatureInfo,
    pretrained: str,
) -> dict[str, Any]:
    fixed_timm = bool(timm_kwargs.get("img_size"))
    return {
        "format": SPEC_FORMAT,
        "kind": kind,
        "name": name,
        "architecture": arch,
        "timm_kwargs": dict(timm_kwargs),
        "head": head.model_dump(mode="json"),
        "scratch": scratch.model_dump(mode="json") if scratch is not None else None,
        "num_classes": num_classes,
        "input_size": prep.input_size,
        # Flatten heads and ViT-style position embeddings only accept this exact size.
        "fixed_input_size": fixed_timm or head.pool == "flatten",
        "feature_channels": info.channels,
        "fmap_size": list(info.fmap_size),
        "feature_format": info.feature_format,
        "prefix_tokens": info.prefix_tokens,
        "removed_modules": list(info.removed_modules),
        "frozen_params": list(info.frozen_params),
        "pretrained": pretrained,  # provenance only; model_from_spec loads no weights
    }


def _timm_preprocessing(arch: str) -> Preprocessing:
    cfg = get_pretrained_cfg(arch)
    if cfg is None:  # architectures without any pretrained tag: timm's usual defaults
        return Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875)
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bicubic"
    return Preprocessing(
        input_size=int(cfg.input_size[-1]),
        mean=as_triple(cfg.mean),
        std=as_triple(cfg.std),
        interpolation=interpolation,
        crop_pct=float(cfg.crop_pct or 0.875),
    )


def _timm_kwargs(arch: str, drop_path: float, input_size: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    cfg = get_pretrained_cfg(arch)
    # Fixed-size models (ViT & co.) size their position embeddings at build time.
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = input_size
    return kwargs


def _create_timm(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=False, **BACKBONE_ARGS, **kwargs)
    except TypeError as e:
        option = "model.drop_path" if "drop_path_rate" in str(e) else "data.image_size"
        raise ImgclfError(
            f"{arch} does not accept {sorted(kwargs)} ({e}); leave {option} at its default"
        ) from None


def _classifier_names(arch: str) -> list[str]:
    cfg = get_pretrained_cfg(arch)
    names = cfg.classifier if cfg is not None and cfg.classifier else "classifier"
    # Distilled models have two classifiers (head, head_dist).
    return [names] if isinstance(names, str) else list(names)
