"""Find the candidate image files of a dataset: a class-folder tree or a CSV of path,label[,split].

Nothing here decodes an image; `scan` does that. Discovery decides which files are candidates,
which are ignored (junk, hidden, not an image extension), and which structural problems stop
the scan (docs/RELIABILITY.md rows 15–21, 26–28).
"""

from __future__ import annotations

import csv
import io
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.manifest import Entry, collision_key, natural_key
from imgclf.files import printable, unusable_name

JUNK_FILES = {
    ".ds_store": "macOS .DS_Store",
    "thumbs.db": "Windows Thumbs.db",
    "desktop.ini": "Windows desktop.ini",
}
SPLIT_DIRS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


@dataclass
class Candidate:
    """A file to decode: `rel` is the on-disk path relative to the root, POSIX form."""

    rel: str
    label: str
    split: str = ""
    line: int = 0  # CSV line number, 0 for folders


@dataclass
class Discovery:
    root: Path
    source: str  # folder | csv
    candidates: list[Candidate] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # ignored / skipped before decoding
    classes: list[str] = field(default_factory=list)  # every class found, even empty ones
    errors: list[str] = field(default_factory=list)

    def ignore(self, rel: str, kind: str) -> None:
        self.entries.append(Entry(path=rel, status="ignored", reason=kind))

    def skip(self, rel: str, reason: str, label: str = "") -> None:
        self.entries.append(Entry(path=rel, label=label, status="skipped", reason=reason))


def discover(
    source: Path,
    follow_symlinks: str = "inside",
    root: Path | None = None,
    labels: list[str] | None = None,
) -> Discovery:
    """Dispatch on the source kind: a folder tree or a CSV file."""
    if source.is_dir():
        return _discover_folder(source.resolve(), follow_symlinks)
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _discover_csv(source, (root or source.parent).resolve(), labels, follow_symlinks)
    raise FileNotFoundError(source)


# ---------------------------------------------------------------- folders


def _discover_folder(root: Path, follow: str) -> Discovery:
    d = Discovery(root=root, source="folder")
    files = list(_walk(d, root, "", follow, {os.path.realpath(root)}))
    top = _top_dirs(root)
    split_layout = bool(top) and all(name.lower() in SPLIT_DIRS for name in top)
    class_dirs: dict[str, list[str]] = defaultdict(list)  # label -> on-disk folder names
    for top_name in top:
        if split_layout:
            for sub in _top_dirs(root / top_name):
                class_dirs[nfc(sub)].append(f"{top_name}/{sub}")
        else:
            class_dirs[nfc(top_name)].append(top_name)
    depth = 2 if split_layout else 1
    stray: list[str] = []
    for rel in files:
        parts = rel.split("/")
        if len(parts) <= depth:
            stray.append(rel)
            d.skip(rel, "image outside a class folder")
            continue
        split = SPLIT_DIRS[parts[0].lower()] if split_layout else ""
        d.candidates.append(Candidate(rel=rel, label=nfc(parts[depth - 1]), split=split))
    if stray:
        where = "split folders" if split_layout else "the data root"
        d.errors.append(
            f"{len(stray)} image(s) directly in {where}, not in a class folder: "
            f"{_listing(stray)}; move them into a class folder or delete them"
        )
    d.classes = sorted(class_dirs, key=natural_key)
    _check_collisions(d, class_dirs)
    labelled = {c.label for c in d.candidates}
    for label in d.classes:
        if label not in labelled:
            d.errors.append(f"class folder {class_dirs[label][0]!r} holds no image files")
    return d


