"""From a data config to a usable, split manifest: scan when needed, split when missing.

Later commands (train, evaluate) call `prepare`; the CLI's `split` calls `split_and_save`.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import DataConfig, SplitConfig
from imgclf.data.manifest import MANIFEST_JSON, Manifest, read_manifest, write_manifest
from imgclf.data.scan import default_manifest_dir, scan_to
from imgclf.data.split import SplitReport, split_manifest
from imgclf.errors import ImgclfError


def split_and_save(
    manifest_dir: Path, split: SplitConfig, *, force: bool = False
) -> tuple[Manifest, SplitReport]:
    """Split the manifest in `manifest_dir` (respecting a given split) and write it back."""
    manifest = read_manifest(manifest_dir)
    manifest.require_usable(manifest_dir)
    result, report = split_manifest(manifest, split.fractions(), split.seed, force=force)
    result.report = {**result.report, "split": report.to_dict()}
    write_manifest(result, manifest_dir)
    return result, report


def prepare(
    cfg: DataConfig, *, progress: bool = True, read_only: bool = False
) -> tuple[Manifest, Path]:
    """The manifest a run trains on: read it, or scan `data.root`; split it when it has none.

    `read_only`: only read what another process (rank 0 of a multi-process run) prepared.
    """
    if cfg.root is not None:  # re-scan: incremental, so cheap, and it catches changed files
        manifest_dir = cfg.manifest or default_manifest_dir(cfg.root)
        if not read_only:
            scan_to(cfg.root, manifest_dir, cfg.scan, progress=progress)
    elif cfg.manifest and (cfg.manifest / MANIFEST_JSON).is_file():
        manifest_dir = cfg.manifest
    else:
        raise ImgclfError("set data.root (a folder or CSV) or data.manifest (a scanned manifest)")
    manifest = read_manifest(manifest_dir)
    manifest.require_usable(manifest_dir)
    if not manifest.has_split:
        if read_only:
            raise ImgclfError(f"{manifest_dir} has no split yet (rank 0 should have written it)")
        manifest, _ = split_and_save(manifest_dir, cfg.split)
    return manifest, manifest_dir
