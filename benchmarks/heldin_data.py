"""The held-in development data set for `imgclf fit`: 9 classes of Debian's openclipart-png.

    .venv/bin/python benchmarks/heldin_data.py [--deb FILE] [--dest DIR] [--force]
    make heldin-data

Real clip-art drawings (PNG, most with transparency) from the Debian package openclipart-png,
one class per top-level category (animals, buildings, food, geography, office, people, plants,
tools, transportation); sub-folders are flattened into their class (`birds/owl.png` becomes
`birds_owl.png`). Written once into `$IMGCLF_CACHE/datasets/openclipart9/` (never committed):

- the .deb comes from `apt-get download openclipart-png` (no root needed on most systems, nothing
  installed) into a temporary folder inside the cache, or from `--deb FILE`; it is unpacked
  there with `dpkg-deb -x` and the temporary folder is removed;
- symbolic links in the package are read as the file they point to (only inside the package);
- bytes found under two classes are dropped everywhere (imgclf's scan would stop on the label
  conflict); bytes found twice in one class are kept once (the first path in sorted order);
- the tree is built in a hidden sibling folder and renamed into place; the marker
  `openclipart9.complete` beside it (written last) records the package version, the counts and
  every file's sha256, so a later call is a no-op (and `--force` rebuilds).

Nothing outside the cache folder is modified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.example import cache_dir
from imgclf.files import atomic_write_text

PACKAGE = "openclipart-png"
NAME = "openclipart9"
PNG_ROOT = "usr/share/openclipart/png"
CLASSES = (
    "animals",
    "buildings",
    "food",
    "geography",
    "office",
    "people",
    "plants",
    "tools",
    "transportation",
)


class FetchError(RuntimeError):
    """What went wrong, and what to install or run by hand."""


def dataset_folder(cache: Path | None = None) -> Path:
    """$IMGCLF_CACHE/datasets/openclipart9 (IMGCLF_CACHE defaults to ~/.cache/imgclf)."""
    return (cache or cache_dir()) / "datasets" / NAME


def marker_path(dest: Path) -> Path:
    """Outside the tree, so imgclf's scan never sees it."""
    return dest.parent / f"{dest.name}.complete"


def is_complete(dest: Path) -> bool:
    return dest.is_dir() and marker_path(dest).is_file()


def safe_name(rel: str) -> str:
    """`sub/dir/x.png` → `sub_dir_x.png`: every run of characters other than letters, digits,
    `.`, `_` and `-` becomes `_`; never hidden, never starting with `-`; lower-case `.png`."""
    stem = rel[: -len(".png")] if rel.lower().endswith(".png") else rel
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "_")).lstrip(".-") or "image"
    return f"{stem}.png"


@dataclass
class Plan:
    """What goes where: {class: [(file name, source path)]}, and what was left out."""

    files: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)
    found: Counter = field(default_factory=Counter)
    within_class_duplicates: Counter = field(default_factory=Counter)
    cross_class_dropped: Counter = field(default_factory=Counter)
    cross_class_groups: list[list[str]] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # "class/name" → sha256


