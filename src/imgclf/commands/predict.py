"""`imgclf` commands for the predict area: predict, ensemble, two-stage, export."""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from imgclf.errors import ImgclfError

VOTE_HELP = "soft: mean probabilities; hard: majority of top-1 votes, ties by mean probability"


def predict(
    args: Annotated[
        list[str],
        typer.Argument(
            help="RUN [RUN...] then inputs: files, folders (recursive), CSV lists with a path "
            "column, or - for paths on standard input. Several RUNs vote as an ensemble.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="OUT.csv or OUT.jsonl (default: stdout)")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="csv | jsonl")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="top-k columns")] = 5,
    tta: Annotated[str | None, typer.Option(help="flip | multi-crop")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    workers: Annotated[
        int | None, typer.Option(min=0, help="loader processes per model (default: auto)")
    ] = None,
    vote: Annotated[str, typer.Option(help=VOTE_HELP)] = "soft",
    weights: Annotated[str | None, typer.Option(help="ensemble weights, e.g. 2,1,1")] = None,
    probs: Annotated[bool, typer.Option("--probs", help="add a p_<class> column per class")] = (
        False
    ),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
) -> None:
    """Predict files, folders or lists with one run, or several runs as an ensemble."""
    rows = predict_files(
        args,
        out=out,
        fmt=fmt,
        top_k=top_k,
        tta=tta,
        batch_size=batch_size,
        workers=workers,
        vote=vote,
        weights=weights,
        probs=probs,
        device=device,
        progress=progress and sys.stderr.isatty(),
    )
    from imgclf.predict.output import is_stdout

    where = "" if is_stdout(out) else f" → {out}"
    print(summary(rows) + where, file=sys.stderr)


def summary(rows: list[dict]) -> str:
    """'N predicted, M failed (K kind, …)': exit status 0 even then, so stderr says it."""
    failed = Counter(_kind(r["reason"]) for r in rows if r["status"] != "ok")
    n = sum(failed.values())
    kinds = ", ".join(f"{k} {kind}" for kind, k in sorted(failed.items(), key=_most_first))
    return f"{len(rows) - n} predicted, {n} failed" + (f" ({kinds})" if kinds else "")


def _most_first(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def _kind(reason: str) -> str:
    # "truncated or corrupt (detail)" / "file name is not valid UTF-8: rename it" → the kind
    return re.split(r" \(|: ", reason or "not predicted", maxsplit=1)[0]


def predict_files(
    args: list[str],
    *,
    out: Path | None = None,
    fmt: str | None = None,
    top_k: int = 5,
    tta: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    vote: str = "soft",
    weights: str | None = None,
    probs: bool = False,
    device: str = "auto",
    progress: bool = False,
    stdin=None,
) -> list[dict]:
    """What `imgclf predict` does after parsing: models + inputs → rows, written out."""
    from imgclf.predict.inputs import expand, split_runs
    from imgclf.predict.output import build_rows, columns, is_stdout, output_format, write_rows
    from imgclf.predict.predictor import tta_warnings

    runs, inputs = split_runs(args)
    if not runs:
        raise ImgclfError(
            f"the first argument {args[0] if args else ''!r} is not a run folder (a folder "
            "holding model.json); usage: imgclf predict RUN [RUN...] PATHS..."
        )
    if not inputs:
        raise ImgclfError("no inputs after the run folder(s): give files, folders, lists or -")
    out = None if is_stdout(out) else out  # `-o -` is standard output, not a file named "-"
    fmt = output_format(out, fmt)
    predictor = _load(runs, vote, weights, _device(device))
    for warning in (w for run in runs for w in tta_warnings(run, tta)):
        print(f"warning: {warning}", file=sys.stderr)
    found = expand(inputs, stdin)
    skipped = ", ".join(f"{n} {kind}" for kind, n in found.ignored.most_common())
    if not found.paths:
        raise ImgclfError(
            f"no image files in {inputs}" + (f" (skipped: {skipped})" * bool(skipped))
        )
    if skipped:
        print(f"skipped inside folders: {skipped}", file=sys.stderr)
    if workers is None:
        workers = 0 if len(found.paths) <= batch_size else min(4, (os.cpu_count() or 2) - 1)
    with _bar(len(found.paths), progress) as advance:
        preds = predictor.predict_paths(found.paths, batch_size, workers, tta, advance)
    rows = build_rows(preds, predictor.labels, top_k, probs)
    write_rows(rows, columns(predictor.labels, top_k, probs), out, fmt)
    return rows


def _load(runs: list[str], vote: str, weights: str | None, device: str):
    from imgclf.predict.ensemble import Ensemble
    from imgclf.predict.predictor import load_predictor

    if len(runs) == 1:
        if weights is not None:
            raise ImgclfError("--weights needs several runs (an ensemble)")
        return load_predictor(runs[0], device)
    return Ensemble.from_runs(runs, weights, vote, device)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ImgclfError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return name


class _bar:
    """A rich progress bar on stderr, or a no-op; yields the advance callback."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.progress = total, show, None

    def __enter__(self):
        if not self.show:
            return None
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.start()
        task = self.progress.add_task("predicting", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="member run folders", show_default=False)],
    name: Annotated[str, typer.Option(help="the ensemble's folder name under --runs-dir")],
    vote: Annotated[str, typer.Option(help=VOTE_HELP)] = "soft",
    weights: Annotated[str | None, typer.Option(help="one weight per run, e.g. 2,1,1")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where the ensemble folder goes")] = Path("runs"),
) -> None:
    """Save runs as an ensemble: a run-like folder that predict, evaluate and export accept."""
    from imgclf.workflows.ensemble import save_ensemble

    folder = save_ensemble(runs, name, vote=vote, weights=weights, runs_dir=runs_dir)
    typer.echo(f"ensemble folder: {folder}")
    _print_accuracy(folder)


def two_stage(
    config: Annotated[str | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    groups: Annotated[
        str, typer.Option(help="auto (from --from-run's evaluation) or a JSON file of groups")
    ] = "auto",
    from_run: Annotated[
        Path | None, typer.Option(help="evaluated single-stage run: groups and comparison")
    ] = None,
    evaluation: Annotated[
        str | None, typer.Option(help="which evaluations/<name> (default: val, then test)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="folder name under runs_dir")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Coarse → fine: stage 1 on groups of confused classes, stage 2 inside each group."""
    from imgclf.config import load_config
    from imgclf.workflows.two_stage import train_two_stage

    overrides = list(overrides or [])
    if config is not None and re.match(r"^[A-Za-z_][\w.]*=", config) and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    folder = train_two_stage(
        cfg,
        groups,
        from_run=from_run,
        evaluation=evaluation,
        name=name,
        progress=progress and sys.stderr.isatty(),
        log=typer.echo,
    )
    typer.echo(f"two-stage folder: {folder}")
    _print_accuracy(folder)


def _print_accuracy(folder: Path) -> None:
    from imgclf.runs.layout import RunFolder

    summary = RunFolder(folder).summary()
    for split in ("val", "test"):
        acc = (summary.get(split) or {}).get(f"{split}_accuracy")
        if acc is not None:
            typer.echo(f"{split} accuracy: {acc:.4f}")


def export(
    run: Annotated[Path, typer.Argument(help="run, ensemble or two-stage folder")],
    format: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="any batch size N")] = (
        False
    ),
    out: Annotated[Path | None, typer.Option("-o", "--out", help="default: RUN/export")] = None,
    tolerance: Annotated[float, typer.Option(help="max abs difference of probabilities")] = 1e-4,
    samples: Annotated[int, typer.Option(min=1, help="images in the parity check")] = 16,
    check: Annotated[
        bool, typer.Option("--check", help="only re-check an existing export folder")
    ] = False,
    exporter: Annotated[
        str, typer.Option(help="dynamo (torch.export) | torchscript (legacy, faster)")
    ] = "dynamo",
) -> None:
    """Export to ONNX (normalisation inside the graph) after a parity check against PyTorch."""
    from imgclf.predict.export import EXPORT_DIR, FORMATS, export_onnx, verify_export

    if format not in FORMATS:
        raise ImgclfError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    if check:
        verify_export(out or run / EXPORT_DIR, run, tolerance=tolerance, samples=samples)
        typer.echo("parity ok")
        return
    result = export_onnx(
        run,
        out,
        opset=opset,
        dynamic_batch=dynamic_batch,
        tolerance=tolerance,
        samples=samples,
        exporter=exporter,
        log=typer.echo,
    )
    typer.echo(f"export folder: {result.folder} (model.onnx + model.json)")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("predict")(predict)
    app.command("ensemble")(ensemble)
    app.command("two-stage")(two_stage)
    app.command("export")(export)
