"""Model zoo: scratch CNNs and timm backbones, heads, pretrained weights, freeze policies."""

from imgclf.models.freeze import apply_trainable, param_groups, set_train_mode, trainable_blocks
from imgclf.models.heads import POOL_KINDS, Head
from imgclf.models.model import ImgclfModel, Preprocessing, default_channels_last
from imgclf.models.pretrained import (
    PACKAGED_ALIASES,
    packaged_preprocessing,
    packaged_state_dict,
    packaged_weights_path,
    read_state_dict,
)
from imgclf.models.registry import build_model, list_models, model_from_spec, resolve_name
from imgclf.models.scratch import SCRATCH_PRESETS, ScratchCNN
from imgclf.models.summary import count_parameters, model_size_mb, optimizer_state_numel

__all__ = [
    "PACKAGED_ALIASES",
    "POOL_KINDS",
    "SCRATCH_PRESETS",
    "Head",
    "ImgclfModel",
    "Preprocessing",
    "ScratchCNN",
    "apply_trainable",
    "build_model",
    "count_parameters",
    "default_channels_last",
    "list_models",
    "model_from_spec",
    "model_size_mb",
    "optimizer_state_numel",
    "packaged_preprocessing",
    "packaged_state_dict",
    "packaged_weights_path",
    "param_groups",
    "read_state_dict",
    "resolve_name",
    "set_train_mode",
    "trainable_blocks",
]
