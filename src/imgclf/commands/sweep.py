"""`imgclf sweep` (grid / list / random / Optuna studies, local and distributed workers) and
`imgclf sweep-report`, a deprecated alias of `imgclf report --sweep ID` (the one door)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep file (YAML): base, method, parameters …")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value for the base config")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="trial processes here; 0 only queues the trials")
    ] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            envvar="IMGCLF_SWEEP_STORAGE",
            help="Optuna storage URL, e.g. postgresql://user@host/db (default: sqlite beside "
            "the runs)",
        ),
    ] = None,
    join: Annotated[
        bool, typer.Option(help="attach to an existing study as a worker (any machine)")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="run failed trials again (and ones whose worker dies now)")
    ] = False,
    worker: Annotated[bool, typer.Option(hidden=True, help="spawned worker: never queue")] = False,
) -> None:
    """Run a sweep: every trial is an ordinary run folder tagged with the sweep id.

    Re-running continues the study: completed trials are kept; failed ones run again only with
    --retry-failed. The study is a standard Optuna storage (optuna-dashboard works on it).
    """
    from imgclf.sweep.report import trial_rows
    from imgclf.sweep.runner import run_sweep

    def log(msg: str) -> None:
        if worker:  # a log file: whole lines, written as they come
            print(msg, flush=True)
        else:
            console.print(msg, markup=False, highlight=False, soft_wrap=True)

    try:
        result = run_sweep(
            spec,
            overrides or [],
            workers=workers,
            storage=storage,
            join=join,
            worker=worker,
            retry_failed=retry_failed,
            log=log,
        )
    except KeyboardInterrupt:
        console.print(
            "interrupted; the same command continues the sweep (--retry-failed also re-runs "
            "the interrupted trial)",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    if worker:
        return
    rows = trial_rows(result.study())
    print_trials(rows, result.spec.metric)
    # Points whose every attempt failed (a retried point keeps its old FAIL trial too).
    states: dict[str, set[str]] = {}
    for r in rows:
        states.setdefault(r["key"], set()).add(r["state"])
    failed = sum(s == {"FAIL"} for s in states.values())
    console.print(
        f"study {result.id} in {result.display_url}; "
        f"report: imgclf report --sweep {result.id} --runs-dir {result.runs_dir}"
        + (f"; {failed} failed: add --retry-failed to run them again" if failed else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if any(result.worker_exits):
        raise typer.Exit(1)  # a worker process died (its trials are marked failed above)


def sweep_report(
    sweep_id: Annotated[str, typer.Argument(help="the sweep id (its file's stem by default)")],
    runs: Annotated[Path, typer.Option(help="the runs folder the sweep wrote to")] = Path("runs"),
    storage: Annotated[
        str | None,
        typer.Option(envvar="IMGCLF_SWEEP_STORAGE", help="storage URL (default: sweep.json's)"),
    ] = None,
) -> None:
    """Alias of `imgclf report --sweep ID` (a sweep's HTML report): use that instead."""
    from imgclf.commands._common import err_console
    from imgclf.commands.evaluate import report

    where = f" --runs-dir {runs}" if runs != Path("runs") else ""
    err_console.print(
        f"sweep-report is an alias; use: imgclf report --sweep {sweep_id}{where}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    report(runs=None, out=None, sweep=sweep_id, runs_dir=runs, storage=storage)


def print_trials(rows: list[dict], metric: str) -> None:
    """The trials as a table: number, params, metric, status, run folder."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="trials", title_justify="left")
    for col in ("#", "key", "parameters", metric, "status", "run"):
        table.add_column(col, overflow="fold")
    names = short_names({k for r in rows for k in r["params"]})
    for r in rows:
        params = ", ".join(f"{names[k]}={_fmt(v)}" for k, v in r["params"].items())
        value = f"{r['value']:.4f}" if r["value"] is not None else ""
        status = r["state"].lower() + (f" ({r['error'][:60]})" if r["error"] else "")
        cells = (str(r["number"]), r["key"], params, value, status, r["run_id"])
        table.add_row(*(Text(c) for c in cells))
    console.print(table, markup=False, highlight=False)


def short_names(keys: set[str]) -> dict[str, str]:
    """The shortest unique dotted suffix of each key: train.stages.0.lr → lr."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if parts[-n].isdigit() and n < len(parts):  # "stages.0.lr", not "0.lr"
                continue
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("sweep")(sweep)
    app.command("sweep-report", deprecated=True)(sweep_report)
