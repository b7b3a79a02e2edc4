"""What `imgclf predict` reads: split RUN arguments from inputs, and expand inputs into files.

An argument that is a folder holding model.json is a model (run, ensemble or two-stage folder);
everything after the first other argument is an input:

- a folder: every file below it with an image extension (`IMAGE_EXTENSIONS`), recursively, in
  sorted order; junk (.DS_Store, Thumbs.db, desktop.ini), AppleDouble `._*` files, hidden files
  and folders and `__MACOSX` are skipped, as scan skips them; symlinked folders are followed
  once (never in a loop);
- a `.csv` / `.tsv` file: a list with a `path` column (other columns ignored); relative paths
  are relative to the list's folder;
- `-`: one path per line on standard input (files or folders; blank lines skipped);
- a FIFO, socket or device is never opened (an error row: not a regular file), and a name that
  is not valid UTF-8 is never read (an error row with the name escaped), as scan skips both;
- anything else: one file, whatever its extension or whether it exists (a missing or
  unreadable file becomes an error row, not a failure).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from imgclf.data.discover import ignored_kind, is_dir
from imgclf.errors import ImgclfError
from imgclf.runs.layout import MODEL_JSON

LIST_SUFFIXES = (".csv", ".tsv")


@dataclass
class Inputs:
    paths: list[str] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # kind → files skipped inside folders


def split_runs(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(model folders, inputs): models lead, the first non-model argument starts the inputs."""
    runs: list[str] = []
    for i, arg in enumerate(args):
        if arg != "-" and (Path(arg) / MODEL_JSON).is_file():
            runs.append(arg)
        else:
            return runs, list(args[i:])
    return runs, []


def expand(args: Sequence[str], stdin: TextIO | None = None) -> Inputs:
    """Inputs → the files to predict, in argument order."""
    out = Inputs()
    for arg in args:
        if arg == "-":
            lines = _read_stdin(stdin).splitlines()
            for line in lines:
                if line.strip():
                    _expand_one(line.strip(), out, allow_lists=False)
        else:
            _expand_one(arg, out, allow_lists=True)
    return out


def _read_stdin(stdin: TextIO | None) -> str:
    if stdin is not None:
        return stdin.read()
    # Bytes, decoded as the OS decodes file names: a name that is not UTF-8 then reaches the
    # predictor (which refuses it by name) instead of failing the whole read.
    return os.fsdecode(sys.stdin.buffer.read())


def _expand_one(arg: str, out: Inputs, allow_lists: bool) -> None:
    path = Path(arg)
    if path.is_dir():
        out.paths.extend(walk(path, out.ignored))
    elif allow_lists and path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        out.paths.extend(read_list(path))
    else:
        out.paths.append(arg)


def walk(folder: Path, ignored: Counter, seen: frozenset[str] = frozenset()) -> Iterator[str]:
    """Image files below `folder`, sorted by name per folder; never loops on symlinks."""
    real = os.path.realpath(folder)
    if real in seen:
        ignored["symlink loop or folder already listed"] += 1
        return
    seen = seen | {real}
    try:
        items = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ImgclfError(f"cannot list the folder {folder}: {e.strerror}") from e
    for it in items:
        if is_dir(it):
            if it.name.startswith(".") or it.name == "__MACOSX":
                ignored["hidden or __MACOSX folder"] += 1
            else:
                yield from walk(Path(it.path), ignored, seen)
        elif kind := ignored_kind(it.name):
            ignored[kind] += 1
        else:
            yield it.path


def read_list(path: Path) -> list[str]:
    """The `path` column of a CSV / TSV list; relative paths are taken from the list's folder."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise ImgclfError(f"cannot read the list {path}: {e}") from e
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in next(rows, [])]
    if "path" not in header:
        raise ImgclfError(f"{path}:1: a list needs a 'path' column; the header is {header}")
    col = header.index("path")
    out = []
    for lineno, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        value = row[col].strip() if col < len(row) else ""
        if not value:
            raise ImgclfError(f"{path}:{lineno}: empty path (quote values holding commas)")
        p = Path(value)
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out
