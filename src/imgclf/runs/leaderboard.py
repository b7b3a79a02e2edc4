"""The leaderboard: one row per run folder, filtered, ranked and rendered.

Only `summary.json` (and `evaluations/*/metrics.json`, `data.json` and `model.json` when present)
is read per run, and nothing here imports torch, so a thousand runs list in well under a second.
The config values a row shows (model, weights, stages, …) are in summary.json's `config` (written
by training, see `shown_config`); run folders written before it existed fall back to
`config.yaml`, read with PyYAML's safe loader. A folder that is not a complete run is skipped
with a warning, never a crash.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import operator
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError
from imgclf.metric_names import lower_is_better
from imgclf.runs.layout import (
    EVALUATION_METRICS,
    EVALUATIONS,
    RunFileError,
    RunFolder,
    read_json,
)
from imgclf.runs.owner import owner_gone

# The tracking store lives beside the runs by default: ours, so skipped without a warning.
# Not runs, but expected in a runs folder: the tracking store and the sweeps' studies.
TRACKING_ENTRIES = frozenset(
    {"mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlartifacts", "sweeps"}
)
FORMATS = ("table", "csv", "markdown", "html", "json")
# The terminal default fits about 120 columns; `--wide` shows WIDE_COLUMNS, `--columns` any.
TABLE_COLUMNS = ("id", "status", "model", "data", "val_accuracy", "test_accuracy")
WIDE_COLUMNS = (
    "id",
    "status",
    "model",
    "weights",
    "trainable",
    "data",
    "image_size",
    "batch_size",
    "stages",
    "augment",
    "imbalance",
    "best_epoch",
    "val_accuracy",
    "val_loss",
    "val_top5",
    "test_accuracy",
    "test_loss",
    "test_top5",
    "params_total",
    "params_trainable",
    "train_s",
)
# Cells that identify something are never shortened: a cut id cannot be pasted back.
_NEVER_CUT = ("id", "sweep")
DATA_HASH_CHARS = 8
_HEAD = (
    "id",
    "status",
    "model",
    "weights",
    "trainable",
    "data",
    "image_size",
    "batch_size",
    "stages",
    "epochs",
    "augment",
    "imbalance",
    "best_epoch",
)
_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
_TAIL = (
    "params_total",
    "params_trainable",
    "params_non_trainable",
    "optimizer_state",
    "model_mb",
    "train_s",
    "images_per_s",
    "error",
)
_MAX_CELL = 44
_DECIMALS = {"train_s": 1, "images_per_s": 1, "model_mb": 2}


class SkipRun(Exception):
    """A folder in the runs directory that is not a (complete) run folder."""


def collect(runs_dir: Path, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per run folder under `runs_dir`; others are reported through `warn`."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ImgclfError(f"runs folder {runs_dir} does not exist; train a run with `imgclf train`")
    rows = []
    with os.scandir(runs_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name in TRACKING_ENTRIES:
                continue
            try:
                if not entry.is_dir():
                    raise SkipRun("a file, not a run folder")
                rows.append(read_run(Path(entry.path)))
            except SkipRun as e:
                warn(f"skipped {entry.path}: {e}")
            except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
                # Valid JSON/YAML of the wrong shape: a foreign folder, never a crash.
                warn(f"skipped {entry.path}: unexpected content ({type(e).__name__}: {e})")
    return rows


def read_run(path: Path) -> dict[str, Any]:
    """The leaderboard row of one run folder (raises SkipRun when it is not a run)."""
    run = RunFolder(path)
    summary = _read(run.summary)
    config = summary.get("config")
    if not isinstance(config, dict):  # a run folder written before summary.json had it
        config = _read(run.config)
    model, train = config.get("model") or {}, config.get("train") or {}
    stages = train.get("stages") or [{}]
    image_size = (config.get("data") or {}).get("image_size") or _input_size(run)
    params = summary.get("params") or {}
    best = summary.get("best") or {}
    row: dict[str, Any] = {
        "id": path.name,
        "status": summary.get("status", "unknown"),
        "model": model.get("name") or summary.get("model"),
        "weights": _weights(model),
        "trainable": _trainable(stages[-1].get("trainable")),
        "image_size": image_size,
        "batch_size": train.get("batch_size"),
        "stages": _stages(stages),
        "epochs": summary.get("epochs"),
        "augment": (train.get("augment") or {}).get("preset"),
        "imbalance": train.get("imbalance"),
        "data": _data_version(run),
        "best_epoch": best.get("epoch"),
        "sweep": (summary.get("tags") or {}).get("sweep"),
        "fit": (summary.get("tags") or {}).get("fit"),
    }
    row.update(dict.fromkeys(_METRICS))
    for split in ("val", "test"):
        row.update(_numbers(summary.get(split)))
    row.update(_evaluations(path / EVALUATIONS))
    row.update(
        {
            "params_total": params.get("total"),
            "params_trainable": params.get("trainable"),
            "params_non_trainable": params.get("non_trainable"),
            "optimizer_state": params.get("optimizer_state"),
            "model_mb": summary.get("model_size_mb"),
            "train_s": summary.get("train_seconds"),
            "images_per_s": summary.get("images_per_s"),
            "error": summary.get("error"),
        }
    )
    if row["status"] == "running" and (why := owner_gone(path)):
        # kill -9 or a power cut leaves `running` behind; the folder itself is left as it is.
        row["status"] = "dead"
        row["error"] = row["error"] or (
            f"stopped without recording it: {why}; continue it with `imgclf train --resume {path}`"
        )
    return row


def shown_config(config: dict[str, Any], input_size: Any = None) -> dict[str, Any]:
    """The part of a resolved config (`config.resolve`) that a row shows, in the same shape,
    with `data.image_size` resolved to `input_size` when the config leaves it to the model:
    training writes it into summary.json as `config`, so rows need no YAML."""
    model, data = config.get("model") or {}, config.get("data") or {}
    train = config.get("train") or {}
    stages = [
        {k: s.get(k) for k in ("epochs", "lr", "trainable")}
        for s in train.get("stages") or []
        if isinstance(s, dict)
    ]
    return {
        "model": {k: model.get(k) for k in ("name", "pretrained", "init_from")},
        "data": {"image_size": data.get("image_size") or input_size},
        "train": {
            "batch_size": train.get("batch_size"),
            "stages": stages,
            "augment": {"preset": (train.get("augment") or {}).get("preset")},
            "imbalance": train.get("imbalance"),
        },
    }


def _read(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One file of the run through layout's reader; a missing or broken one skips the run."""
    try:
        return read()
    except RunFileError as e:
        name = e.path.name
        if e.missing:
            raise SkipRun(f"no {name} (half-written, or not a run folder)") from None
        raise SkipRun(f"unreadable {name}: {e}") from None


