"""Training a two-stage (coarse → fine) classifier (the model itself is
`imgclf.predict.two_stage.TwoStage`): stage 1 picks a group of easily confused classes, one
stage-2 model per multi-class group picks the class inside it.

Final probabilities are over the ORIGINAL label map: P(class) = P(group) × P(class | group); a
class alone in its group gets P(group). Every stage-2 model runs on every image, so the output
is a full distribution (it sums to 1) rather than a hard routing decision.

Groups come from an evaluated run's `evaluations/<name>/confusion_groups.json` (`--groups auto`;
"val" is preferred so that the test split stays unseen by every choice) or from a user file of
the same format: a JSON list of lists of class names, every class in exactly one group.

Every stage is an ordinary training run (`imgclf.workflows.training.train`) on a derived
manifest that keeps the original split column, so all stages and the single-stage model see the same
train / val / test images. The composite folder `runs/<name>/` holds:

  (files: docs/ARCHITECTURE.md, "Composite and export folders")
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from imgclf.config import RunConfig, resolve, validate
from imgclf.data.loaders import resolve_workers
from imgclf.data.manifest import Entry, LabelMap, Manifest, write_manifest
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json, atomic_write_text
from imgclf.predict.two_stage import FORMAT, TwoStage, group_name
from imgclf.runs.layout import (
    COMPARISON_JSON,
    CONFIG_YAML,
    DATA_JSON,
    MODEL_JSON,
    SUMMARY_JSON,
    TWO_STAGE,
    TWO_STAGE_JSON,
    RunFileError,
    RunFolder,
)
from imgclf.workflows.ensemble import create_folder, split_metrics, summed_params

GROUPS_JSON = "confusion_groups.json"


def read_groups(path: str | Path, labels: Sequence[str]) -> list[list[str]]:
    """A groups file → groups in file order, classes in label-map order; errors name classes."""
    path = Path(path)
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImgclfError(f"groups file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ImgclfError(f"cannot read the groups file {path}: {e}") from None
    if not (
        isinstance(groups, list)
        and all(isinstance(g, list) and g and all(isinstance(c, str) for c in g) for g in groups)
    ):
        raise ImgclfError(
            f"{path} must hold a JSON list of non-empty lists of class names, "
            'e.g. [["cat", "lynx"], ["dog"]]'
        )
    counts = Counter(c for g in groups for c in g)
    problems = []
    if unknown := [c for c in counts if c not in labels]:
        problems.append(f"unknown classes {unknown}")
    if missing := [c for c in labels if c not in counts]:
        problems.append(f"missing classes {missing}")
    if duplicate := [c for c, n in counts.items() if n > 1]:
        problems.append(f"classes in more than one group (or twice) {duplicate}")
    if problems:
        raise ImgclfError(
            f"{path}: every class of the label map must be in exactly one group; "
            + "; ".join(problems)
        )
    order = {c: i for i, c in enumerate(labels)}
    return [sorted(g, key=order.__getitem__) for g in groups]


def find_confusion_groups(run: str | Path, evaluation: str | None = None) -> Path:
    """`evaluations/<name>/confusion_groups.json` of an evaluated run (val preferred)."""
    evals = Path(run) / "evaluations"
    found = sorted(p.parent.name for p in evals.glob(f"*/{GROUPS_JSON}")) if evals.is_dir() else []
    if evaluation is not None:
        if evaluation not in found:
            raise ImgclfError(
                f"{evals / evaluation / GROUPS_JSON} does not exist (evaluations with groups: "
                f"{found or 'none'}); run `imgclf evaluate {run} --split val --name {evaluation}`"
            )
        return evals / evaluation / GROUPS_JSON
    for preferred in ("val", "test"):
        if preferred in found:
            return evals / preferred / GROUPS_JSON
    if len(found) == 1:
        return evals / found[0] / GROUPS_JSON
    if found:
        raise ImgclfError(f"{run} has several evaluations {found}; choose one with --evaluation")
    raise ImgclfError(
        f"{run} has no evaluation with confusion groups; run `imgclf evaluate {run} --split val` "
        "first, or give the groups yourself with --groups FILE"
    )


def groups_from_test_split(groups: str | Path) -> str | None:
    """A warning when the groups file is an evaluation's confusion_groups.json and that
    evaluation scored the test split: the test split then chose the model's design, and the
    two-stage model's test accuracy is no longer an unseen estimate."""
    path = Path(groups)
    if path.name != GROUPS_JSON:
        return None
    try:
        record = json.loads((path.parent / "metrics.json").read_text(encoding="utf-8"))
        source = record["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(source, dict) or (source.get("kind"), source.get("split")) != (
        "split",
        "test",
    ):
        return None
    run = path.parent.parent.parent
    return (
        f"the groups come from {path}, the evaluation of the TEST split: the test images chose "
        "the model's design, so the two-stage test accuracy is optimistic (test leakage). "
        f"Derive them from the val split instead: `imgclf evaluate {run} --split val`, then "
        f"--groups auto --from-run {run} (val is preferred)"
    )


