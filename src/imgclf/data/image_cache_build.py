"""Writing one image cache entry: decode every image once, in parallel, into a memory map.

The entry is built in a temporary folder `.<key>.XXXXXXXX` beside its final place, holding a
`.owner` file (host and pid) while the build runs, so that a later builder, or `imgclf doctor`,
can tell a dead builder's leftovers from a live one's. The pixels go into a preallocated file
(a full disk under a memory map is SIGBUS, not an error), decoded by worker processes that
each map the file and write their own rows; meta.json is written last and the folder renamed
into place by `ImageCache._publish`. Anything half-written is removed, on failure here or by the
next build of the same key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from imgclf.data.image_cache import (
    CACHE_FORMAT,
    IMAGES_FILE,
    META_FILE,
    CacheSpec,
    ImageCache,
    Log,
    estimate_bytes,
    paths_digest,
    square_pixels,
)
from imgclf.data.images import ImageLoadError, load_image
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json, die_with_parent, file_sha256

OWNER_FILE = ".owner"  # host and pid of the builder, inside its temporary folder only


def build_entry(
    cache: ImageCache,
    key: str,
    paths: list[str],
    rel_paths: Sequence[str],
    data_version: str,
    spec: CacheSpec,
    workers: int | None,
    progress: bool,
    log: Log | None,
) -> None:
    """Decode `paths` into a new entry `key` of `cache`; published whole or not at all."""
    root = cache.root
    root.mkdir(parents=True, exist_ok=True)
    discard_stale(cache, key)
    n, nbytes = len(paths), estimate_bytes(len(paths), spec.stored)
    _check_free_space(root, nbytes)
    if log:
        log(f"caching {n} decoded images at {spec.stored} px ({_gib(nbytes)}) in {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()}\n{os.getpid()}\n")
        file = tmp / IMAGES_FILE
        _allocate(file, nbytes, root)
        reasons = _decode_all(file, paths, spec, workers, progress)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "n": n,
            "stored": spec.stored,
            "layout": "NHWC uint8",
            **{k: v for k, v in asdict(spec).items() if k != "size_hint"},
            "size_hint": spec.hint,
            "data_version": data_version,
            "paths_sha256": paths_digest(rel_paths),
            "ok": [not r for r in reasons],
            "reasons": reasons,
            "sha256": {IMAGES_FILE: file_sha256(file)},
        }
        atomic_write_json(tmp / META_FILE, meta)
        (tmp / OWNER_FILE).unlink()
        cache._publish(tmp, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        bad = sum(map(bool, reasons))
        log(f"cached {n} images ({bad} could not be loaded) as {root / key}")


def discard_stale(cache: ImageCache, key: str) -> None:
    """Remove what would block a rebuild: an invalid entry, dead builders' folders."""
    folder = cache.root / key
    if folder.exists() and cache.read_meta(key) is None:
        # Renamed away first so no reader ever sees it half-deleted.
        trash = tempfile.mkdtemp(prefix=f".{key}.", dir=cache.root)
        with contextlib.suppress(OSError):  # another builder moved it already
            os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for tmp in cache.root.glob(f".{key}.*"):
        if tmp.is_dir() and _owner_is_dead(tmp / OWNER_FILE):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- space and owners


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _no_space(root: Path, nbytes: int, detail: str) -> ImgclfError:
    return ImgclfError(
        f"no space left for the image cache in {root}: it needs {_gib(nbytes)} ({detail}); "
        "free space there, set IMGCLF_CACHE to a disk with room, or turn the cache off with "
        "data.cache=none"
    )


def _check_free_space(root: Path, nbytes: int) -> None:
    free = shutil.disk_usage(root).free
    if nbytes > free:
        raise _no_space(root, nbytes, f"{_gib(free)} free")


def _allocate(file: Path, nbytes: int, root: Path) -> None:
    """Reserve every block now: a full disk under a memory map is SIGBUS, not an error."""
    try:
        with open(file, "wb") as f:
            if nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_space(root, nbytes, os.strerror(e.errno)) from e
        raise


def _owner_is_dead(owner: Path) -> bool:
    try:
        host, pid = owner.read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False  # no owner recorded, or alive under another user: leave it
    return False


# ---------------------------------------------------------------------- decoding

_Job = tuple[str, int, CacheSpec, list[tuple[int, str]]]


def decode_chunk(job: _Job) -> list[tuple[int, str]]:
    """Worker: decode a chunk of images into the memory-mapped file; (index, reason) each."""
    file, n, spec, items = job
    s = spec.stored
    out = np.memmap(file, dtype=np.uint8, mode="r+", shape=(n, s, s, 3))
    results = []
    for i, path in items:
        try:
            image = load_image(
                path, max_pixels=spec.max_pixels, min_side=spec.min_side, size_hint=spec.hint
            )
        except ImageLoadError as e:
            results.append((i, e.kind + (f": {e.detail}" if e.detail else "")))
            continue
        out[i] = square_pixels(image, spec)
        results.append((i, ""))
    del out  # unmapped; the parent fsyncs the file once
    return results


def _decode_all(
    file: Path, paths: list[str], spec: CacheSpec, workers: int | None, progress: bool
) -> list[str]:
    n = len(paths)
    if not n:
        return []
    procs = (os.cpu_count() or 1) if workers is None else workers
    if workers is None and n < 64:  # a pool costs more than it saves on a handful of files
        procs = 0
    chunk = max(1, min(64, n // (max(procs, 1) * 8)))
    items = list(enumerate(paths))
    jobs = [(str(file), n, spec, items[i : i + chunk]) for i in range(0, n, chunk)]
    reasons = [""] * n
    if procs <= 1:
        done: Iterator[list] = map(decode_chunk, jobs)
        for i, reason in _with_progress(done, n, progress):
            reasons[i] = reason
    else:
        # Workers die with this process, even under kill -9: none is left decoding.
        pool = ProcessPoolExecutor(procs, initializer=die_with_parent, initargs=(os.getpid(),))
        with pool:
            for i, reason in _with_progress(pool.map(decode_chunk, jobs), n, progress):
                reasons[i] = reason
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
    return reasons


def _with_progress(chunks: Iterator[list], total: int, show: bool) -> Iterator[tuple[int, str]]:
    if not show:
        for results in chunks:
            yield from results
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("caching images", total=total)
        for results in chunks:
            bar.advance(task, len(results))
            yield from results