def _pngs(folder: Path, top: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(path relative to `folder` in POSIX form, path) of every *.png below it, sorted, and the
    links left out: links are followed only to files inside `top` (the package's png folder)."""
    found, outside = [], []
    top_real = top.resolve()
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            real = path.resolve()
            if not name.lower().endswith(".png") or not real.is_file():
                continue
            if path.is_symlink() and not real.is_relative_to(top_real):
                outside.append(str(path))
            else:
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found), sorted(outside)


def plan(png_root: Path, classes: tuple[str, ...] | None = None) -> Plan:
    """Read every PNG of `classes` (default CLASSES) under `png_root`; decide names and
    duplicates."""
    classes = classes or CLASSES
    result = Plan()
    by_digest: dict[str, list[tuple[str, str, Path]]] = defaultdict(list)
    for label in classes:
        folder = png_root / label
        if not folder.is_dir():
            raise FetchError(f"{folder} is missing: is this the {PACKAGE} package?")
        found, outside = _pngs(folder, png_root)
        result.outside_links += outside
        for rel, path in found:
            result.found[label] += 1
            by_digest[hashlib.sha256(path.read_bytes()).hexdigest()].append((label, rel, path))
    keep: dict[str, list[tuple[str, Path, str]]] = defaultdict(list)
    for digest, copies in by_digest.items():
        labels = {label for label, _, _ in copies}
        if len(labels) > 1:
            for label, _, _ in copies:
                result.cross_class_dropped[label] += 1
            result.cross_class_groups.append(sorted(f"{lb}/{rel}" for lb, rel, _ in copies))
            continue
        label, rel, path = min(copies, key=lambda c: c[1])
        result.within_class_duplicates[label] += len(copies) - 1
        keep[label].append((rel, path, digest))
    for label in classes:
        names: set[str] = set()
        result.files[label] = []
        for rel, path, digest in sorted(keep[label], key=lambda t: t[0]):
            name = safe_name(rel)
            if name.casefold() in names:  # two paths flattened to one name
                name = f"{name[: -len('.png')]}_{digest[:8]}.png"
            names.add(name.casefold())
            result.files[label].append((name, path))
            result.digests[f"{label}/{name}"] = digest
    result.cross_class_groups.sort()
    return result


def write_tree(p: Plan, dest: Path, source: dict | None = None) -> Path:
    """Write the planned class folders to `dest` atomically, then the marker beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        for label, files in p.files.items():
            (tmp / label).mkdir()
            for name, path in files:
                (tmp / label / name).write_bytes(path.read_bytes())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {
        "source": source or {},
        "classes": {label: len(files) for label, files in p.files.items()},
        "found": dict(p.found),
        "within_class_duplicates": dict(p.within_class_duplicates),
        "cross_class_dropped": dict(p.cross_class_dropped),
        "cross_class_groups": p.cross_class_groups,
        "outside_links": p.outside_links,
        "sha256": p.digests,
    }
    atomic_write_text(marker_path(dest), json.dumps(record, indent=1) + "\n")
    return dest


def print_counts(p: Plan, dest: Path) -> None:
    print(f"{'class':<16}{'found':>7}{'kept':>7}{'dup in class':>14}{'in 2 classes':>14}")
    for label, files in p.files.items():
        print(
            f"{label:<16}{p.found[label]:>7}{len(files):>7}"
            f"{p.within_class_duplicates[label]:>14}{p.cross_class_dropped[label]:>14}"
        )
    total = sum(len(f) for f in p.files.values())
    print(
        f"{'total':<16}{sum(p.found.values()):>7}{total:>7}"
        f"{sum(p.within_class_duplicates.values()):>14}{sum(p.cross_class_dropped.values()):>14}"
    )
    if p.outside_links:
        print(f"{len(p.outside_links)} links pointing outside the package were not followed")
    print(f"{total} images in {len(p.files)} classes → {dest}")


# ---------------------------------------------------------------- the package


def _hint() -> str:
    return (
        f"fetch the package by hand (nothing is installed): `apt-get update && apt-get download "
        f"{PACKAGE}` (with sudo if apt refuses; Debian/Ubuntu, the `main` archive), then run "
        f"`python benchmarks/heldin_data.py --deb {PACKAGE}_*.deb`"
    )


def download_deb(folder: Path) -> Path:
    """`apt-get download openclipart-png` into `folder`; the .deb's path."""
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get is not available on this machine; {_hint()}")
    print(f"apt-get download {PACKAGE} (about 131 MB) …", flush=True)
    done = subprocess.run(
        ["apt-get", "download", "-q", PACKAGE], cwd=folder, capture_output=True, text=True
    )
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        user = "" if os.geteuid() == 0 else " (not running as root)"
        raise FetchError(
            f"`apt-get download {PACKAGE}` failed{user}: {' / '.join(detail) or 'no .deb'}; "
            + _hint()
        )
    return debs[-1]


def extract_deb(deb: Path, into: Path) -> tuple[Path, dict]:
    """`dpkg-deb -x` the package into `into`; its png folder and {package, version, deb}."""
    if shutil.which("dpkg-deb") is None:
        raise FetchError(
            "dpkg-deb is not available (Debian's dpkg package); unpack the .deb by hand "
            f"(`ar x {deb.name}` then `tar xf data.tar.xz`) and point --png-root at {PNG_ROOT}"
        )
    print(f"dpkg-deb -x {deb.name} …", flush=True)
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(f"`dpkg-deb -x {deb}` failed: {done.stderr.strip()}")
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True
    ).stdout
    info = dict(ln.split(": ", 1) for ln in fields.splitlines() if ": " in ln)
    source = {"package": info.get("Package", PACKAGE), "version": info.get("Version", "")}
    return into / PNG_ROOT, {**source, "deb": deb.name}


def fetch(
    dest: Path | None = None,
    *,
    deb: Path | None = None,
    png_root: Path | None = None,
    force: bool = False,
) -> Path:
    """The class-folder tree, built once (a no-op when its marker is there)."""
    dest = dest or dataset_folder()
    if is_complete(dest) and not force:
        counts = json.loads(marker_path(dest).read_text())["classes"]
        print(f"{sum(counts.values())} images in {len(counts)} classes already at {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if png_root is not None:
        p = plan(png_root)
        write_tree(p, dest, {"png_root": str(png_root)})
        print_counts(p, dest)
        return dest
    # Downloads and unpacks inside the cache (removed afterwards): nothing else is touched.
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-fetch-", dir=dest.parent) as work:
        work = Path(work)
        deb = deb.resolve() if deb else download_deb(work)
        root, source = extract_deb(deb, work / "x")
        p = plan(root)
        write_tree(p, dest, source)
    print_counts(p, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, help=f"default: $IMGCLF_CACHE/datasets/{NAME}")
    ap.add_argument("--deb", type=Path, help=f"use this {PACKAGE} .deb instead of apt-get")
    ap.add_argument("--png-root", type=Path, help=f"an unpacked package's {PNG_ROOT} folder")
    ap.add_argument("--force", action="store_true", help="rebuild even when already present")
    args = ap.parse_args(argv)
    try:
        fetch(args.dest, deb=args.deb, png_root=args.png_root, force=args.force)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
