"""Stages × epochs around the loop: each stage's step (`train/step.py`: trainable policy,
optimizer, schedule), validation, best weights, early stopping, checkpoints, and resume from
any saved position."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from imgclf.config import StageConfig, TrainConfig
from imgclf.metric_names import lower_is_better
from imgclf.models import count_parameters, optimizer_state_numel, set_train_mode
from imgclf.runs.checkpoint import load_state_strict, rng_state, save_checkpoint, set_rng_state
from imgclf.runs.record import RunDir
from imgclf.train.average import WeightAverage
from imgclf.train.distributed import gather_objects
from imgclf.train.feature_cache import StageFeatures, head_probs, labels_of, train_head_epoch
from imgclf.train.loop import (
    EpochState,
    StopFlag,
    classification_metrics,
    predict_loader,
    worker_deaths,
)
from imgclf.train.loop import train_one_epoch as run_epoch
from imgclf.train.step import setup_stage


@dataclass
class FitContext:
    """Everything `fit` needs, built once by the run orchestration."""

    fabric: Any
    raw_model: nn.Module  # the module itself: state_dict, freezing
    train_loader: Any
    sampler: Any
    val_loader: Any
    loss_fn: nn.Module
    cfg: TrainConfig
    run: RunDir
    identity: dict[str, Any]  # config and data hashes, labels: saved in every checkpoint
    # The fabric-wrapped module for forward / backward, wrapped again by each stage: DDP
    # registers the parameters that require gradients when it wraps.
    model: nn.Module | None = None
    compiled: nn.Module | None = None  # torch.compile(raw_model) when train.compile is set
    mixer: Callable | None = None
    channels_last: bool = False
    stop: StopFlag = field(default_factory=StopFlag)
    progress: Callable[[str, EpochState, int], None] | None = None
    log: Callable[[str], None] = print
    # Called with each epoch's metrics row; raising Pruned ends the run (a sweep's pruner).
    on_epoch: Callable[[dict], None] | None = None
    features: StageFeatures | None = None  # set when train.features is "cache"
    # What would feed the device faster, for the data-wait warning (`watch_data_wait`).
    data_advice: str = "raise train.workers or set data.cache=auto"
    # perf_counter() at which this run would have started had it never stopped: the training
    # time so far (over every resume) is now minus this.
    started: float = 0.0
    # Why the backbone starts from random weights ("" when it does not): a head-only stage on
    # it is warned (`warn_head_only`).
    random_backbone: str = ""
    # time.monotonic() by which the run must end (`imgclf fit`'s budget): no epoch is started
    # that the last one's duration says would end past it; None: no limit.
    deadline: float | None = None
    # Early-stopping patience per stage, as train/recipe.py resolves `auto`; None: the config's
    # train.early_stopping.patience for every stage.
    patience: tuple[int | None, ...] | None = None
    # The current stage's weight average (its `ema`), validated and kept instead of the raw
    # weights; None when the stage keeps none.
    average: WeightAverage | None = None


class Pruned(Exception):
    """Raised by an `on_epoch` callback to stop a run early: recorded as status "pruned"."""


@dataclass
class FitState:
    """What survives a restart besides weights and optimizer: plain values only."""

    stage: int = 0
    epoch: int = 0  # epochs completed in the current stage
    global_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    patience: dict[str, Any] = field(default_factory=dict)  # per stage: best value, bad epochs
    epoch_state: dict[str, Any] | None = None  # set when saved mid-epoch
    params: dict[str, int] = field(default_factory=dict)  # counts in the latest stage
    status: str = "running"
    data_wait: dict[str, Any] = field(default_factory=dict)  # wait_s, total_s, share, warned
    warnings: list[str] = field(default_factory=list)  # said once each; kept in summary.json
    train_seconds: float = 0.0  # up to the last checkpoint, over every process that resumed


def fit(ctx: FitContext, state: FitState, resume: dict | None = None) -> FitState:
    """Run every remaining stage; returns the final state (status completed / interrupted)."""
    stages = ctx.cfg.stages
    while state.stage < len(stages):
        stage = stages[state.stage]
        if stage.epochs == 0:  # skipped by the recipe (train/recipe.py)
            state.stage += 1
            continue
        warn_head_only(ctx, state, stage)
        optimizer, schedule = _stage_setup(ctx, stage, resume)
        resume = None
        epoch_fn = _one_cached_epoch if _uses_cache(ctx, stage) else _one_epoch
        while state.epoch < stage.epochs:
            began = time.monotonic()
            if not epoch_fn(ctx, state, stage, optimizer, schedule):
                return state
            if _should_stop_early(ctx, state):
                ctx.log(f"early stopping: stage {state.stage} ends after epoch {state.epoch}")
                state.epoch = stage.epochs
            elif _out_of_time(ctx, time.monotonic() - began):
                note = (
                    f"time budget: the run ends after epoch {state.global_epoch} (stage "
                    f"{state.stage}, epoch {state.epoch} of {stage.epochs}); another would end "
                    "past it"
                )
                ctx.log(note)
                state.warnings.append(note)
                state.stage, state.epoch = len(stages) - 1, stages[-1].epochs
                _save(ctx, state, optimizer, schedule)
                break
            _save(ctx, state, optimizer, schedule)
        state.stage, state.epoch, state.patience = state.stage + 1, 0, {}
    state.status = "completed"
    return state


def _out_of_time(ctx: FitContext, epoch_seconds: float) -> bool:
    """True when another epoch as long as the last one would end past the run's deadline."""
    return ctx.deadline is not None and time.monotonic() + epoch_seconds > ctx.deadline