def _data_version(run: RunFolder) -> str | None:
    """data.json's data hash, shortened: runs on different data are told apart at a glance."""
    try:
        digest = run.data().get("data_hash")
    except RunFileError:
        return None
    return str(digest)[:DATA_HASH_CHARS] if digest else None


def _input_size(run: RunFolder) -> int | None:
    """`data.image_size: null` means the model's default: model.json has the real one."""
    try:
        return run.model_spec()["preprocessing"]["input_size"]
    except (RunFileError, KeyError, TypeError):
        return None


def _weights(model: dict[str, Any]) -> str | None:
    if model.get("init_from"):
        return f"warm:{Path(str(model['init_from'])).name}"
    source = model.get("pretrained")
    if isinstance(source, str) and source.startswith("file:"):
        return f"file:{Path(source[5:]).name}"
    return source


def _trainable(value: Any) -> str | None:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return None if value is None else str(value)


def _stages(stages: list[dict[str, Any]]) -> str:
    """`epochs@lr` per stage; with several stages, what each one trains."""
    parts = []
    for s in stages:
        lr = s.get("lr")
        text = f"{s.get('epochs', '?')}@{lr:g}" if isinstance(lr, int | float) else "?"
        if len(stages) > 1:
            text += f" {_trainable(s.get('trainable'))}"
        parts.append(text)
    return " → ".join(parts)


