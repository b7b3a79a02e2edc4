"""Parameter and memory accounting, as reported next to accuracy in run summaries."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts (shared parameters counted once)."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements in every tensor of the optimizer's state (momentum, Adam moments, steps)."""
    return sum(
        value.numel()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def model_size_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers, in MiB (2**20 bytes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20
