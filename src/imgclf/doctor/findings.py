"""What every check returns: a `Finding` per report line, the `Places` it looks in, and the
wording helpers the report lines share (sizes, short lists of names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "problem"]


@dataclass
class Finding:
    """One line of the report; `paths` are what it names, deleted by --fix when `removable`."""

    check: str
    status: Status
    detail: str
    fix: str = ""
    paths: list[Path] = field(default_factory=list)
    removable: bool = False
    fixed: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "paths": [str(p) for p in self.paths]}


@dataclass(frozen=True)
class Places:
    """The folders imgclf would use: runs, its cache ($IMGCLF_CACHE), manifests."""

    runs: Path
    cache: Path
    manifests: Path
    uri: str | None = None  # tracking.uri; None: the SQLite store beside the runs


def name_list(items: list, n: int = 3) -> str:
    """The first `n` items, and how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def human_size(n: float) -> str:
    """A byte count in decimal units: 512 B, 1.5 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
