"""`imgclf scan`: discovery + a full decode of every candidate in worker processes → Manifest.

Each file is read once, hashed (sha256) and fully decoded, because a truncated JPEG passes
`verify()` and fails only on decode (docs/RELIABILITY.md 1). A re-scan reuses the previous
manifest's rows for files whose (path, size, mtime) are unchanged, so a large unchanged folder
re-scans in seconds.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from imgclf.config import ScanConfig
from imgclf.data.discover import Candidate, Discovery, discover, nfc
from imgclf.data.images import ImageLoadError, check_image
from imgclf.data.manifest import (
    MANIFEST_JSON,
    Entry,
    LabelMap,
    Manifest,
    natural_key,
    read_manifest,
    write_manifest,
)
from imgclf.errors import ImgclfError
from imgclf.files import (
    NotRegularFile,
    atomic_write_json,
    die_with_parent,
    open_regular,
    printable,
    special_kind,
    unusable_name,
)

REPORT_JSON = "scan_report.json"
# Settings that change what a check returns: rows are reused only when these match.
_CHECK_SETTINGS = ("max_pixels", "min_side")


def default_manifest_dir(source: Path) -> Path:
    """manifests/<name> in the working directory: never inside the user's data."""
    return Path("manifests") / (source.stem if source.is_file() else source.resolve().name)


def scan_to(
    source: Path,
    out_dir: Path,
    cfg: ScanConfig,
    *,
    root: Path | None = None,
    labels: list[str] | None = None,
    progress: bool = True,
) -> Manifest:
    """Scan `source`, reusing `out_dir`'s previous manifest, and write manifest + report there."""
    previous = None
    if (out_dir / MANIFEST_JSON).is_file():
        try:
            previous = read_manifest(out_dir)
        except (ImgclfError, KeyError, ValueError):
            previous = None  # an unreadable old manifest only costs a full re-scan
    manifest = scan(source, cfg, root=root, labels=labels, previous=previous, progress=progress)
    write_manifest(manifest, out_dir)
    atomic_write_json(out_dir / REPORT_JSON, manifest.report)
    return manifest


def scan(
    source: Path,
    cfg: ScanConfig,
    *,
    root: Path | None = None,
    labels: list[str] | None = None,
    previous: Manifest | None = None,
    progress: bool = True,
) -> Manifest:
    """Discover, check and hash every candidate; return the manifest with its report."""
    t0 = time.perf_counter()
    source = Path(source)
    if not source.exists():
        raise ImgclfError(f"{source} does not exist; pass a class-folder tree or a CSV file")
    labels = _label_list(labels)
    found = discover(source, cfg.follow_symlinks, root=root, labels=labels)
    if problem := unusable_name(found.root):
        # Manifest paths are text relative to the root, and the root is stored too.
        raise ImgclfError(
            f"the data root {printable(found.root)} cannot be stored in a manifest: "
            f"{problem.split(':')[0]}; rename the folder with that name"
        )
    reusable = _reusable_rows(previous, found.root, cfg)
    entries, reused = _check_all(found, cfg, reusable, progress)
    entries.extend(found.entries)
    entries.sort(key=lambda e: natural_key(e.path))
    errors = list(found.errors)
    dups = _duplicates(entries, cfg, errors)
    _class_checks(found, entries, errors)
    _skip_limit(entries, cfg, errors)
    if labels is not None and found.source == "folder":
        errors.extend(_label_mismatch(labels, found.classes, found.root))
    given = labels is not None and set(found.classes) <= set(labels)
    manifest = Manifest(
        root=found.root,
        entries=entries,
        labels=LabelMap(tuple(labels)) if given else LabelMap.from_names(found.classes),
        source=found.source,
        settings=cfg.model_dump(mode="json"),
        errors=errors,
        label_order="file" if given else "natural",
    )
    manifest.report = build_report(manifest, dups, reused, time.perf_counter() - t0)
    return manifest


# ---------------------------------------------------------------- label list


def _label_list(labels: list[str] | None) -> list[str] | None:
    """The `--labels` names in Unicode NFC (as class folders are read), checked for repeats."""
    if labels is None:
        return None
    names = [nfc(n) for n in labels]
    if not names:
        raise ImgclfError("the label list is empty; write one class name per line")
    if dups := sorted({n for n, c in Counter(names).items() if c > 1}, key=natural_key):
        raise ImgclfError(f"the label list names {dups} more than once; keep one line per class")
    return names


def _label_mismatch(labels: list[str], classes: list[str], root: Path) -> list[str]:
    """`--labels` fixes the order of a class-folder tree's classes: the two sets must match."""
    out = []
    if extra := [c for c in classes if c not in set(labels)]:
        out.append(
            f"class folder(s) in {root} missing from the label list: {extra}; "
            "add them to the list (its order is the label order)"
        )
    if missing := [n for n in labels if n not in set(classes)]:
        out.append(
            f"label(s) in the list with no class folder in {root}: {missing}; "
            "remove them from the list or add the folders"
        )
    return out