def _stage_setup(ctx: FitContext, stage: StageConfig, resume: dict | None):
    ctx.model = None  # the previous stage's DDP wrapper and its gradient hooks go first

    def steps_per_epoch() -> int:
        if _uses_cache(ctx, stage):
            _prepare_features(ctx)
            return ctx.features.steps_per_epoch(ctx.cfg.batch_size)
        return math.ceil(_epoch_batches(ctx, ctx.sampler.epoch) / ctx.cfg.accumulate)

    step = setup_stage(
        ctx.fabric, ctx.raw_model, stage, steps_per_epoch, compiled=ctx.compiled, log=ctx.log
    )
    ctx.model = step.model
    optimizer, schedule = step.optimizer, step.schedule
    ctx.average = _weight_average(ctx, stage, schedule)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        if resume.get("precision"):
            ctx.fabric.strategy.precision.load_state_dict(resume["precision"])
        if ctx.average is not None and resume.get("average"):
            ctx.average.load_state_dict(resume["average"])
    return optimizer, schedule


def _weight_average(ctx: FitContext, stage: StageConfig, schedule) -> WeightAverage | None:
    """The stage's weight average (`ema`, in epochs), started from its first weights. A head
    stage on cached features trains a linear head to convergence: it keeps none, and says so."""
    if stage.ema is None:
        return None
    if _uses_cache(ctx, stage):
        ctx.log(
            "a head-only stage on cached features keeps no weight average (ema): it trains a "
            "linear head, which converges without one"
        )
        return None
    return WeightAverage(ctx.raw_model, stage.ema * schedule.steps_per_epoch)


