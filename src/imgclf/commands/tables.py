"""Terminal renderings (rich) of the reports the data layer writes as JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_scan_report(report: dict[str, Any], console: Console) -> None:
    files = report["files"]
    console.print(
        f"[bold]{report['root']}[/]: {files['ok']} usable, {files['skipped']} skipped, "
        f"{files['ignored']} ignored ({files['reused']} reused from the last scan) "
        f"in {report['seconds']:.1f} s"
    )
    classes = report["classes"]
    if classes:
        t = Table(title=f"images per class (imbalance ratio {report['imbalance_ratio']})")
        t.add_column("class")
        t.add_column("images", justify="right")
        splits = report.get("splits") or {}
        for s in splits:
            t.add_column(s, justify="right")
        top = max(classes.values()) or 1
        t.add_column("")
        for name, n in classes.items():
            bar = "█" * max(0, round(20 * n / top))
            t.add_row(name, str(n), *[str(splits[s].get(name, 0)) for s in splits], bar)
        console.print(t)
    if report.get("imbalance_note"):
        console.print(f"[yellow]note[/]: {report['imbalance_note']}", highlight=False)
    if report["skipped_by_reason"]:
        t = Table(title="skipped files")
        for col in ("reason", "files", "examples"):
            t.add_column(col)
        for reason, paths in report["skipped_by_reason"].items():
            t.add_row(
                reason, str(len(paths)), ", ".join(paths[:3]) + (" …" if len(paths) > 3 else "")
            )
        console.print(t)
    _counts(console, "ignored", report["ignored_by_kind"])
    _counts(console, "unsupported formats by extension", report["unsupported_by_extension"])
    _counts(console, "accepted after normalising", report["normalised"])
    dups = report["duplicates"]
    for kind, label in (("within_class", "within a class"), ("across_splits", "across splits")):
        if dups[kind]:
            console.print(
                f"[yellow]warning[/]: {len(dups[kind])} group(s) of identical files {label}"
            )
    for err in report["errors"]:
        console.print(f"[red]error[/]: {err}")


def print_split_report(split: dict[str, Any], console: Console) -> None:
    t = Table(title=f"split ({split['source']}, seed {split['seed']}): {split['fractions']}")
    t.add_column("class")
    names = [s for s in ("train", "val", "test") if s in split["fractions"]]
    for s in names:
        t.add_column(s, justify="right")
    for cls, counts in split["per_class"].items():
        t.add_row(cls, *[str(counts.get(s, 0)) for s in names])
    totals = [sum(c.get(s, 0) for c in split["per_class"].values()) for s in names]
    t.add_row("[bold]total", *[f"[bold]{n}" for n in totals])
    console.print(t)
    for note in split.get("notes", []):
        console.print(f"[yellow]note[/]: {note}")


def _counts(console: Console, title: str, counts: dict[str, int]) -> None:
    if counts:
        console.print(f"{title}: " + ", ".join(f"{k} × {v}" for k, v in counts.items()))


def print_run_table(runs: list, console: Console) -> None:
    """One row per run folder: model, weights, epochs, parameters, val/test accuracy, time."""
    from imgclf.runs.layout import RunFolder

    t = Table(title="runs")
    for col in ("model", "weights", "epochs", "params", "val acc", "test acc", "time"):
        t.add_column(col, justify="left" if col in ("model", "weights") else "right")
    for run in runs:
        s = RunFolder(run).summary()
        val, test = s.get("val", {}), s.get("test", {})
        t.add_row(
            s.get("model", ""),
            s.get("pretrained", ""),
            str(s.get("epochs", "")),
            f"{(s.get('params') or {}).get('total', 0):,}",
            f"{val.get('val_accuracy', float('nan')):.4f}",
            f"{test.get('test_accuracy', float('nan')):.4f}",
            f"{s.get('train_seconds', 0):.0f} s",
        )
    console.print(t)
    for run in runs:
        console.print(f"run folder: {run}", highlight=False)
