"""The files imgclf wrote: feature-cache entries, decode-once image-cache entries and the example
data against the sha256 digests recorded when they were written, every run's `last.pt` (digest)
and `model.safetensors` (it loads), and stale temporary files of interrupted atomic writes. A
flipped byte or a half-written file otherwise surfaces much later, as a wrong result or a failed
resume; only cache entries and stale temporaries are `removable`, since they are rebuilt on use —
run files never are, nor a temporary folder whose `.owner` builder is alive on this host."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from imgclf.doctor.findings import Finding, Places, human_size, name_list
from imgclf.errors import ImgclfError
from imgclf.files import file_sha256
from imgclf.runs.layout import CONFIG_YAML, MODEL_WEIGHTS, SUMMARY_JSON

FEATURE_FILES = ("x.npy", "y.npy", "ok.npy")
# tempfile's random part is 8 characters of [a-z0-9_]: io.atomic_write makes `.{name}.XXXXXXXX.tmp`
# beside its target, the feature and example caches `mkdtemp(prefix=".{name}.")` folders.
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^\..+\.[a-z0-9_]{8}$")
# A builder's `host pid` inside its temporary folder (data/image_cache.py's ImageCache writes one).
OWNER_FILE = ".owner"


# feature cache --------------------------------------------------------------------------------


def check_feature_cache(root: Path) -> list[Finding]:
    """Every cached feature entry against the sha256 digests in its meta.json."""
    if not root.is_dir():
        return [Finding("feature cache", "ok", f"none at {root}")]
    out, verified, unverified = [], [], []
    delete = "delete the entry (imgclf doctor --fix does); the next run needing it recomputes it"
    for entry in subdirs(root):
        why, has_digests = _entry_problem(entry)
        if why:
            out.append(
                Finding("feature cache", "problem", f"{entry}: {why}", delete, [entry], True)
            )
        else:
            (verified if has_digests else unverified).append(entry)
    if unverified:
        detail = (
            f"{len(unverified)} entries in {root} "
            f"({human_size(sum(map(tree_size, unverified)))}) "
            "predate recorded digests: they load but cannot be verified by hash"
        )
        fix = f"delete them to rebuild them with digests: rm -r {root}/<key>"
        out.append(Finding("feature cache", "warn", detail, fix, unverified))
    if verified or not out:
        detail = (
            f"{len(verified)} entries verified by sha256 "
            f"({human_size(sum(map(tree_size, verified)))})"
        )
        out.append(Finding("feature cache", "ok", detail))
    return out


def _entry_problem(entry: Path) -> tuple[str | None, bool]:
    """(what is wrong with a feature cache entry or None, whether digests were checked)."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "incomplete (no meta.json); it keeps its key from being cached again", False
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({e})", False
    digests = meta.get("sha256") if isinstance(meta, dict) else None
    missing = [n for n in FEATURE_FILES if not (entry / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing", isinstance(digests, dict)
    if isinstance(digests, dict):
        for name in FEATURE_FILES:
            if digests.get(name) != file_sha256(entry / name):
                return f"{name} does not match the sha256 recorded in meta.json", True
        return None, True
    import numpy as np

    for name in FEATURE_FILES:
        try:
            np.load(entry / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{name} does not load ({e})", False
    return None, False


# image cache ----------------------------------------------------------------------------------


def check_image_cache(root: Path) -> list[Finding]:
    """Every decode-once image cache entry: complete (ImageCache.read_meta) and its images.u8
    against the sha256 in its meta.json, read in 1 MiB blocks (entries can be many GB)."""
    if not root.is_dir():
        return [Finding("image cache", "ok", f"none at {root}")]
    from imgclf.data.image_cache import ImageCache

    cache = ImageCache(root)
    out, verified, hashed = [], [], 0
    delete = (
        "delete the entry (imgclf doctor --fix does); the next run needing it decodes the "
        "images again"
    )
    for entry in subdirs(root):
        why, nbytes = _image_entry_problem(cache, entry)
        if why:
            out.append(Finding("image cache", "problem", f"{entry}: {why}", delete, [entry], True))
        else:
            verified.append(entry)
            hashed += nbytes
    if verified or not out:
        detail = (
            f"{len(verified)} entries verified by sha256 "
            f"({human_size(sum(map(tree_size, verified)))}; {human_size(hashed)} of pixels hashed)"
        )
        out.append(Finding("image cache", "ok", detail))
    return out


def _image_entry_problem(cache, entry: Path) -> tuple[str | None, int]:
    """(what is wrong with an image cache entry or None, bytes of images.u8 hashed)."""
    from imgclf.data.image_cache import CACHE_FORMAT, IMAGES_FILE, META_FILE, estimate_bytes

    meta = cache.read_meta(entry.name)
    if meta is None:  # incomplete or inconsistent: say which, as read_meta does not
        return f"incomplete or inconsistent ({_image_meta_problem(entry)})", 0
    digest = meta.get("sha256")
    recorded = digest.get(IMAGES_FILE) if isinstance(digest, dict) else None
    if not isinstance(recorded, str):
        return f"{META_FILE} records no sha256 of {IMAGES_FILE} (format {CACHE_FORMAT} does)", 0
    images = entry / IMAGES_FILE
    try:
        actual = file_sha256(images)
    except OSError as e:
        return f"{IMAGES_FILE} is unreadable ({e})", 0
    nbytes = estimate_bytes(meta["n"], meta["stored"])
    if actual != recorded:
        return f"{IMAGES_FILE} does not match the sha256 recorded in {META_FILE}", nbytes
    return None, nbytes


def _image_meta_problem(entry: Path) -> str:
    """Why ImageCache.read_meta refused an entry, in words."""
    from imgclf.data.image_cache import CACHE_FORMAT, IMAGES_FILE, META_FILE, estimate_bytes

    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {META_FILE}"
    except (OSError, ValueError) as e:
        return f"{META_FILE} is unreadable: {e}"
    try:
        n, s = int(meta["n"]), int(meta["stored"])
        if meta["format"] != CACHE_FORMAT:
            return f"format {meta['format']!r}, this imgclf reads {CACHE_FORMAT}"
        if meta["key"] != entry.name:
            return f"{META_FILE} belongs to key {meta['key']!r}"
        if not len(meta["ok"]) == n == len(meta["reasons"]):
            return f"{META_FILE} lists {len(meta['ok'])} images, not n={n}"
    except (KeyError, TypeError, ValueError) as e:
        return f"{META_FILE} lacks or garbles {e}"
    try:
        size = (entry / IMAGES_FILE).stat().st_size
    except OSError:
        return f"no {IMAGES_FILE}"
    want = estimate_bytes(n, s)
    if size != want:
        return f"{IMAGES_FILE} has {size} bytes, {n} images of {s} px need {want}"
    return "a reader refused it"  # changed between the two reads


# example data ---------------------------------------------------------------------------------


def check_examples(root: Path) -> list[Finding]:
    """The embedded example folders against the digests in their `.complete` markers."""
    folders = subdirs(root)
    if not folders:
        return [Finding("example data", "ok", f"none at {root} (imgclf demo writes it)")]
    return [_check_example(folder) for folder in folders]


def _check_example(folder: Path) -> Finding:
    marker = folder.parent / f"{folder.name}.complete"
    if not marker.is_file():
        detail = f"{folder}: no {marker.name}, its write was interrupted"
        return Finding("example data", "warn", detail, "nothing to do: it is rebuilt on next use")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
        recorded.items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        detail = f"{folder}: written before imgclf recorded digests, cannot be verified by hash"
        fix = f"delete it to rebuild it with digests: rm -r {folder} {marker}"
        return Finding("example data", "warn", detail, fix)
    on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    missing = sorted(set(recorded) - set(on_disk))
    changed = sorted(n for n in recorded if n in on_disk and file_sha256(on_disk[n]) != recorded[n])
    if missing or changed:
        detail = (
            f"{folder}: {len(missing)} files missing, {len(changed)} differ from their recorded "
            f"sha256: {name_list(missing + changed)}"
        )
        fix = "delete it and its marker (imgclf doctor --fix does); it is rebuilt on next use"
        return Finding("example data", "problem", detail, fix, [folder, marker], True)
    extra = sorted(set(on_disk) - set(recorded))
    if extra:
        detail = f"{folder}: {len(extra)} files imgclf did not write: {name_list(extra)}"
        return Finding("example data", "warn", detail, "a scan of the example includes them")
    return Finding("example data", "ok", f"{folder}: {len(recorded)} files verified by sha256")


# run files ------------------------------------------------------------------------------------


def check_run_files(runs: Path) -> list[Finding]:
    """Every run's checkpoints/last.pt (against its digest) and model.safetensors (it loads)."""
    weights, checkpoints = _run_files(runs)
    if not weights and not checkpoints:
        return [Finding("run files", "ok", f"no weights or checkpoints under {runs}")]
    bad_checkpoints = [f for f in map(_checkpoint_finding, checkpoints) if f]
    bad_weights = [f for f in map(_weights_finding, weights) if f]
    good = len(checkpoints) - len(bad_checkpoints), len(weights) - len(bad_weights)
    out = bad_checkpoints + bad_weights
    if any(good):
        detail = f"{good[0]} checkpoints (digests match) and {good[1]} weight files load in {runs}"
        out.append(Finding("run files", "ok", detail))
    return out


def _checkpoint_finding(path: Path) -> Finding | None:
    from imgclf.runs.checkpoint import load_checkpoint

    try:
        load_checkpoint(path)
        return None
    except ImgclfError as e:
        error = str(e)
    best, config = path.parent.parent / MODEL_WEIGHTS, path.parent.parent / CONFIG_YAML
    if _predates_digests(path):
        detail = (
            f"{path} was written before checkpoints carried a digest: it cannot be verified, "
            "and `imgclf train --resume` refuses it as corrupt"
        )
        fix = f"delete it if the run is finished (its best weights are {best})"
        return Finding("run files", "warn", detail, fix, [path])
    fix = (
        f"{path} is only needed to resume; the run's best weights are {best}. Delete it if the "
        f"run is finished; to finish an unfinished run, train it again: imgclf train {config}"
    )
    return Finding("run files", "problem", error, fix, [path])


def _weights_finding(path: Path) -> Finding | None:
    from imgclf.runs.checkpoint import load_weights

    try:
        load_weights(path)
        return None
    except ImgclfError as e:
        error = str(e)
    if path.parent.name == "export":
        fix = f"export it again: imgclf export {path.parent.parent}"
    else:
        fix = (
            f"{path} holds the run's best weights and nothing rebuilds them (predict, export and "
            f"serve fail on this run): train again with imgclf train {path.parent / 'config.yaml'}"
        )
    return Finding("run files", "problem", error, fix, [path])


def _predates_digests(path: Path) -> bool:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: load_checkpoint's message says why
        return False
    return isinstance(state, dict) and "format" in state and "digest" not in state


def _run_files(runs: Path) -> tuple[list[Path], list[Path]]:
    from imgclf.runs.tracking import ARTIFACTS_DIR  # MLflow's copies, not imgclf's files

    weights, checkpoints = [], []
    for dirpath, dirnames, filenames in os.walk(runs):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d[0] != "." and d != ARTIFACTS_DIR)
        if MODEL_WEIGHTS in filenames:
            weights.append(here / MODEL_WEIGHTS)
        if here.name == "checkpoints" and "last.pt" in filenames:
            checkpoints.append(here / "last.pt")
    return weights, checkpoints


# stale temporary files ------------------------------------------------------------------------


def check_temp_files(places: Places, stale_minutes: float, now: float) -> list[Finding]:
    """imgclf's temporary files and folders: stale ones (interrupted writes) can go, young ones
    may belong to a live writer and stay, and so does, however old, a folder whose `.owner`
    (an image cache build) names a process alive on this host."""
    found: dict[Path, Path] = {}
    for root, folders in ((places.runs, False), (places.manifests, False), (places.cache, True)):
        for path in _temp_paths(root, folders):
            found.setdefault(path.resolve(), path)
    stale, young, owned = [], [], []
    for path in found.values():
        if _owner_alive(path):
            owned.append(path)
        else:
            (stale if now - _newest_mtime(path) > stale_minutes * 60 else young).append(path)
    out = []
    if stale:
        detail = (
            f"{len(stale)} stale temporary files ({human_size(sum(map(tree_size, stale)))}, "
            f"older than {stale_minutes:g} min) left by interrupted writes: {name_list(stale)}"
        )
        fix = "imgclf doctor --fix removes them (and nothing else)"
        out.append(Finding("temp files", "warn", detail, fix, stale, True))
    if young:
        detail = (
            f"{len(young)} temporary files younger than {stale_minutes:g} min left alone (a "
            f"writer may still own them): {name_list(young)}"
        )
        out.append(Finding("temp files", "ok", detail, "", young))
    if owned:
        detail = (
            f"{len(owned)} temporary folders of builds still running on this host "
            f"({human_size(sum(map(tree_size, owned)))}) left alone: {name_list(owned)}"
        )
        out.append(Finding("temp files", "ok", detail, "", owned))
    if not out:
        where = f"{places.runs}, {places.manifests}, {places.cache}"
        out.append(Finding("temp files", "ok", f"none under {where}"))
    return out


def _temp_paths(root: Path, folders: bool) -> Iterator[Path]:
    """Temporary files (and where `folders`, temporary folders) under root; hidden folders and
    symlinks are not followed."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if (here / d).is_symlink():
                continue
            if folders and _TEMP_DIR.match(d):
                yield here / d
            elif d[0] != ".":
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if _TEMP_FILE.match(name) and not (here / name).is_symlink():
                yield here / name


def _owner_alive(path: Path) -> bool:
    """Whether a temporary folder's `.owner` (`host pid`) names a live process on this host.
    No owner, another host (its processes cannot be checked from here) or a dead pid: False,
    and the age rule decides."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there, not probe it
        return False
    try:
        host, pid = (path / OWNER_FILE).read_text(encoding="utf-8").split()
        if host != socket.gethostname() or int(pid) <= 0:  # 0 or -1 would probe many processes
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    except (OSError, ValueError):
        return False
    return True


def _newest_mtime(path: Path) -> float:
    """A folder is as young as its youngest file: a writer may still be filling it."""
    return max((st.st_mtime for st in _lstats(path)), default=0.0)


# folders and sizes, shared with the disk and store checks -------------------------------------


def subdirs(root: Path) -> list[Path]:
    """Visible, real sub-folders (temporary `.x.XXXXXXXX` ones are check_temp_files')."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."
    )


def run_folders(runs: Path) -> list[Path]:
    """The run folders under `runs`: those with a summary.json."""
    return [p for p in subdirs(runs) if (p / SUMMARY_JSON).is_file()]


def tree_size(path: Path) -> int:
    """Bytes in path and all under it, symlinks not followed."""
    return sum(st.st_size for st in _lstats(path) if not stat.S_ISDIR(st.st_mode))


def _lstats(path: Path) -> Iterator[os.stat_result]:
    """lstat of path and all under it, skipping files a live writer removes meanwhile."""
    for p in (path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())):
        try:
            yield p.lstat()
        except FileNotFoundError:
            continue
