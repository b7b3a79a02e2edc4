"""The from-scratch CNN family: conv blocks with a width schedule, built from `ScratchConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from imgclf.config import ScratchConfig
from imgclf.errors import ImgclfError

SCRATCH_INPUT_SIZE = 64  # default side for scratch models: small enough to train on a CPU


@dataclass(frozen=True)
class ScratchPreset:
    """A named scratch architecture: fields it fixes in `ScratchConfig`, and head defaults."""

    doc: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # Used only when the user's head.hidden is empty.
    default_hidden: tuple[int, ...] = ()


SCRATCH_PRESETS: dict[str, ScratchPreset] = {
    "scratch_cnn": ScratchPreset("the CNN described by model.scratch, as given"),
    "scratch_small": ScratchPreset(
        "3 blocks, 32→64→128 channels", {"blocks": 3, "width": 32, "max_width": 128}
    ),
    "scratch_vgg4": ScratchPreset(
        "4 VGG-style blocks of 2 convs, 16→128 channels, dense 256 head by default",
        {"blocks": 4, "width": 16, "max_width": 128, "convs_per_block": 2},
        default_hidden=(256,),
    ),
    "scratch_wide": ScratchPreset(
        "4 blocks, 64→128→256→256 channels", {"blocks": 4, "width": 64, "max_width": 256}
    ),
}


def preset_config(name: str, scratch: ScratchConfig) -> ScratchConfig:
    """The user's ScratchConfig with the preset's architecture fields applied."""
    preset = SCRATCH_PRESETS[name]
    # Presets fix the shape (depth, widths); kernel, norm, dropout and downsampling stay the
    # user's. Only the schedule defaults to doubling when the preset names widths.
    updates = dict(preset.overrides)
    if updates:
        updates.setdefault("schedule", "double")
    return ScratchConfig.model_validate({**scratch.model_dump(), **updates})


def block_widths(cfg: ScratchConfig) -> list[int]:
    """Output channels of each block under the config's width schedule."""
    if cfg.schedule == "double":
        return [min(cfg.width * 2**i, cfg.max_width) for i in range(cfg.blocks)]
    if cfg.schedule == "fixed":
        return [cfg.width] * cfg.blocks
    return [max(cfg.max_width // 2**i, cfg.width) for i in range(cfg.blocks)]


class ScratchCNN(nn.Module):
    """`blocks` × (convs → downsample → spatial dropout); returns the last feature map."""

    def __init__(self, cfg: ScratchConfig) -> None:
        super().__init__()
        widths = block_widths(cfg)
        blocks = []
        in_ch = 3
        for out_ch in widths:
            blocks.append(_block(in_ch, out_ch, cfg))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.num_features = widths[-1]
        _kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def check_input_size(cfg: ScratchConfig, input_size: int) -> None:
    """Fail early when the blocks would shrink the image below one pixel."""
    if input_size < 2**cfg.blocks:
        raise ImgclfError(
            f"a scratch CNN with {cfg.blocks} blocks halves the image {cfg.blocks} times and "
            f"needs data.image_size ≥ {2**cfg.blocks}, got {input_size}; raise data.image_size "
            f"or lower model.scratch.blocks"
        )


def _conv_bn_relu(in_ch: int, out_ch: int, cfg: ScratchConfig, stride: int = 1) -> list[nn.Module]:
    padding: int | str = "same" if stride == 1 else cfg.kernel_size // 2
    # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
    conv = nn.Conv2d(in_ch, out_ch, cfg.kernel_size, stride, padding, bias=not cfg.batch_norm)
    layers: list[nn.Module] = [conv]
    if cfg.batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _block(in_ch: int, out_ch: int, cfg: ScratchConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(cfg.convs_per_block):
        layers += _conv_bn_relu(in_ch if i == 0 else out_ch, out_ch, cfg)
    if cfg.downsample == "max":
        layers.append(nn.MaxPool2d(2))
    elif cfg.downsample == "avg":
        layers.append(nn.AvgPool2d(2))
    else:
        layers += _conv_bn_relu(out_ch, out_ch, cfg, stride=2)
    if cfg.dropout > 0:
        layers.append(nn.Dropout2d(cfg.dropout))
    return nn.Sequential(*layers)


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