def _top_dirs(folder: Path) -> list[str]:
    """Visible sub-folders (hidden, __MACOSX excluded) in a stable order."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [
        n
        for n in names
        if not n.startswith(".")
        and n != "__MACOSX"
        and not unusable_name(n)
        and (folder / n).is_dir()
    ]


def _walk(d: Discovery, folder: Path, rel: str, follow: str, seen: set[str]):
    """Yield relative paths of candidate files; record ignored ones. Never loops on symlinks."""
    try:
        items = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        d.skip(rel or ".", f"unreadable: folder could not be listed ({e.strerror})")
        return
    for it in items:
        r = f"{rel}/{it.name}" if rel else it.name
        # Manifests and reports hold paths as text (RELIABILITY 31): a name that is not UTF-8
        # (or holds a carriage return) is recorded escaped and never read. Folders with such
        # names are never walked, so `rel` is always usable.
        shown, bad_name = printable(r), unusable_name(it.name)
        if is_dir(it):
            if it.name == "__MACOSX":
                d.ignore(shown + "/", "__MACOSX folder")
            elif it.name.startswith("."):
                d.ignore(shown + "/", "hidden folder")
            elif bad_name:
                d.skip(shown + "/", bad_name)
            elif it.is_symlink() and not _link_allowed(d.root, it.path, follow):
                d.skip(r + "/", "symlink: folder link outside the data root not followed")
            elif (real := os.path.realpath(it.path)) in seen:
                d.skip(r + "/", "symlink: loop or folder already scanned")
            else:
                yield from _walk(d, Path(it.path), r, follow, seen | {real})
            continue
        kind = ignored_kind(it.name)
        if kind:
            d.ignore(shown, printable(kind))
        elif bad_name:
            d.skip(shown, bad_name)
        elif it.is_symlink() and not _link_allowed(d.root, it.path, follow):
            d.skip(r, "symlink: link outside the data root not followed")
        else:
            yield r


def is_dir(it: os.DirEntry) -> bool:
    """A directory (or a link to one); False when the entry cannot be read."""
    try:
        return it.is_dir()
    except OSError:
        return False


def ignored_kind(name: str) -> str:
    """Why a file in a data folder is not a candidate ('' when it is one)."""
    low = name.lower()
    if low in JUNK_FILES:
        return JUNK_FILES[low]
    if name.startswith("._"):
        return "AppleDouble ._ file"
    if name.startswith("."):
        return "hidden file"
    ext = os.path.splitext(low)[1]
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image extension ({ext or 'none'})"
    return ""


def _link_allowed(root: Path, path: str, follow: str) -> bool:
    if follow == "all":
        return True
    if follow == "none":
        return False
    return _inside(root, Path(os.path.realpath(path)))


def _inside(root: Path, p: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def _check_collisions(d: Discovery, class_dirs: dict[str, list[str]]) -> None:
    """Class names equal after case / space / Unicode folding are an error (RELIABILITY 26)."""
    by_key: dict[str, set[str]] = defaultdict(set)
    for folders in class_dirs.values():
        for folder in folders:
            name = folder.split("/")[-1]
            by_key[collision_key(name)].add(name)
    for names in by_key.values():
        if len(names) > 1:
            shown = ", ".join(repr(n) for n in sorted(names))
            d.errors.append(
                f"class folders {shown} differ only by case, spaces or Unicode form; "
                "rename or merge them so each class has one folder"
            )


def _listing(paths: list[str], limit: int = 10) -> str:
    more = f" … and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ---------------------------------------------------------------- CSV


def _discover_csv(
    csv_path: Path, root: Path, labels: list[str] | None, follow: str = "inside"
) -> Discovery:
    d = Discovery(root=root, source="csv")
    # utf-8-sig drops a byte-order mark written by Excel (RELIABILITY 27).
    text = csv_path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = csv.reader(io.StringIO(text), delimiter="\t" if csv_path.suffix == ".tsv" else ",")
    header = [h.strip().lower() for h in next(rows, [])]
    if "path" not in header or "label" not in header:
        d.errors.append(f"{csv_path}:1: the header must name the columns path,label[,split]")
        return d
    ip, il = header.index("path"), header.index("label")
    isplit = header.index("split") if "split" in header else None
    seen: dict[str, tuple[int, str]] = {}
    allowed = set(labels) if labels else None
    for lineno, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{csv_path}:{lineno}"
        if len(row) != len(header):
            d.errors.append(
                f"{where}: expected {len(header)} fields, got {len(row)} (quote commas)"
            )
            continue
        path, label = row[ip].strip(), nfc(row[il].strip())
        split = row[isplit].strip().lower() if isplit is not None else ""
        problem = _csv_problem(root, path, label, split, allowed)
        if problem:
            d.errors.append(f"{where}: {problem}")
            continue
        rel = _existing_rel(root, path)
        if rel is None:
            d.errors.append(f"{where}: file not found: {path}")
            continue
        if problem := _link_problem(root, rel, follow):
            d.errors.append(f"{where}: {path} {problem}")
            continue
        key = nfc(rel)
        if key in seen:
            first, first_label = seen[key]
            if first_label != label:
                d.errors.append(
                    f"{where}: {path} is labelled {label!r} but {first_label!r} on line {first}"
                )
            else:
                d.skip(rel, f"duplicate row: same file as line {first}", label)
            continue
        seen[key] = (lineno, label)
        d.candidates.append(
            Candidate(rel=rel, label=label, split=SPLIT_DIRS.get(split, ""), line=lineno)
        )
    d.classes = sorted({c.label for c in d.candidates} | set(labels or ()), key=natural_key)
    return d


def _csv_problem(root: Path, path: str, label: str, split: str, allowed: set[str] | None) -> str:
    if not path:
        return "empty path"
    if not label:
        return f"empty label for {path}"
    if "\r" in path + label:
        return f"{printable(path)!r}: a carriage return in a path or label; remove it"
    if allowed is not None and label not in allowed:
        return f"unknown label {label!r} (not in the given label list)"
    if split and split not in SPLIT_DIRS:
        return f"unknown split {split!r} (use train, val or test)"
    p = Path(path)
    if ".." in p.parts:
        return f"path {path} contains '..'; paths must stay inside the data root {root}"
    if p.is_absolute() and not _inside(root, Path(os.path.normpath(p))):
        return f"absolute path {path} is outside the data root {root}; pass --root to widen it"
    return ""


def _existing_rel(root: Path, path: str) -> str | None:
    """The on-disk relative path, trying NFC and NFD spellings (RELIABILITY 15).

    Anything but a folder counts: a FIFO or socket is then skipped by scan, never opened.
    """
    p = Path(path)
    rel = p.relative_to(root) if p.is_absolute() else p
    for form in (None, "NFC", "NFD"):
        cand = rel.as_posix() if form is None else unicodedata.normalize(form, rel.as_posix())
        if (root / cand).exists() and not (root / cand).is_dir():
            return cand
    return None


def _link_problem(root: Path, rel: str, follow: str) -> str:
    """Folder mode's symlink rule for a CSV row, on the resolved path (RELIABILITY 33): a link
    (the file or a folder on its way) may not lead outside the resolved data root."""
    real = Path(os.path.realpath(root / rel))
    if follow == "all" or real == root / rel:  # the root is resolved: no link on the way
        return ""
    if follow == "none":
        return (
            f"goes through a symlink (to {real}) and data.scan.follow_symlinks=none; "
            "name the real file, or set data.scan.follow_symlinks=inside"
        )
    if _inside(root, real):
        return ""
    return (
        f"resolves through a symlink to {real}, outside the data root {root}; copy the file "
        "into the root, pass --root to widen it, or set data.scan.follow_symlinks=all"
    )
