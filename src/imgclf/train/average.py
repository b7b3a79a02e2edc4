"""An exponential moving average of a model's weights over the last epochs of a stage.

Fine-tuning a few hundred steps on a small set, the weights after any one step carry that
step's batch noise; their running average over about `horizon` epochs does not, and validates
steadier (timm's ModelEma, Lightning's EMA callback, torch.optim.swa_utils' EMA). A stage with
`ema: H` keeps one: it is updated after every optimizer step, validated instead of the raw
weights, and it is what the run keeps as its best weights. Training itself goes on from the
raw weights; checkpoints hold both, so a resumed run averages on where it stopped.

Parameters only: BatchNorm's running statistics are taken from the model as they are (with
`bn: eval`, the default when fine-tuning, they do not change).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The average of `model`'s floating-point parameters, a horizon of `horizon_steps`.

    The decay is 1 − 1 / horizon_steps, lowered over the first steps as timm's is
    ((1 + t) / (10 + t)), so the first weights are not held for a whole horizon.
    """

    def __init__(self, model: nn.Module, horizon_steps: float) -> None:
        if horizon_steps <= 0:
            raise ValueError(f"horizon_steps must be positive, got {horizon_steps}")
        self.decay = 1.0 - 1.0 / max(horizon_steps, 1.0)
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        params = dict(model.named_parameters())
        self.values = [params[n].detach().clone() for n in self.names]
        self.steps = 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights in (after an optimizer step)."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.values, [p.detach() for p in self._params(model)], 1 - decay)

    def state_dict_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters (its buffers as they are)."""
        state = model.state_dict()
        for name, value in zip(self.names, self.values, strict=True):
            state[name] = value.detach().clone()
        return state

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in the model for the block (validation), the raw ones after."""
        params = self._params(model)
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.values)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def state_dict(self) -> dict:
        """Plain values for a checkpoint."""
        return {
            "decay": self.decay,
            "steps": self.steps,
            "values": dict(zip(self.names, (v.detach().cpu() for v in self.values), strict=True)),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["values"]) != self.names:
            raise ValueError("the checkpoint's weight average is of another model")
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        self.values = [
            state["values"][n].to(v.device, v.dtype)
            for n, v in zip(self.names, self.values, strict=True)
        ]
