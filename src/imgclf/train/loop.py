"""The visible training loop: one epoch of training, one pass of evaluation.

Plain functions that take values and return values; `fit.py` drives them over stages and
epochs. Metrics accumulate on the device and are read once per `sync_every` steps, so a GPU is
not stalled by a host synchronisation every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.evaluate.metrics import top_k_hits
from imgclf.metric_names import TOP5_CLASSES


class Diverged(ImgclfError):
    """The loss became NaN or infinite."""


@contextmanager
def worker_deaths() -> Iterator[None]:
    """A DataLoader worker killed mid-epoch (most often by the kernel's out-of-memory killer)
    surfaces as torch's RuntimeError; say what it means and what to do (docs/RELIABILITY.md F10)."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise ImgclfError(
            f"a data-loading worker process died ({str(e).splitlines()[0]}); this is usually "
            "the system running out of memory: lower train.workers or train.batch_size, then "
            "continue from the last checkpoint with imgclf train --resume RUN_FOLDER"
        ) from e


@dataclass
class StopFlag:
    """Set by the first Ctrl-C (or SIGTERM): the loop finishes its step, the caller saves and
    exits. Under several processes a request is only `pending` on the rank that saw it until
    the next metric all-reduce makes it `requested` on every rank at the same step."""

    requested: bool = False
    pending: bool = False
    shared: bool = False  # True under several processes: wait for the all-reduce

    def request(self) -> None:
        self.pending = True
        if not self.shared:
            self.requested = True


@dataclass
class EpochState:
    """Running sums of one training epoch; saved in mid-epoch checkpoints."""

    batches: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data_wait: float = 0.0  # of `seconds`, spent waiting for the loader (first batch excluded)

    def metrics(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {"train_loss": self.loss_sum / n, "train_accuracy": self.correct / n}


def train_one_epoch(
    fabric,
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    optimizer,
    schedule,
    *,
    state: EpochState,
    accumulate: int = 1,
    grad_clip: float | None = None,
    mixer: Callable | None = None,
    channels_last: bool = False,
    stop: StopFlag | None = None,
    on_step: Callable[[EpochState], None] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable | None = None,
    max_bad: int = 100,
    sync_every: int = 1,
    on_update: Callable[[], None] | None = None,
) -> EpochState:
    """Train over `loader` from `state` on; returns the updated state (stopped early if asked).

    `on_update` is called after every optimizer step (a weight average's update).

    Under several processes `state` holds the sums over every rank: each sync all-reduces them.
    """
    device = fabric.device
    # Running sums on the device: loss × n, correct, n, and a stop request (summed over ranks).
    acc = torch.zeros(4, device=device, dtype=torch.float64 if device.type == "cpu" else None)
    stop = stop or StopFlag()
    t0 = time.perf_counter() - state.seconds
    for batch in _timed(loader, state):
        state.bad.extend(b.reason for b in batch["bad"])
        if len(state.bad) > max_bad:
            raise ImgclfError(
                f"{len(state.bad)} images failed to load during training (more than "
                f"train.max_bad_images={max_bad}); first: {state.bad[0]}"
            )
        state.batches += 1
        if batch["x"] is None:
            continue
        x = batch["x"].to(device, non_blocking=True)
        y = batch["y"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        is_step = state.batches % accumulate == 0
        with fabric.no_backward_sync(model, enabled=not is_step):
            logits = model(x)
            loss = loss_fn(logits, target)
            fabric.backward(loss / accumulate)
        if is_step:
            if grad_clip:
                fabric.clip_gradients(model, optimizer, max_norm=grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step_batch()
            if on_update:
                on_update()
        acc[0] += loss.detach().float() * y.shape[0]
        acc[1] += (logits.detach().argmax(1) == y).sum()
        acc[2] += y.shape[0]
        if state.batches % sync_every == 0:
            _sync(fabric, state, acc, stop)
            state.seconds = time.perf_counter() - t0
            if on_step:
                on_step(state)
        if is_step and checkpoint_every and state.batches % checkpoint_every == 0 and on_checkpoint:
            _sync(fabric, state, acc, stop)
            state.seconds = time.perf_counter() - t0
            on_checkpoint(state)
        if stop.requested and is_step:
            break
    else:
        if state.batches % accumulate:  # the epoch's last, partial accumulation still counts
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step_batch()
            if on_update:
                on_update()
    _sync(fabric, state, acc, stop)
    state.seconds = time.perf_counter() - t0
    return state


def _timed(loader, state: EpochState) -> Iterator:
    """The loader's batches, adding the time spent waiting for each to `state.data_wait`.

    The wait for an epoch's first batch is left out: it also pays for starting the workers or
    building the cache, once. On a GPU the host runs ahead of the device and blocks at the
    next synchronisation, not here, unless the data is late: so this is the data's share.
    """
    batches, first = iter(loader), True
    while True:
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        if not first:
            state.data_wait += time.perf_counter() - t
        first = False
        yield batch


def _sync(fabric, state: EpochState, acc: torch.Tensor, stop: StopFlag) -> None:
    """Sum the device counters over ranks, move them into the state (one host sync), agree on
    a stop request and check for divergence. Every rank calls this at the same batches."""
    acc[3] = float(stop.pending)
    total = fabric.all_reduce(acc, reduce_op="sum") if fabric.world_size > 1 else acc
    loss_sum, correct, seen, stops = total.tolist()
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss became {loss_sum} after {state.batches} batches")
    state.loss_sum += loss_sum
    state.correct += correct
    state.seen += int(seen)
    if stops:
        stop.requested = True
    acc.zero_()


@torch.inference_mode()
def predict_loader(fabric, model: nn.Module, loader, *, channels_last: bool = False) -> dict:
    """Logits → probabilities for every good sample, in loader order, plus the bad ones."""
    model.eval()
    probs, targets, indices, bad = [], [], [], []
    for batch in loader:
        bad.extend(batch["bad"])
        if batch["x"] is None:
            continue
        x = batch["x"].to(fabric.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs.append(F.softmax(model(x).float(), dim=1).cpu())
        targets.append(batch["y"])
        indices.append(batch["index"])
    if not probs:
        return {
            "probs": torch.empty(0, 0),
            "targets": torch.empty(0, dtype=torch.long),
            "indices": torch.empty(0, dtype=torch.long),
            "bad": bad,
        }
    return {
        "probs": torch.cat(probs),
        "targets": torch.cat(targets),
        "indices": torch.cat(indices),
        "bad": bad,
    }


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict:
    """Loss (NLL of the probabilities), accuracy and top-5 accuracy where there are > 5 classes."""
    if len(targets) == 0:
        return {}
    logp = probs.clamp_min(1e-12).log()
    out = {
        f"{prefix}_loss": F.nll_loss(logp, targets).item(),
        f"{prefix}_accuracy": (probs.argmax(1) == targets).float().mean().item(),
    }
    if probs.shape[1] > TOP5_CLASSES:  # the same hits as evaluation's top_5_accuracy
        hits = top_k_hits(probs.detach().cpu().numpy(), targets.cpu().numpy(), 5)
        out[f"{prefix}_top5"] = torch.from_numpy(hits).float().mean().item()
    return out