def _numbers(values: Any, prefix: str = "") -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {
        f"{prefix}{k}": v
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _evaluations(folder: Path) -> dict[str, float]:
    """Scalar metrics of each `evaluations/<name>/metrics.json`, as `<name>.<metric>`."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError:
        return {}
    out: dict[str, float] = {}
    for name in names:
        try:
            data = read_json(folder / name / EVALUATION_METRICS)
        except RunFileError:
            continue
        inner = data.get("summary", data.get("metrics"))
        out.update(_numbers(inner if isinstance(inner, dict) else data, f"{name}."))
    return out


def leaderboard(
    runs_dir: Path,
    sort: str = "val_accuracy",
    order: str = "auto",
    top: int | None = None,
    where: str | None = None,
    fmt: str = "table",
    columns: list[str] | None = None,
    warn: Callable[[str], None] = print,
    wide: bool = False,
) -> tuple[str, int]:
    """Collect, filter, rank and render the runs under `runs_dir`: (text, number of rows)."""
    if fmt not in FORMATS:
        raise ImgclfError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows = collect(runs_dir, warn)
    known = column_names(rows)
    for name in columns or ():
        if name not in known:
            raise ImgclfError(f"unknown column {name!r}; choose from: {', '.join(known)}")
    if where:
        rows = list(filter(parse_where(where, known), rows))
    rows = sort_rows(rows, sort, order, known)[:top]
    if columns:
        shown = list(columns)
    elif fmt == "table":
        shown = table_columns(known, [sort], WIDE_COLUMNS if wide else TABLE_COLUMNS)
    else:
        shown = known
    return render(rows, fmt, shown), len(rows)


def column_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every column in the rows: run description, metrics (as first seen), then resources."""
    seen: dict[str, None] = dict.fromkeys((*_HEAD, *_METRICS))
    for row in rows:
        seen.update(dict.fromkeys(row))
    tail = [c for c in _TAIL if c in seen]
    return [c for c in seen if c not in _TAIL] + tail


def sort_rows(
    rows: list[dict[str, Any]], metric: str, order: str = "auto", columns: list[str] | None = None
) -> list[dict[str, Any]]:
    """Best first: descending, or ascending for losses; runs without the metric go last."""
    known = columns if columns is not None else column_names(rows)
    if metric not in known:
        raise ImgclfError(f"--sort {metric!r} is not a column; choose one of: {', '.join(known)}")
    if order not in ("auto", "asc", "desc"):
        raise ImgclfError(f"--order must be auto, asc or desc, got {order!r}")
    descending = order == "desc" or (order == "auto" and not lower_is_better(metric))

    def key(row: dict[str, Any]) -> tuple:
        v = row.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (2, 0, "")
        if isinstance(v, int | float):
            return (0, -v if descending else v, "")
        return (1, 0, str(v))

    newest_first = sorted(rows, key=lambda r: r["id"], reverse=True)  # ties: newest first
    return sorted(newest_first, key=key)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_VALUE = r"'[^']*'|\"[^\"]*\"|[^\s'\",()\[\]]+"
_CLAUSE = re.compile(
    r"\s*(?P<key>[A-Za-z_][\w.\-]*)\s*"
    r"(?:(?P<op>==|!=|<=|>=|<|>|=)\s*(?P<value>" + _VALUE + r")"
    r"|(?P<not>(?i:not)\s+)?(?i:in)\s*[(\[](?P<items>[^)\]]*)[)\]])"
    r"(?P<rest>\s+(?i:and|or)\s+|\s*$)"
)
_ITEM = re.compile(r"\s*(" + _VALUE + r")\s*(?:,|$)")
_WHERE_HELP = (
    "write clauses like `test_accuracy >= 0.9 and model == efficientnet_lite0`, "
    "`status in (completed, interrupted)` or `a < 1 or b > 2` (== != < <= > >= in, not in; "
    "`and` binds before `or`)"
)


def parse_where(expr: str, columns: list[str]) -> Callable[[dict[str, Any]], bool]:
    """`clause [and|or clause …]`, `and` before `or` → a row predicate. Parsed, never evaluated.

    A clause is `key OP value` or `key [not] in (v1, v2, …)`.
    """
    groups: list[list[Callable[[dict[str, Any]], bool]]] = [[]]
    pos = 0
    while pos < len(expr):
        m = _CLAUSE.match(expr, pos)
        if not m:
            raise ImgclfError(f"--where: cannot read {expr[pos:]!r}; {_WHERE_HELP}")
        if m["key"] not in columns:
            raise ImgclfError(
                f"--where: unknown column {m['key']!r}; choose one of: {', '.join(columns)}"
            )
        groups[-1].append(_clause(m))
        pos = m.end()
        if m["rest"].strip().lower() == "or":
            groups.append([])
    if not groups[0]:
        raise ImgclfError("--where is empty; write e.g. `test_accuracy >= 0.9`")
    if m["rest"].strip():
        raise ImgclfError(f"--where ends with {m['rest'].strip()!r}: a clause is missing")

    def keep(row: dict[str, Any]) -> bool:
        return any(all(test(row) for test in group) for group in groups)

    return keep


def _clause(m: re.Match) -> Callable[[dict[str, Any]], bool]:
    key = m["key"]
    if m["op"]:
        op, literal = _OPS[m["op"]], _literal(m["value"])
        return lambda row: _compare(row.get(key), op, literal)
    items, pos = [], 0
    text = m["items"].strip()
    while pos < len(text):
        item = _ITEM.match(text, pos)
        if not item:
            raise ImgclfError(f"--where: cannot read the list ({m['items']}); {_WHERE_HELP}")
        items.append(_literal(item[1]))
        pos = item.end()
    if not items:
        raise ImgclfError(f"--where: `{key} in ()` lists nothing; {_WHERE_HELP}")
    negate = bool(m["not"])

    def member(row: dict[str, Any]) -> bool:
        found = any(_compare(row.get(key), operator.eq, v) for v in items)
        return row.get(key) is not None and found != negate

    return member


def _literal(text: str) -> float | str:
    if text[:1] in ("'", '"'):
        return text[1:-1]
    try:
        return float(text)
    except ValueError:
        return text


def _compare(value: Any, op: Callable[[Any, Any], bool], literal: float | str) -> bool:
    if value is None:
        return False
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(literal, float) and number:
        return op(value, literal)
    if isinstance(literal, float) or number:
        # A number against a word: only equality makes sense, and it is never equal.
        return op is operator.ne
    return op(str(value), literal)


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str]) -> str:
    """The rows as table (plain text), csv, markdown, html or json, in `columns` order."""
    if fmt not in FORMATS:
        raise ImgclfError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r.get(c) is None else r.get(c) for c in columns] for r in rows])
        return buf.getvalue()
    # Only the terminal table shortens long text; markdown and HTML are copied elsewhere.
    limit = _MAX_CELL if fmt == "table" else None
    cells = [[_cell(r.get(c), c, limit) for c in columns] for r in rows]
    if fmt == "markdown":
        return _markdown(columns, cells)
    if fmt == "html":
        return _html(columns, cells)
    return _text_table(columns, cells, rows)


def table_columns(
    all_columns: list[str], extra: Iterable[str] = (), base: Iterable[str] = TABLE_COLUMNS
) -> list[str]:
    """The compact default for the terminal: present `base` columns plus `extra` (the sort)."""
    chosen = [c for c in base if c in all_columns]
    return chosen + [c for c in extra if c in all_columns and c not in chosen]


def _cell(value: Any, column: str = "", limit: int | None = _MAX_CELL) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.{_DECIMALS.get(column, 4)}f}"
    text = " ".join(str(value).split())
    if limit is None or column in _NEVER_CUT or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _text_table(columns: list[str], cells: list[list[str]], rows: list[dict]) -> str:
    numeric = [
        any(isinstance(r.get(c), int | float) for r in rows) for c in columns
    ]  # numbers align right
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("─" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(row) for row in cells)]) + "\n"


def _markdown(columns: list[str], cells: list[list[str]]) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |"]
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _html(columns: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in cells
    )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>imgclf leaderboard</title>'
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
        "tr:nth-child(even){background:#f6f6f6}</style></head><body>\n"
        f"<h1>imgclf leaderboard</h1>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n"
        "</tbody>\n</table>\n</body></html>\n"
    )