# ---------------------------------------------------------------- checking


def _reusable_rows(previous: Manifest | None, root: Path, cfg: ScanConfig) -> dict[str, Entry]:
    if previous is None or Path(previous.root) != root:
        return {}
    if any(previous.settings.get(k) != getattr(cfg, k) for k in _CHECK_SETTINGS):
        return {}
    return {e.path: e for e in previous.entries if e.status != "ignored" and e.sha256}


def _check_all(
    found: Discovery, cfg: ScanConfig, reusable: dict[str, Entry], progress: bool
) -> tuple[list[Entry], int]:
    """Stat every candidate; decode only the new or changed ones, in parallel."""
    done: list[Entry] = []
    todo: list[tuple[Candidate, os.stat_result]] = []
    root = str(found.root)
    for c in found.candidates:
        try:
            st = os.stat(os.path.join(root, c.rel))
        except OSError as e:
            done.append(_entry(c, status="skipped", reason=f"unreadable: {e.strerror}"))
            continue
        if kind := special_kind(st.st_mode):  # a FIFO would block the worker that opens it
            done.append(_entry(c, status="skipped", reason=f"not a regular file: {kind}"))
            continue
        old = reusable.get(c.rel)
        if old and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            done.append(replace(old, label=c.label, split=c.split))
        else:
            todo.append((c, st))
    reused = len(done)
    jobs = [(str(found.root / c.rel), cfg.max_pixels, cfg.min_side) for c, _ in todo]
    for (c, st), result in zip(todo, _run_checks(jobs, cfg.workers, progress), strict=True):
        done.append(_entry(c, size=st.st_size, mtime_ns=st.st_mtime_ns, **result))
    return done, reused


def _entry(c: Candidate, **fields: Any) -> Entry:
    return Entry(path=c.rel, label=c.label, split=c.split, **fields)


