"""Rows of `imgclf predict` and their CSV / JSON Lines writers.

One row per input file, in input order, with these columns:

  path, predicted, probability, status (ok | error), reason,
  top1_label, top1_prob, … topK_label, topK_prob   (K = --top-k, at most the class count)
  p_<class> …                                       (one per class, with --probs)

An error row has status "error", the loader's reason ("truncated or corrupt (…)", "empty file",
"over pixel cap (…)", "not a regular file (FIFO)", …) and empty prediction fields. A path that is
not valid UTF-8 is not read and is shown with \\xNN escapes. CSV writes probabilities with 6
decimals; JSON Lines writes one object per row with the same keys (numbers as numbers, null when
empty).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_text, printable

FORMATS = ("csv", "jsonl")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BASE_COLUMNS = ["path", "predicted", "probability", "status", "reason"]


def columns(labels: Sequence[str], top_k: int, probs: bool = False) -> list[str]:
    """The output columns for a label map."""
    k = min(top_k, len(labels))
    cols = list(BASE_COLUMNS)
    for i in range(1, k + 1):
        cols += [f"top{i}_label", f"top{i}_prob"]
    return cols + ([f"p_{n}" for n in labels] if probs else [])


def build_rows(preds, labels: Sequence[str], top_k: int = 5, probs: bool = False) -> list[dict]:
    """`Predictions` → one dict per path (predicted or not), in path order."""
    k = min(top_k, len(labels))
    row_of = {i: r for r, i in enumerate(preds.ok)}
    values = preds.probs.double()
    top = values.topk(k, dim=1) if k and len(values) else None
    rows = []
    for i, path in enumerate(preds.paths):
        # A name that is not UTF-8 is shown escaped, so the output is always written.
        row: dict[str, Any] = {"path": printable(path)}
        r = row_of.get(i)
        if r is None:
            reason = preds.errors.get(i, "not predicted")
            row.update(predicted=None, probability=None, status="error")
            row["reason"] = printable(reason.removeprefix(f"{path}: "))
            rows.append(row)
            continue
        assert top is not None
        idx, p = top.indices[r].tolist(), top.values[r].tolist()
        row.update(predicted=labels[idx[0]], probability=p[0], status="ok", reason="")
        for j in range(k):
            row[f"top{j + 1}_label"], row[f"top{j + 1}_prob"] = labels[idx[j]], p[j]
        if probs:
            row.update({f"p_{n}": v for n, v in zip(labels, values[r].tolist(), strict=True)})
        rows.append(row)
    return rows


def is_stdout(out: Path | str | None) -> bool:
    """`-o -` (or no -o) means standard output, never a file named "-"."""
    return out is None or str(out) == "-"


def output_format(out: Path | None, fmt: str | None) -> str:
    """--format wins; else the -o suffix (.csv, .jsonl, .ndjson); else csv."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImgclfError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if out is None or is_stdout(out):
        return "csv"
    suffix = out.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ImgclfError(
            f"-o {out}: cannot tell the format from {suffix or 'no suffix'!r}; "
            "name it .csv or .jsonl, or give --format"
        )
    return _SUFFIXES[suffix]


def render(rows: Sequence[dict], cols: Sequence[str], fmt: str) -> str:
    """The whole output as text."""
    if fmt == "jsonl":
        return "".join(
            json.dumps({c: row.get(c) for c in cols}, ensure_ascii=False) + "\n" for row in rows
        )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows([_csv_value(row.get(c)) for c in cols] for row in rows)
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6f}" if isinstance(v, float) else str(v)


def write_csv(path: Path, rows: Sequence[dict], cols: Sequence[str]) -> None:
    """The one predictions-CSV writer (predict, a run's predictions/, evaluations): every row
    has every column (a missing value is empty), floats with 6 decimals; written atomically."""
    atomic_write_text(path, render(rows, cols, "csv"))


def write_rows(rows: Sequence[dict], cols: Sequence[str], out: Path | None, fmt: str) -> None:
    """To the file (atomically: never a half-written result) or to standard output."""
    text = render(rows, cols, fmt)
    if is_stdout(out):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(out, text)
