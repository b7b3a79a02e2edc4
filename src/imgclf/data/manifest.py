"""Manifest and LabelMap: the data layer's output, read by every later step.

On disk a manifest is a folder with two files:
  manifest.csv   one row per file seen (ok, skipped or ignored), paths relative to the root
  manifest.json  root, source, the label map, scan settings, report summary and errors
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json, atomic_write_text

MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


def natural_key(name: str) -> list[Any]:
    """Sort key that puts class_2 before class_10 (docs/RELIABILITY.md 24)."""
    parts = re.split(r"(\d+)", unicodedata.normalize("NFC", name))
    return [(0, int(p), p) if p.isdecimal() else (1, p.casefold(), p) for p in parts if p != ""]


def collision_key(name: str) -> str:
    """Names that differ only by case, spaces or Unicode form share this key (RELIABILITY 26)."""
    return re.sub(r"[\s_\-]+", "", unicodedata.normalize("NFKC", name).casefold())


@dataclass(frozen=True)
class LabelMap:
    """The explicit, ordered class list: index i is class names[i], saved and reused everywhere."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            dup = [n for n, c in Counter(self.names).items() if c > 1]
            raise ImgclfError(f"label map has duplicate class names: {dup}")

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LabelMap:
        """Natural order, never directory-listing order."""
        return cls(tuple(sorted(set(names), key=lambda n: (natural_key(n), n))))

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ImgclfError(
                f"unknown class {name!r}; the label map has {len(self.names)} classes: "
                f"{', '.join(self.names[:20])}{' …' if len(self.names) > 20 else ''}"
            ) from None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Entry:
    """One file seen by scan. `path` is relative to the manifest root, in POSIX form."""

    path: str
    label: str = ""
    split: str = ""
    status: str = "ok"  # ok | skipped | ignored
    reason: str = ""
    sha256: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    frames: int = 0
    size: int = 0
    mtime_ns: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


COLUMNS = [f.name for f in fields(Entry)]
_INT_COLUMNS = {f.name for f in fields(Entry) if f.type in ("int", int)}


@dataclass
class Manifest:
    """Entries plus everything needed to read them again: root, label map, settings, findings."""

    root: Path
    entries: list[Entry]
    labels: LabelMap
    source: str = "folder"  # folder | csv
    settings: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # The scanned folder or CSV (absolute): two sources never share a manifest folder silently.
    origin: str = ""
    label_order: str = "natural"  # natural | file (`scan --labels FILE`: kept by re-scans)

    @property
    def ok_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.ok]

    @property
    def usable(self) -> bool:
        return not self.errors and bool(self.ok_entries)

    @property
    def has_split(self) -> bool:
        ok = self.ok_entries
        return bool(ok) and all(e.split in SPLITS for e in ok)

    def split_entries(self, split: str) -> list[Entry]:
        return [e for e in self.entries if e.ok and e.split == split]

    def data_hash(self) -> str:
        """Content hash of what training sees: the data version."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.labels.names)).encode())
        for e in sorted(self.ok_entries, key=lambda e: e.path):
            h.update(f"{e.path}\t{e.label}\t{e.split}\t{e.sha256}\n".encode())
        return h.hexdigest()

    def require_usable(self, where: Path | str | None = None) -> None:
        """Stop with the scan's errors when the data cannot be trained on."""
        if self.errors:
            listing = "\n  - ".join(self.errors)
            raise ImgclfError(f"the data in {where or self.root} is not usable:\n  - {listing}")
        if not self.ok_entries:
            raise ImgclfError(
                f"0 usable images in {self.root} after filtering "
                f"({Counter(e.status for e in self.entries)}); see the scan report"
            )


def entries_to_csv(entries: Sequence[Entry]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    # attrgetter instead of dataclasses.asdict: asdict deep-copies and is 10x slower here.
    row = attrgetter(*COLUMNS)
    w.writerows(row(e) for e in entries)
    return buf.getvalue()


def entries_from_csv(path: Path) -> list[Entry]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        kw = {
            k: (int(v) if k in _INT_COLUMNS and v != "" else v)
            for k, v in row.items()
            if k in COLUMNS
        }
        for k in _INT_COLUMNS:
            kw.setdefault(k, 0)
            if kw[k] == "":
                kw[k] = 0
        out.append(Entry(**kw))
    return out


def write_manifest(manifest: Manifest, out_dir: str | Path) -> Path:
    """Write manifest.csv then manifest.json (the json last: it marks a complete manifest)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / MANIFEST_CSV, entries_to_csv(manifest.entries))
    meta = {
        "format_version": FORMAT_VERSION,
        "root": str(manifest.root),
        "source": manifest.source,
        "origin": manifest.origin,
        "labels": list(manifest.labels.names),
        "label_order": manifest.label_order,
        "data_hash": manifest.data_hash(),
        "has_split": manifest.has_split,
        "settings": manifest.settings,
        "errors": manifest.errors,
        "report": manifest.report,
    }
    atomic_write_json(out_dir / MANIFEST_JSON, meta)
    return out_dir


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest folder (or its manifest.json / manifest.csv)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_path, csv_path = folder / MANIFEST_JSON, folder / MANIFEST_CSV
    if not meta_path.is_file() or not csv_path.is_file():
        raise ImgclfError(
            f"{folder} is not a manifest folder (expected {MANIFEST_JSON} and {MANIFEST_CSV}); "
            f"create one with `imgclf scan DATA -o {folder}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ImgclfError(f"{meta_path} is not valid JSON ({e}); re-run `imgclf scan`") from e
    return Manifest(
        root=Path(meta["root"]),
        entries=entries_from_csv(csv_path),
        labels=LabelMap(tuple(meta["labels"])),
        source=meta.get("source", "folder"),
        settings=meta.get("settings", {}),
        report=meta.get("report", {}),
        errors=meta.get("errors", []),
        origin=meta.get("origin", ""),
        label_order=meta.get("label_order", "natural"),
    )