def derive_manifests(
    manifest: Manifest, groups: Sequence[Sequence[str]], out: Path
) -> tuple[Path, list[Path | None]]:
    """Write manifests/coarse (labels → group names) and manifests/group_<i> (multi-class groups
    only), keeping every entry's split; returns their folders."""
    group_of = {c: group_name(i) for i, g in enumerate(groups) for c in g}
    coarse = [dataclasses.replace(e, label=group_of[e.label]) for e in manifest.entries if e.label]
    names = [group_name(i) for i in range(len(groups))]
    coarse_dir = _write_derived(manifest, coarse, names, out / "coarse")
    dirs: list[Path | None] = []
    for i, g in enumerate(groups):
        if len(g) == 1:
            dirs.append(None)
            continue
        members = set(g)
        entries = [e for e in manifest.entries if e.label in members]
        dirs.append(_write_derived(manifest, entries, list(g), out / group_name(i)))
    return coarse_dir, dirs


def _write_derived(source: Manifest, entries: list[Entry], labels: list[str], out: Path) -> Path:
    per_class: dict[str, dict[str, int]] = {n: {} for n in labels}
    for e in entries:
        if e.ok:
            per_class[e.label][e.split] = per_class[e.label].get(e.split, 0) + 1
    given = source.report.get("split", {})
    split = {k: given[k] for k in ("fractions", "seed", "source") if k in given}
    split.update(per_class=per_class, notes=[f"derived by imgclf two-stage from {source.root}"])
    derived = Manifest(
        root=source.root,
        entries=entries,
        labels=LabelMap(tuple(labels)),
        source=source.source,
        settings=source.settings,
        report={"split": split},
    )
    return write_manifest(derived, out)


def _stage_config(cfg: RunConfig, manifest_dir: Path, runs_dir: Path, name: str) -> RunConfig:
    raw = resolve(cfg)
    raw["data"].update(root=None, manifest=str(manifest_dir))
    raw.update(runs_dir=str(runs_dir), name=name)
    return validate(raw, source=f"two-stage config for {name}")


def train_two_stage(
    cfg: RunConfig,
    groups: str | Path,
    *,
    from_run: str | Path | None = None,
    evaluation: str | None = None,
    name: str | None = None,
    progress: bool = True,
    log=print,
) -> Path:
    """Train stage 1 and every stage-2 model; write and score the composite folder."""
    from imgclf.data.prepare import prepare
    from imgclf.runs.record import new_run_id

    if str(groups) == "auto":  # checked before any scan: fail fast
        if from_run is None:
            raise ImgclfError("--groups auto reads an evaluated run's groups: add --from-run RUN")
        groups = find_confusion_groups(from_run, evaluation)
    warnings = [w] if (w := groups_from_test_split(groups)) else []
    for w in warnings:
        log(f"warning: {w}")
    manifest, manifest_path = prepare(cfg.data, progress=progress)
    labels = list(manifest.labels.names)
    grouped = read_groups(groups, labels)
    if len(grouped) < 2 or all(len(g) == 1 for g in grouped):
        raise ImgclfError(
            f"{groups} gives {len(grouped)} group(s) of sizes {[len(g) for g in grouped]}: a "
            "two-stage model needs at least two groups and one with several classes"
        )
    shown = "; ".join(f"{group_name(i)}={g}" for i, g in enumerate(grouped))
    log(f"groups from {groups}: {shown}")
    folder = create_folder(Path(cfg.runs_dir) / (name or new_run_id("two-stage", cfg.name)))
    label = name or folder.name
    atomic_write_text(
        folder / CONFIG_YAML,
        yaml.safe_dump(
            {"kind": TWO_STAGE, "groups": grouped, "base_config": resolve(cfg)},
            sort_keys=False,
            allow_unicode=True,
        ),
    )
    # "config": the leaderboard's config values: none, the stages are the training runs.
    summary = {"run_id": folder.name, "kind": TWO_STAGE, "status": "running", "config": {}}
    summary["warnings"] = warnings
    atomic_write_json(folder / SUMMARY_JSON, summary)
    try:
        stages = _train_stages(cfg, manifest, grouped, folder, label, progress, log)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        atomic_write_json(folder / SUMMARY_JSON, {**summary, "status": status, "error": str(e)})
        raise
    return _finish(folder, manifest, manifest_path, grouped, stages, from_run, cfg, log, warnings)