def _one_epoch(ctx: FitContext, state: FitState, stage: StageConfig, optimizer, schedule) -> bool:
    """Train and validate one epoch; False when a stop was requested mid-epoch."""
    cfg = ctx.cfg
    epoch_state = EpochState(**state.epoch_state) if state.epoch_state else EpochState()
    state.epoch_state = None
    total = _epoch_batches(ctx, state.global_epoch)
    # A resumed epoch starts where it stopped: the loader then yields only the batches left.
    ctx.sampler.set_epoch(state.global_epoch, start=epoch_state.batches * cfg.batch_size)
    set_train_mode(ctx.raw_model, True, stage.bn)

    def checkpoint(es: EpochState) -> None:
        state.epoch_state = asdict(es)
        _save(ctx, state, optimizer, schedule)
        state.epoch_state = None

    def step(es: EpochState) -> None:
        if ctx.progress:
            ctx.progress(
                f"stage {state.stage} epoch {state.epoch + 1}/{stage.epochs}",
                es,
                total,
            )

    with worker_deaths():
        epoch_state = run_epoch(
            ctx.fabric,
            ctx.model,
            ctx.train_loader,
            ctx.loss_fn,
            optimizer,
            schedule,
            state=epoch_state,
            accumulate=cfg.accumulate,
            grad_clip=cfg.grad_clip,
            mixer=ctx.mixer,
            channels_last=ctx.channels_last,
            stop=ctx.stop,
            on_step=step,
            checkpoint_every=cfg.checkpoint_every,
            on_checkpoint=checkpoint,
            max_bad=cfg.max_bad_images,
            sync_every=1 if ctx.fabric.device.type == "cpu" else 25,
            on_update=None if ctx.average is None else ctx.average.update,
        )
    if ctx.stop.requested and epoch_state.batches < total:
        state.epoch_state, state.status = asdict(epoch_state), "interrupted"
        _save(ctx, state, optimizer, schedule)
        return False
    with worker_deaths(), _averaged(ctx):
        val = predict_loader(ctx.fabric, ctx.model, ctx.val_loader, channels_last=ctx.channels_last)
    # Rank 0's validation decides for every rank (per-rank BatchNorm statistics may differ).
    val_metrics = ctx.fabric.broadcast(
        classification_metrics(val["probs"], val["targets"], "val"), src=0
    )
    metrics = {**epoch_state.metrics(), **val_metrics}
    watch_data_wait(ctx, state, epoch_state)
    extra = {
        "bad_images": len(epoch_state.bad),
        "seconds": round(epoch_state.seconds, 3),
        "images_per_s": round(epoch_state.seen / max(epoch_state.seconds, 1e-9), 1),
    }
    return _end_epoch(ctx, state, stage, optimizer, schedule, metrics, extra)


def _averaged(ctx: FitContext):
    """The weights validation sees: the stage's average when it keeps one."""
    return nullcontext() if ctx.average is None else ctx.average.swapped_in()


def _kept_weights(ctx: FitContext) -> dict:
    """The weights a run keeps as its best: those validation saw."""
    if ctx.average is None:
        return ctx.raw_model.state_dict()
    return ctx.average.state_dict_of(ctx.raw_model)


DATA_WAIT_WARN = 1 / 3
# Devices whose runs are warned when data is late. A CPU spends its time decoding by design;
# the tests add "cpu" to run the same code on one.
WATCHED_DEVICES = ("cuda",)


def watch_data_wait(ctx: FitContext, state: FitState, epoch_state: EpochState) -> None:
    """Add the epoch's time waiting for data to the run's; the first time more than a third of
    the training time so far went to waiting on a watched device, say so once (log, summary,
    report) with the setting that would help."""
    w = state.data_wait
    w["wait_s"] = round(w.get("wait_s", 0.0) + epoch_state.data_wait, 3)
    w["total_s"] = round(w.get("total_s", 0.0) + epoch_state.seconds, 3)
    share = w["wait_s"] / max(w["total_s"], 1e-9)
    w["share"] = round(share, 3)
    device = ctx.fabric.device.type
    if device not in WATCHED_DEVICES or share <= DATA_WAIT_WARN or w.get("warned"):
        return
    w["warned"] = True
    message = (
        f"the {device} waited for data {share:.0%} of the training time so far (epoch "
        f"{state.global_epoch + 1}): the input pipeline, not the model, sets the pace; "
        f"{ctx.data_advice}"
    )
    state.warnings.append(message)
    ctx.log(f"warning: {message}")


def warn_head_only(ctx: FitContext, state: FitState, stage: StageConfig) -> None:
    """A head-only stage on a randomly initialised backbone trains a classifier on random
    features (often to chance): say so once, at the stage's start (log, summary.json)."""
    if stage.trainable != "head" or not ctx.random_backbone:
        return
    message = (
        f"stage {state.stage} trains only the head (trainable: head) but the backbone of "
        f"{ctx.random_backbone} has random weights: its features are noise, so this stage "
        "learns little (often chance accuracy). Train every layer (trainable: all), or start "
        "from pretrained weights (model.pretrained: packaged | file:PATH, or model.init_from)"
    )
    if any("(trainable: head)" in w for w in state.warnings):  # said once per run
        return
    state.warnings.append(message)
    ctx.log(f"warning: {message}")


