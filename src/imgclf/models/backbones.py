"""Measuring a backbone once at build time: output layout, channels, map size, unused parts.

timm backbones built with `num_classes=0` still own parts that only their own classifier path
uses (VGG's 4096-wide pre-logits, MobileNetV3's conv_head, ConvNeXt's head norm). Our head
replaces that path, so those parts would sit in the parameter counts, never get a gradient,
and break DDP's unused-parameter check. They are found by one backward pass and replaced by
nn.Identity; parameters that can't be removed that way stay in place, permanently frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.models.model import to_nchw


@dataclass
class FeatureInfo:
    """What a backbone's forward_features returns at one input size."""

    channels: int
    fmap_size: tuple[int, int]
    feature_format: str  # NCHW | NHWC | NLC (tokens)
    prefix_tokens: int = 0
    removed_modules: list[str] = field(default_factory=list)
    frozen_params: list[str] = field(default_factory=list)


def probe_backbone(backbone: nn.Module, input_size: int, name: str) -> FeatureInfo:
    """Run one dummy image through the backbone; prune the parts its features don't use."""
    was_training = backbone.training
    # Eval: a 1-image batch with a 1×1 map would make train-mode BatchNorm fail.
    backbone.eval()
    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    fixed = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    try:
        with torch.enable_grad():
            out = backbone.forward_features(x)
            fmt, prefix = _feature_format(backbone, out, name)
            fmap = to_nchw(out, fmt, prefix)
            fmap.float().sum().backward()
    except ImgclfError:
        raise
    except Exception as e:
        raise ImgclfError(
            f"{name} cannot take {input_size}×{input_size} images ({type(e).__name__}: {e}); "
            f"set data.image_size to the model's own size, or leave it empty for the default"
        ) from None
    unused = {n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None}
    backbone.zero_grad(set_to_none=True)
    removed = _prune(backbone, unused, x, out.detach()) if unused else []
    still_there = {n for n, _ in backbone.named_parameters()}
    backbone.train(was_training)
    return FeatureInfo(
        channels=int(fmap.shape[1]),
        fmap_size=(int(fmap.shape[2]), int(fmap.shape[3])),
        feature_format=fmt,
        prefix_tokens=prefix,
        removed_modules=removed,
        frozen_params=sorted((unused | fixed) & still_there),
    )


def _feature_format(backbone: nn.Module, out: object, name: str) -> tuple[str, int]:
    if not torch.is_tensor(out) or out.ndim not in (3, 4):
        raise ImgclfError(
            f"{name}'s forward_features does not return a feature map or token sequence "
            f"(got {type(out).__name__}); pick another architecture from `imgclf models`"
        )
    if out.ndim == 3:
        return "NLC", int(getattr(backbone, "num_prefix_tokens", 0))
    # timm marks channels-last models (Swin, some MLP mixers) with output_fmt.
    return ("NHWC" if str(getattr(backbone, "output_fmt", "NCHW")) == "NHWC" else "NCHW"), 0


def _prune(
    backbone: nn.Module, unused: set[str], x: torch.Tensor, before: torch.Tensor
) -> list[str]:
    """Replace modules whose parameters are all unused by nn.Identity, if outputs stay equal."""
    names = []
    for mod_name, module in backbone.named_modules():
        if not mod_name or any(mod_name.startswith(n + ".") for n in names):
            continue
        params = [f"{mod_name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in unused for p in params):
            names.append(mod_name)
    originals = remove_modules(backbone, names)
    with torch.no_grad():
        after = backbone.forward_features(x)
    if not torch.equal(before, after):
        # Something still relied on a removed module: put everything back, freeze instead.
        for mod_name, module in originals.items():
            _set_submodule(backbone, mod_name, module)
        return []
    return names


def remove_modules(backbone: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Replace each named submodule by nn.Identity; returns the originals."""
    originals = {}
    for mod_name in names:
        try:
            originals[mod_name] = backbone.get_submodule(mod_name)
        except AttributeError:
            raise ImgclfError(
                f"model spec removes {mod_name}, which this backbone does not have; "
                f"the spec was written by a different timm version"
            ) from None
        _set_submodule(backbone, mod_name, nn.Identity())
    return originals


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