def _run_checks(jobs: list[tuple[str, int, int]], workers: int, progress: bool) -> Iterator[dict]:
    n = workers or os.cpu_count() or 1
    if n == 1 or len(jobs) < 64:  # a pool costs more than it saves on a handful of files
        results: Iterator[dict] = map(check_file, jobs)
        yield from _with_progress(results, len(jobs), progress)
        return
    pool = ProcessPoolExecutor(n, initializer=die_with_parent, initargs=(os.getpid(),))
    with pool:
        chunk = max(1, min(64, len(jobs) // (n * 8)))
        yield from _with_progress(pool.map(check_file, jobs, chunksize=chunk), len(jobs), progress)


def _with_progress(results: Iterator[dict], total: int, show: bool) -> Iterator[dict]:
    if not show or total == 0:
        yield from results
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("decoding images", total=total)
        for r in results:
            bar.advance(task)
            yield r


def check_file(job: tuple[str, int, int]) -> dict:
    """Worker: read once, hash, fully decode. Returns Entry fields as plain values."""
    path, max_pixels, min_side = job
    try:
        with open_regular(path) as f:  # checked again: the file may have changed since stat
            data = f.read()
    except NotRegularFile as e:
        return {"status": "skipped", "reason": f"not a regular file: {e.kind}"}
    except OSError as e:
        return {"status": "skipped", "reason": f"unreadable: {e.strerror or e}"}
    sha = hashlib.sha256(data).hexdigest()
    try:
        info = check_image(data, max_pixels=max_pixels, min_side=min_side)
    except ImageLoadError as e:
        reason = e.kind + (f": {e.detail}" if e.detail else "")
        if e.kind.startswith("unsupported format") or e.kind == "not an image":
            reason = e.kind  # grouped per extension in the report
        return {"status": "skipped", "reason": reason, "sha256": sha}
    notes = list(info.notes)
    ext = os.path.splitext(path)[1].lower()
    if ext and info.format and not _extension_matches(ext, info.format):
        notes.insert(0, f"extension {ext} but content is {info.format}")
    return {
        "status": "ok",
        "reason": "; ".join(notes),
        "sha256": sha,
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "mode": info.mode,
        "frames": info.frames,
    }


_EXT_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".jp2": "JPEG2000",
    ".ico": "ICO",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
    ".avif": "AVIF",
    ".heic": "HEIF",
    ".heif": "HEIF",
}


def _extension_matches(ext: str, fmt: str) -> bool:
    return _EXT_FORMATS.get(ext, fmt) == fmt


# ---------------------------------------------------------------- findings


def _duplicates(entries: list[Entry], cfg: ScanConfig, errors: list[str]) -> dict[str, list]:
    """Identical bytes: within a class (warning), across classes (label conflict), across splits."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.ok:
            groups[e.sha256].append(e)
    out: dict[str, list] = {"within_class": [], "across_classes": [], "across_splits": []}
    for group in groups.values():
        if len(group) < 2:
            continue
        paths = [f"{e.path} ({e.label})" for e in group]
        if len({e.label for e in group}) > 1:
            out["across_classes"].append(paths)
            if cfg.label_conflicts == "skip":
                for e in group:
                    e.status, e.reason = (
                        "skipped",
                        "label conflict: identical bytes under another label",
                    )
            else:
                errors.append(
                    "identical bytes under different labels: "
                    + " = ".join(paths)
                    + " (fix the labels, or set data.scan.label_conflicts=skip)"
                )
        else:
            out["within_class"].append([e.path for e in group])
        if len({e.split for e in group}) > 1:
            out["across_splits"].append([f"{e.path} ({e.split})" for e in group])
    return out


def _class_checks(found: Discovery, entries: list[Entry], errors: list[str]) -> None:
    ok_per_class = Counter(e.label for e in entries if e.ok)
    labelled = {c.label for c in found.candidates}
    for label in found.classes:
        if label in labelled and not ok_per_class[label]:
            errors.append(
                f"class {label!r} has no usable images (all were skipped; see the report)"
            )
    if not ok_per_class:
        status = Counter(e.status for e in entries)
        errors.append(
            f"0 usable images after filtering in {found.root}: {status.get('skipped', 0)} skipped, "
            f"{status.get('ignored', 0)} ignored; see the reasons in the report"
        )


def _skip_limit(entries: list[Entry], cfg: ScanConfig, errors: list[str]) -> None:
    ok = sum(e.ok for e in entries)
    skipped = sum(e.status == "skipped" for e in entries)
    if ok + skipped and skipped / (ok + skipped) > cfg.max_skipped_fraction:
        errors.append(
            f"{skipped} of {ok + skipped} image files were skipped, more than the limit "
            f"data.scan.max_skipped_fraction={cfg.max_skipped_fraction:g}"
        )


def build_report(m: Manifest, dups: dict[str, list], reused: int, seconds: float) -> dict:
    ok = m.ok_entries
    per_class = Counter(e.label for e in ok)
    counts = [per_class[c] for c in m.labels.names]
    skipped: dict[str, list[str]] = defaultdict(list)
    ignored: Counter[str] = Counter()
    unsupported: Counter[str] = Counter()
    for e in m.entries:
        if e.status == "skipped":
            skipped[e.reason.split(":")[0]].append(e.path)
            if e.reason.startswith("unsupported format"):
                unsupported[os.path.splitext(e.path)[1].lower() or "(none)"] += 1
        elif e.status == "ignored":
            ignored[e.reason] += 1
    # The notes as written ("16-bit scaled to 8-bit"): their numbers are the information.
    normalised: Counter[str] = Counter(note for e in ok for note in e.reason.split("; ") if note)
    by_split = Counter((e.split, e.label) for e in ok if e.split)
    splits = {
        s: {c: by_split[s, c] for c in m.labels.names}
        for s in ("train", "val", "test")
        if any(k[0] == s for k in by_split)
    }
    return {
        "root": str(m.root),
        "source": m.source,
        "files": {
            "ok": len(ok),
            "skipped": sum(map(len, skipped.values())),
            "ignored": sum(ignored.values()),
            "reused": reused,
        },
        "classes": {c: per_class[c] for c in m.labels.names},
        "imbalance_ratio": round(max(counts) / min(counts), 3) if counts and min(counts) else None,
        "imbalance_note": imbalance_note(counts),
        "splits": splits,
        "skipped_by_reason": dict(sorted(skipped.items())),
        "ignored_by_kind": dict(ignored.most_common()),
        "unsupported_by_extension": dict(unsupported.most_common()),
        "normalised": dict(normalised.most_common()),
        "duplicates": dups,
        "sizes": _size_stats(ok),
        "modes": dict(Counter(e.mode for e in ok).most_common()),
        "formats": dict(Counter(e.format for e in ok).most_common()),
        "errors": m.errors,
        "seconds": round(seconds, 3),
    }


IMBALANCE_NOTE_RATIO = 3.0


def imbalance_note(counts: list[int]) -> str | None:
    """From a largest / smallest class ratio of 3 up: the train.imbalance settings that exist."""
    if not counts or not min(counts) or max(counts) / min(counts) < IMBALANCE_NOTE_RATIO:
        return None
    return (
        f"the largest class has {max(counts) / min(counts):.1f}× the images of the smallest: "
        "training can counter it with train.imbalance=weighted_loss (class weights in the "
        "loss), sampler (classes drawn equally often) or focal (focal loss); default none"
    )


def _size_stats(ok: list[Entry]) -> dict[str, dict[str, float]]:
    if not ok:
        return {}
    out = {}
    for dim in ("width", "height"):
        vals = [getattr(e, dim) for e in ok]
        out[dim] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    return out