def _epoch_batches(ctx: FitContext, epoch: int) -> int:
    """Batches in a whole epoch (the loader's length from the epoch's start, whatever position
    a resumed epoch left the sampler at)."""
    ctx.sampler.set_epoch(epoch)
    return len(ctx.train_loader)


def _uses_cache(ctx: FitContext, stage: StageConfig) -> bool:
    return ctx.features is not None and stage.trainable == "head"


def _prepare_features(ctx: FitContext) -> None:
    ctx.features.prepare(
        ctx.raw_model,
        ctx.train_loader.dataset,
        ctx.val_loader.dataset,
        ctx.fabric.device,
        ctx.cfg.eval_batch_size or ctx.cfg.batch_size,
        ctx.channels_last,
        ctx.log,
    )


def _one_cached_epoch(ctx: FitContext, state: FitState, stage, optimizer, schedule) -> bool:
    """A head-only epoch on cached features: view e mod K for training, the eval view for val."""
    feats = ctx.features
    set_train_mode(ctx.raw_model, True, stage.bn)
    ctx.sampler.set_epoch(state.global_epoch)  # the image loader's order for this epoch
    t0 = time.perf_counter()
    view = feats.train_views[state.global_epoch % len(feats.train_views)]
    train = train_head_epoch(
        ctx.raw_model.head,
        view,
        ctx.loss_fn,
        optimizer,
        schedule,
        batch_size=ctx.cfg.batch_size,
        order=ctx.sampler.order()[:, 0],
        device=ctx.fabric.device,
        grad_clip=ctx.cfg.grad_clip,
    )
    seconds = time.perf_counter() - t0
    probs = head_probs(ctx.raw_model.head, feats.val, ctx.fabric.device)
    metrics = {
        "train_loss": train["train_loss"],
        "train_accuracy": train["train_accuracy"],
        **classification_metrics(probs, labels_of(feats.val), "val"),
    }
    extra = {
        "bad_images": int((~view.ok).sum().item()),
        "seconds": round(seconds, 3),
        "images_per_s": round(train["seen"] / max(seconds, 1e-9), 1),
    }
    return _end_epoch(ctx, state, stage, optimizer, schedule, metrics, extra)


def _end_epoch(
    ctx, state: FitState, stage, optimizer, schedule, metrics: dict, extra: dict
) -> bool:
    """Schedule, history, best weights, log and callbacks after an epoch's validation."""
    schedule.step_epoch(metrics)
    row = {
        "stage": state.stage,
        "stage_name": stage.name or "",
        "epoch": state.global_epoch + 1,
        "stage_epoch": state.epoch + 1,
        "lr": schedule.lrs()[-1],
        **metrics,
        **extra,
    }
    state.history.append(row)
    state.params = {
        **count_parameters(ctx.raw_model),
        "optimizer_state": optimizer_state_numel(optimizer),
    }
    ctx.run.write_metrics(state.history)
    _track_best(ctx, state, row)
    ctx.log(_epoch_line(row))
    state.epoch += 1
    state.global_epoch += 1
    if ctx.on_epoch:
        ctx.on_epoch(row)
    if ctx.stop.requested:
        state.status = "interrupted"
        _save(ctx, state, optimizer, schedule)
        return False
    return True


def metric_mode(name: str) -> str:
    """min or max: the metric's direction in the vocabulary (imgclf.metric_names)."""
    return "min" if lower_is_better(name) else "max"


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _tie_lower_loss(row: dict, name: str, best: dict) -> bool:
    """An epoch that ties the best on `name` (accuracy counts images: equal counts give equal
    values) with a lower val loss: the later weights, surer where they are right. Without it a
    tie keeps the first such epoch, often one early at a high lr (20 val images: epoch 1 of 11,
    test accuracy 0.729 against the last epoch's 0.805)."""
    loss, best_loss = row.get("val_loss"), best.get("val_loss")
    if name == "val_loss" or loss is None or best_loss is None:
        return False
    return row[name] == best.get("value") and loss < best_loss


