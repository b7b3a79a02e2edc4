"""One training run end to end: data → model → fit → best weights → predictions → summary.

`train(cfg)` starts a run; `train(cfg=None, resume=RUN)` continues one from its last checkpoint
after checking that the config and the data are the ones it started with.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from imgclf.config import RunConfig, TrainConfig, dump_yaml, resolve, validate
from imgclf.data.batches import build_loaders
from imgclf.data.borders import WHITE_SHARE, sample_borders
from imgclf.data.loaders import resolve_workers
from imgclf.data.manifest import Manifest
from imgclf.data.prepare import prepare
from imgclf.data.transforms import resolve_augment
from imgclf.errors import ImgclfError
from imgclf.files import remove_temps
from imgclf.metric_names import unmeasured
from imgclf.models import build_model, count_parameters, model_size_mb
from imgclf.runs.checkpoint import CHECKPOINT, load_checkpoint, load_state_strict, load_weights
from imgclf.runs.layout import (
    CONFIG_YAML,
    DATA_JSON,
    ENVIRONMENT_JSON,
    MODEL_WEIGHTS,
    SUMMARY_JSON,
)
from imgclf.runs.leaderboard import shown_config
from imgclf.runs.record import (
    RunDir,
    config_hash,
    environment,
    new_run_id,
)
from imgclf.train.distributed import World, check_config, end_process_group, world_from_env
from imgclf.train.feature_cache import FeatureCache, StageFeatures, default_cache_root
from imgclf.train.fit import FitContext, FitState, Pruned, fit, restore
from imgclf.train.loop import Diverged, StopFlag
from imgclf.train.losses import batch_mixer, build_loss, describe_imbalance, imbalance_record
from imgclf.train.recipe import resolve_recipe
from imgclf.train.step import (
    StepParts,
    assemble,
    cpu_has_bf16,
    maybe_compile,
    prepare_model,
    seed_everything,
)
from imgclf.workflows.finalize import finalize


def train(
    cfg: RunConfig | None = None,
    *,
    resume: Path | None = None,
    force: bool = False,
    progress: bool = True,
    log=print,
    on_epoch=None,
    deadline: float | None = None,
) -> Path:
    """Train one run (or resume one); returns the run folder.

    `deadline` (a `time.monotonic()` value, `imgclf fit`'s budget): no epoch starts that would
    end past it, and a step running at that moment is the last (the run is then saved as
    interrupted, its best weights kept). Under torchrun every rank calls this; see
    `train/distributed.py` for who writes what.
    """
    try:
        return _train(cfg, resume, force, progress, log, on_epoch, deadline)
    finally:
        end_process_group()


def _train(
    cfg: RunConfig | None, resume, force: bool, progress: bool, log, on_epoch, deadline
) -> Path:
    world = world_from_env()
    if not world.is_zero:
        progress, log = False, _silent
    checkpoint = None
    if resume is not None:
        run = RunDir.open(resume)
        saved = validate(yaml.safe_load((run.path / CONFIG_YAML).read_text()), str(run.path))
        if cfg is not None and resolve(cfg) != resolve(saved) and not force:
            raise ImgclfError(
                f"cannot resume {run.path} with a different config:\n"
                + _diff(resolve(saved), resolve(cfg))
                + "\n(--force to resume anyway)"
            )
        cfg = saved if cfg is None or not force else cfg
        checkpoint = load_checkpoint(run.path / CHECKPOINT)
    assert cfg is not None
    check_config(cfg, world)
    parts = assemble(cfg, world)
    fabric = parts.fabric
    manifest, manifest_dir = _prepare_data(cfg, fabric, progress)
    # After the data (rank 0 alone scans): every rank's generators start from the same point.
    seed_everything(cfg.seed + world.rank)
    labels = list(manifest.labels.names)
    model, pre = build_model(cfg.model, len(labels), cfg.data.image_size, cfg.data.crop_mode)
    warm = None
    if cfg.model.init_from:  # said once: a resumed run has it in its log and summary already
        warm = warm_start(model, cfg.model.init_from, log if checkpoint is None else _silent)
    random_backbone = _random_backbone(cfg, model, warm)
    # `auto` epochs and patience as numbers: config.yaml and the identity keep `auto`, the rest
    # of the run (fit, finalize, summary.json's config) sees `run_cfg`.
    recipe = resolve_recipe(cfg.train, len(manifest.split_entries("train")), bool(random_backbone))
    for line in recipe.lines:
        log(line)
    run_cfg = cfg.model_copy(update={"train": recipe.train})
    check_watched_metrics(cfg.train, len(labels), recipe.patience)
    identity = {
        "config": config_hash(resolve(cfg)),
        "data": manifest.data_hash(),
        "labels": labels,
        "spec": model.spec,
    }
    if checkpoint is None:
        run = None
        if world.is_zero:
            run = RunDir.create(cfg.runs_dir, new_run_id(cfg.model.name, cfg.name))
            _write_run_header(run, cfg, manifest, manifest_dir, pre, model, identity, world)
            _record_recipe(run, run_cfg, pre)
        path = fabric.broadcast(str(run.path) if run else None, src=0)
        run = run or RunDir(Path(path), writer=False)
        state = FitState(warnings=[warm["warning"]] if warm and warm["warning"] else [])
        fill = _fill_warning(cfg.train.augment, manifest)
        if fill:
            log(f"warning: {fill}")
            state.warnings.append(fill)
        if cfg.train.precision == "auto" and parts.device.type == "cpu" and cpu_has_bf16():
            log(
                "note: this CPU computes bf16 natively: train.precision=bf16-mixed trains "
                "about 1.2x faster here (imgclf fit uses it)"
            )
    else:
        _check_identity(run.path, checkpoint["identity"], identity, force)
        run.writer = world.is_zero
        state = restore(checkpoint, model, run.path / CHECKPOINT, world.rank, world.size, log)
        log(f"resuming {run.id} at stage {state.stage}, epoch {state.epoch}")
    started = _Started(
        cfg=run_cfg,
        run=run,
        manifest=manifest,
        model=model,
        pre=pre,
        identity=identity,
        state=state,
        checkpoint=checkpoint,
        random_backbone=random_backbone,
        patience=recipe.patience,
    )
    return _fit_and_finish(
        started, parts, progress=progress, log=log, on_epoch=on_epoch, deadline=deadline
    )


@dataclass
class _Started:
    """What `train` settled before fitting: the run folder, its data and model, and where
    fitting starts (a fresh state, or the checkpoint it resumes from)."""

    cfg: RunConfig
    run: RunDir
    manifest: Manifest
    model: torch.nn.Module
    pre: Any  # the model's preprocessing
    identity: dict[str, Any]  # config and data hashes, labels, spec: saved in every checkpoint
    state: FitState
    checkpoint: dict | None
    random_backbone: str  # why the backbone starts from random weights ("" when it does not)
    patience: tuple[int | None, ...]  # early stopping per stage (train/recipe.py)


def _silent(*_args, **_kwargs) -> None:
    return None


def _fill_warning(augment, manifest: Manifest) -> str | None:
    """Rotations, shears or shifts that fill the corners they uncover with black or the mean
    colour, on training images half or more of whose sampled borders are white (drawings,
    icons, transparent images): a mark the model sees only in training. Held-in clip art: test
    0.7922 with black, 0.7996 with white (docs/PERFORMANCE.md)."""
    r = resolve_augment(augment)
    if not (r["rotation"] or r["shear"] or r["translate"]) or r["fill"] == "white":
        return None
    borders = sample_borders(manifest)
    if borders.light < WHITE_SHARE:
        return None
    return (
        f"{borders.light:.0%} of a sample of the training images have a white border, but "
        f"rotations and shifts fill the corners they uncover with {r['fill']} "
        "(train.augment.fill), a mark the model sees only in training: set "
        "train.augment.fill=white"
    )


def check_watched_metrics(
    t: TrainConfig, num_classes: int, patience: tuple[int | None, ...] | None = None
) -> None:
    """A metric the run watches but will not measure (val_top5 with 5 classes or fewer) fails
    before the first epoch, not after it. `patience`: per stage, as the recipe resolved it."""
    watched = {"train.best_metric": t.best_metric}
    stops = t.early_stopping.patience is not None if patience is None else any(patience)
    if stops:
        watched["train.early_stopping.metric"] = t.early_stopping.metric
    for i, stage in enumerate(t.stages):
        if stage.schedule == "plateau":
            watched[f"train.stages.{i}.plateau.metric"] = stage.plateau.metric
    for key, name in watched.items():
        if why := unmeasured(name, num_classes):
            raise ImgclfError(f"{key}={name}: {why}; watch val_accuracy or val_loss instead")


def _prepare_data(cfg: RunConfig, fabric, progress: bool):
    """Rank 0 scans and splits; the others wait for it, then read its manifest."""
    if fabric.world_size == 1:
        return prepare(cfg.data, progress=progress)
    result = prepare(cfg.data, progress=progress) if fabric.is_global_zero else None
    fabric.barrier("manifest")
    return result or prepare(cfg.data, read_only=True)


def _fit_and_finish(
    started: _Started, parts: StepParts, *, progress: bool, log, on_epoch, deadline=None
):
    cfg, run, manifest, pre = started.cfg, started.run, started.manifest, started.pre
    fabric, channels_last = parts.fabric, parts.channels_last
    model = prepare_model(cfg, parts, started.model)
    with fabric.rank_zero_first():  # rank 0 builds the image cache, the others reuse it
        train_loader, sampler, val_loader = build_loaders(
            cfg,
            manifest,
            pre,
            rank=fabric.global_rank,
            world=fabric.world_size,
            device=fabric.device,
            channels_last=channels_last,
            log=log,
            progress=progress,
        )
    counts = np.bincount(train_loader.dataset.targets, minlength=len(manifest.labels)).tolist()
    if started.checkpoint is None:  # said once, at the start; a resumed run has it in data.json
        _record_imbalance(run, cfg, counts, list(manifest.labels.names), log)
    ctx = FitContext(
        fabric=fabric,
        raw_model=model,
        train_loader=train_loader,
        sampler=sampler,
        val_loader=val_loader,
        loss_fn=build_loss(cfg.train, counts).to(fabric.device),
        cfg=cfg.train,
        run=run,
        identity=started.identity,
        mixer=batch_mixer(cfg.train, len(manifest.labels)),
        channels_last=channels_last,
        stop=StopFlag(shared=fabric.world_size > 1),
        log=log,
        on_epoch=on_epoch,
        features=_stage_features(cfg, pre, started.identity["data"]),
        compiled=maybe_compile(cfg, model),
        data_advice=_data_advice(cfg, train_loader, fabric.device.type, fabric.world_size),
        random_backbone=started.random_backbone,
        deadline=deadline,
        patience=started.patience,
    )
    with run.lock():
        if started.checkpoint is not None and run.writer:
            stale = remove_temps(run.path)  # what a killed writer left; the lock makes it ours
            if stale:
                log(f"removed {len(stale)} temporary file(s) left by the interrupted process")
        return _fit_guarded(ctx, started, progress=progress, log=log)


def _data_advice(cfg: RunConfig, train_loader, device: str, world: int) -> str:
    """The setting that would feed the device faster, for the data-wait warning."""
    if cfg.data.cache == "none":
        w = resolve_workers(cfg.train.workers, len(train_loader.dataset), device, world)
        return (
            f"set data.cache=auto (each image decoded once, whole batches augmented on the "
            f"{device}) or raise train.workers (now {w['workers']}; this process may use "
            f"{w['cores']} cores)"
        )
    if getattr(train_loader, "placement", None) == "host":
        return (
            "the cached pixels are copied from host memory every batch: "
            "data.cache_device=device keeps them on the GPU when it has room"
        )
    return "the batches are already cached on the device: try a larger train.batch_size"


def _fit_guarded(ctx: FitContext, started: _Started, *, progress: bool, log):
    """`fit` with every way out recorded: completed, interrupted, pruned, diverged, failed."""
    cfg, run, manifest, state = started.cfg, started.run, started.manifest, started.state
    # Training time adds up over resumes (what ran after the last checkpoint is done again).
    ctx.started = t0 = time.perf_counter() - state.train_seconds

    def finish(error: str | None = None) -> None:
        if not ctx.fabric.is_global_zero:  # predictions, plots, summary, MLflow: rank 0's job
            return
        if error is None:
            finalize(run, cfg, manifest, state, time.perf_counter() - t0, log, progress=progress)
            return
        try:
            finalize(run, cfg, manifest, state, time.perf_counter() - t0, log, error=error)
        except Exception as e:  # e.g. the disk that failed the run is still full
            log(f"could not record the failure in {run.path}: {e}")

    try:
        with _interruptible(ctx.stop, log), _progress(ctx, progress), _hard_stop(ctx, log):
            state = fit(ctx, state, resume=started.checkpoint)
    except KeyboardInterrupt:  # a second Ctrl-C: record it, write nothing else, stop
        summary = run.read_json(SUMMARY_JSON)
        run.write_json(SUMMARY_JSON, {**summary, "status": "interrupted", "error": "second Ctrl-C"})
        raise
    except Pruned as e:
        state.status = "pruned"
        finish(str(e) or None)
        raise
    except Diverged as e:
        state.status = "diverged"
        finish(str(e))
        raise
    except Exception as e:
        state.status = "failed"
        finish(str(e))
        raise
    finish()
    return run.path


def _stage_features(cfg: RunConfig, pre, data_hash: str) -> StageFeatures | None:
    if cfg.train.features != "cache":
        return None
    cache = FeatureCache(cfg.train.feature_cache or default_cache_root())
    describe = {
        "preprocessing": pre.to_dict(),
        "augment": resolve_augment(cfg.train.augment),
        "data": data_hash,
        "max_pixels": cfg.data.scan.max_pixels,
    }
    return StageFeatures(cache, cfg.train.feature_views, cfg.seed, describe)


def _write_run_header(
    run: RunDir, cfg, manifest: Manifest, manifest_dir, pre, model, identity, world: World
):
    run.write_config(dump_yaml(cfg))  # as written: `auto` stays `auto`
    device = "cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu"
    images = len(manifest.split_entries("train"))
    workers = resolve_workers(cfg.train.workers, images, device, world.size)
    if cfg.data.cache != "none":
        workers = {**workers, "workers": 0, "note": "data.cache is on: no DataLoader workers"}
    run.write_json(
        ENVIRONMENT_JSON,
        {
            **environment(cfg.seed, device),
            "processes": world.size,
            "nodes": world.nodes,
            "loader_workers": workers,
        },
    )
    split = manifest.report.get("split", {})
    run.write_json(
        DATA_JSON,
        {
            "manifest": str(manifest_dir),
            "root": str(manifest.root),
            "data_hash": identity["data"],
            "labels": identity["labels"],
            "split": split.get("per_class"),
            "split_settings": {k: split.get(k) for k in ("fractions", "seed", "source")},
            "augment": resolve_augment(cfg.train.augment),
        },
    )
    run.write_model_json(model.spec, pre.to_dict(), identity["labels"])
    run.write_json(
        SUMMARY_JSON,
        {
            "run_id": run.id,
            "status": "running",
            "tags": cfg.tags,
            "params": count_parameters(model),
            "model_size_mb": model_size_mb(model),
            "config": shown_config(resolve(cfg), pre.input_size),
        },
    )


def _record_recipe(run: RunDir, run_cfg: RunConfig, pre) -> None:
    """summary.json's `config` with the numbers `auto` became (config.yaml keeps `auto`)."""
    shown = shown_config(resolve(run_cfg), pre.input_size)
    run.write_json(SUMMARY_JSON, {**run.read_json(SUMMARY_JSON), "config": shown})


def warm_start(model: torch.nn.Module, source: Path, log) -> dict[str, Any]:
    """Start from an earlier run's best weights: every tensor whose name and shape match (the
    head too when the classes match). Says how many were loaded; none at all is a warning."""
    path = Path(source) / MODEL_WEIGHTS if Path(source).is_dir() else Path(source)
    state = load_weights(path)
    full = model.state_dict()
    # Counted over weights (floating tensors): BatchNorm's step counters fit any model.
    own = {k: v for k, v in full.items() if v.is_floating_point()}
    fits = [k for k in own if k in state and state[k].shape == own[k].shape]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    absent = [k for k in own if k not in state]
    loaded = {"loaded": len(fits), "total": len(own), "backbone": _backbone_keys(fits)}
    if fits:
        same = {k: state[k] for k in full if k in state and state[k].shape == full[k].shape}
        load_state_strict(model, {**full, **same}, path)
    if not loaded["backbone"]:
        pretrained = model.spec.get("pretrained")
        start = "random weights" if pretrained == "none" else f"its {pretrained} weights"
        what = "nothing" if not fits else f"only {len(fits)} head tensor(s)"
        warning = (
            f"warm start from {source} loaded {what} of this model's {len(own)} weight tensors: "
            f"none of the backbone's fits the {len(state)} tensors there by name and shape (a "
            f"different architecture?); the backbone starts from {start}"
        )
        log(f"warning: {warning}")
        return {**loaded, "warning": warning}
    kept = []
    if reshaped:
        kept.append(f"{len(reshaped)} differ in shape ({_names(reshaped)})")
    if absent:
        kept.append(f"{len(absent)} are not in {source} ({_names(absent)})")
    log(
        f"warm start from {source}: loaded {len(fits)} of this model's {len(own)} weight tensors"
        + (f"; kept fresh: {'; '.join(kept)}" if kept else "")
    )
    return {**loaded, "warning": None}


def _names(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (" …" if len(keys) > n else "")


def _backbone_keys(keys: list[str]) -> int:
    return sum(k.startswith("backbone.") for k in keys)


def _random_backbone(cfg: RunConfig, model, warm: dict | None) -> str:
    """Why the backbone starts from random weights ("" when it does not): for the warning of
    a head-only stage."""
    if model.spec.get("pretrained") != "none" or (warm and warm["backbone"]):
        return ""
    why = "a scratch model" if model.spec.get("kind") == "scratch" else "model.pretrained: none"
    if warm:
        why += f", and the warm start from {cfg.model.init_from} loaded no backbone weights"
    return f"{cfg.model.name} ({why})"


def _record_imbalance(run: RunDir, cfg: RunConfig, counts: list[int], labels, log) -> None:
    """Log the class weights train.imbalance uses, once, and keep them in data.json."""
    record = imbalance_record(cfg.train, counts, labels)
    if record is None:
        return
    log(describe_imbalance(record))
    if run.writer:
        run.write_json(DATA_JSON, {**run.read_json(DATA_JSON), "imbalance": record})


def _check_identity(run_path: Path, saved: dict, now: dict, force: bool) -> None:
    diffs = []
    if saved["data"] != now["data"]:
        diffs.append(f"data version: {saved['data'][:12]} → {now['data'][:12]} (images changed)")
    if saved["labels"] != now["labels"]:
        diffs.append(f"classes: {saved['labels']} → {now['labels']}")
    if saved["spec"] != now["spec"]:
        diffs.append("model architecture differs")
    if diffs and not force:
        raise ImgclfError(
            f"cannot resume {run_path}: " + "; ".join(diffs) + " (--force to resume anyway)"
        )


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [
            _diff(old.get(k), new.get(k), f"{prefix}{k}.") for k in dict.fromkeys([*old, *new])
        ]
        return "\n".join(p for p in parts if p)
    return f"  {prefix.rstrip('.')}: {old!r} → {new!r}" if old != new else ""


@contextmanager
def _interruptible(stop: StopFlag, log):
    """First Ctrl-C: finish the step, save, exit with a status. Second: stop at once."""
    previous = signal.getsignal(signal.SIGINT)

    previous_term = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if stop.pending:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.request()
        log("interrupt: finishing this step and saving (Ctrl-C again to stop at once)")

    try:
        signal.signal(signal.SIGINT, handler)
        # SIGTERM (a scheduler's preemption notice, torchrun passing on a stop) saves the same
        # way; a second one stops at once like a second Ctrl-C.
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


@contextmanager
def _hard_stop(ctx: FitContext, log):
    """At the deadline, the step running is the last: the run saves and ends as interrupted
    (the epoch-level check in `fit` normally ends it before, at an epoch boundary)."""
    if ctx.deadline is None:
        yield
        return

    def expire() -> None:
        log("time budget: stopping after this step (the best weights so far are kept)")
        ctx.stop.request()

    timer = threading.Timer(max(0.0, ctx.deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextmanager
def _progress(ctx: FitContext, show: bool):
    if not show:
        yield
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    ]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("training", total=1, stats="")

        def update(desc, es, total):
            rate = es.seen / max(es.seconds, 1e-9)
            stats = (
                f"loss {es.loss_sum / max(es.seen, 1):.4f} acc {es.correct / max(es.seen, 1):.3f} "
                f"{rate:.0f} img/s"
            )
            bar.update(task, description=desc, completed=es.batches, total=total, stats=stats)

        ctx.progress = update
        ctx.log = bar.console.print
        yield