def _train_stages(cfg, manifest, grouped, folder: Path, label: str, progress, log) -> dict:
    from imgclf.workflows.training import train

    # Absolute: the stage runs' data.json must find their manifest from any working directory.
    coarse, group_dirs = derive_manifests(manifest, grouped, folder.resolve() / "manifests")
    jobs = [("stage1", coarse)] + [(group_name(i), d) for i, d in enumerate(group_dirs) if d]
    runs = {}
    for job, manifest_dir in jobs:
        log(f"two-stage: training {job}")
        stage_cfg = _stage_config(cfg, manifest_dir, folder / "stages", f"{label}-{job}")
        run = train(stage_cfg, progress=progress, log=log)
        status = RunFolder(run).summary().get("status")
        if status != "completed":
            raise ImgclfError(f"two-stage {job} run {run} ended {status}; nothing was combined")
        runs[job] = run
    return runs


def _finish(folder, manifest, manifest_path, grouped, stages, from_run, cfg, log, warnings) -> Path:
    rel = {k: Path(v).resolve().relative_to(folder.resolve()).as_posix() for k, v in stages.items()}
    names = [group_name(i) for i in range(len(grouped))]
    labels = list(manifest.labels.names)
    definition = {
        "format": FORMAT,
        "labels": labels,
        "groups": grouped,
        "group_names": names,
        "stage1": rel.pop("stage1"),
        "stage2": rel,
    }
    atomic_write_json(folder / TWO_STAGE_JSON, definition)
    data = {
        "manifest": str(manifest_path),
        "root": str(manifest.root),
        "data_hash": manifest.data_hash(),
        "labels": labels,
        "split": manifest.report.get("split", {}).get("per_class"),
    }
    atomic_write_json(folder / DATA_JSON, data)
    model = TwoStage.load(folder)
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = resolve_workers(cfg.train.workers, len(manifest.ok_entries), device)["workers"]
    metrics = split_metrics(model, data, folder, batch, workers)
    stage_summaries = [_read(RunFolder(p).summary) for p in stages.values()]
    summary = {
        "run_id": folder.name,
        "kind": TWO_STAGE,
        "status": "completed",
        "error": None,
        "model": f"two_stage[{cfg.model.name}]",
        "groups": grouped,
        "val": metrics.get("val", {}),
        "test": metrics.get("test", {}),
        "params": summed_params(list(stages.values())),
        "epochs": sum(s.get("epochs") or 0 for s in stage_summaries),
        "train_seconds": round(sum(s.get("train_seconds") or 0 for s in stage_summaries), 2),
        "warnings": warnings,
        "config": {},
    }
    atomic_write_json(folder / SUMMARY_JSON, summary)
    if from_run is not None:
        atomic_write_json(folder / COMPARISON_JSON, compare(folder, summary, from_run, data))
    meta = {"format": FORMAT, "kind": TWO_STAGE, "labels": labels, "definition": TWO_STAGE_JSON}
    if model.preprocessing is not None:
        meta["preprocessing"] = model.preprocessing.to_dict()
    atomic_write_json(folder / MODEL_JSON, meta)  # last: marks a complete folder
    test = summary["test"].get("test_accuracy")
    log(f"two-stage {folder}: completed" + (f", test accuracy {test:.4f}" if test else ""))
    return folder


def compare(folder: Path, summary: dict, single: str | Path, data: dict) -> dict:
    """Two-stage vs the single-stage run: val and test accuracy side by side."""
    other = _read(RunFolder(single).summary)
    same = _read(RunFolder(single).data).get("data_hash") == data["data_hash"]
    out = {"two_stage": str(folder), "single_stage": str(single), "same_data": same}
    for split in ("val", "test"):
        key = f"{split}_accuracy"
        out[key] = {
            "two_stage": summary[split].get(key),
            "single_stage": (other.get(split) or {}).get(key),
        }
    return out


def _read(read) -> dict:
    """A best-effort read (`RunFolder.summary`, `.data`): {} when missing or broken."""
    try:
        return read()
    except RunFileError:
        return {}