def _track_best(ctx: FitContext, state: FitState, row: dict) -> None:
    name = ctx.cfg.best_metric
    if name not in row:
        raise ValueError(f"train.best_metric={name!r} is not measured; choose from {sorted(row)}")
    if _better(row[name], state.best.get("value"), metric_mode(name)) or _tie_lower_loss(
        row, name, state.best
    ):
        state.best = {
            "metric": name,
            "value": row[name],
            "epoch": row["epoch"],
            "stage": row["stage"],
            "val_loss": row.get("val_loss"),
        }
        ctx.run.write_weights(_kept_weights(ctx))
    es = ctx.cfg.early_stopping
    if _patience(ctx, state) is None:
        return
    if es.metric not in row:
        raise ValueError(
            f"train.early_stopping.metric={es.metric!r} is not measured: {sorted(row)}"
        )
    warming_up = row["stage_epoch"] <= ctx.cfg.stages[state.stage].warmup_epochs
    count_patience(state.patience, row[es.metric], metric_mode(es.metric), es.min_delta, warming_up)


def count_patience(
    p: dict, value: float, mode: str, min_delta: float = 0.0, warming_up: bool = False
) -> None:
    """Early stopping's count of epochs without improvement (`p`: best value, bad epochs).

    Epochs inside the stage's warm-up are not judged, as Keras' `start_from_epoch`: at their
    end the lr has barely reached its peak and the weights are still those the stage started
    from (a warm-started head), whose val loss the first epochs at the full lr often exceed
    before they beat it. Measured on held-in clip art (Lite2 fine-tuned from its probe, patience
    4): val loss 0.903 after the warm-up epoch, 1.03, 0.96, 0.91, 0.92 after the next four —
    stopped at epoch 5 of 13 (val accuracy 0.716), where a fit whose fourth epoch happened to
    reach 0.897 went on to 0.772."""
    if warming_up:
        return
    if _better(value, p.get("best"), mode, min_delta):
        p["best"], p["bad"] = value, 0
    else:
        p["bad"] = p.get("bad", 0) + 1


def _patience(ctx: FitContext, state: FitState) -> int | None:
    """The current stage's early-stopping patience."""
    if ctx.patience is not None:
        return ctx.patience[state.stage]
    patience = ctx.cfg.early_stopping.patience
    if patience == "auto":
        raise ValueError("early_stopping.patience: auto is resolved by train/recipe.py first")
    return patience


def _should_stop_early(ctx: FitContext, state: FitState) -> bool:
    patience = _patience(ctx, state)
    return patience is not None and state.patience.get("bad", 0) >= patience


def _save(ctx: FitContext, state: FitState, optimizer, schedule) -> None:
    rngs = gather_objects(ctx.fabric, rng_state())  # every rank's streams; rank 0 writes
    if not ctx.fabric.is_global_zero:
        return
    state.train_seconds = round(time.perf_counter() - ctx.started, 3)
    save_checkpoint(
        ctx.run.path,
        {
            "model": ctx.raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            # the fp16 grad scaler (empty for fp32 and bf16)
            "precision": ctx.fabric.strategy.precision.state_dict(),
            "fit": asdict(state),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "identity": ctx.identity,
            "average": None if ctx.average is None else ctx.average.state_dict(),
        },
    )


def restore(
    checkpoint: dict, raw_model: nn.Module, source, rank: int = 0, world: int = 1, log=print
) -> FitState:
    """Weights and RNG from a checkpoint; optimizer and schedule are restored by `fit`."""
    load_state_strict(raw_model, checkpoint["model"], source)
    rngs = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(rngs) != world:
        log(
            f"resuming on {world} process(es) a run saved by {len(rngs)}: the same batches, "
            "but random draws (dropout, MixUp) differ from an uninterrupted run"
        )
    set_rng_state(rngs[rank] if len(rngs) == world else checkpoint["rng"])
    return FitState(**checkpoint["fit"])


def _epoch_line(row: dict) -> str:
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    vals = "  ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
    return (
        f"epoch {row['epoch']:>3} (stage {row['stage']})  {vals}  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.0f} img/s"
    )
