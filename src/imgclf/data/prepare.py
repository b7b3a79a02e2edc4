"""From a data config to a usable, split manifest: scan when needed, split when missing.

Later commands (train, evaluate) call `prepare`; the CLI's `scan` calls `rescan` and its `split`
calls `split_and_save`.

A split computed by imgclf (`imgclf split`, or the first run on new data) is saved in the
manifest: its fractions and seed in `manifest.json` (report.split), the assignment in the split
column. Every later step keeps it: a re-scan re-applies it, and a config whose `data.split` sets
fractions or a seed that disagree with it is an error naming both, unless it also sets
`data.split.resplit=true`. Keys left at their defaults never count as disagreeing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from imgclf.config import DataConfig, ScanConfig, SplitConfig
from imgclf.data.manifest import (
    MANIFEST_JSON,
    SPLITS,
    Manifest,
    read_manifest,
    write_manifest,
)
from imgclf.data.scan import REPORT_JSON, default_manifest_dir, scan
from imgclf.data.split import SplitReport, compute_splits, split_manifest
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json

_SPLIT_KEYS = (*SPLITS, "seed")


def saved_split(manifest: Manifest | None) -> dict[str, Any] | None:
    """Fractions and seed of a split imgclf computed and saved (None: none, or given by data)."""
    rec = manifest.report.get("split") if manifest is not None else None
    if not isinstance(rec, dict) or rec.get("source") != "computed" or not rec.get("fractions"):
        return None
    fractions = {s: float(rec["fractions"].get(s, 0.0)) for s in SPLITS}
    return {**fractions, "seed": int(rec.get("seed", 0))}


def describe_split(values: dict[str, Any]) -> str:
    shown = " ".join(f"{k}={values[k]:g}" for k in SPLITS if k in values)
    return f"{shown} seed={values['seed']}" if "seed" in values else shown


def _disagreeing(saved: dict[str, Any], split: SplitConfig, keys) -> dict[str, Any]:
    """The keys among `keys` whose value in `split` differs from the saved split's."""
    wanted = {k: getattr(split, k) for k in _SPLIT_KEYS if k in keys}
    return {k: v for k, v in wanted.items() if abs(float(v) - float(saved[k])) > 1e-9}


def split_and_save(
    manifest_dir: Path, split: SplitConfig, *, force: bool = False
) -> tuple[Manifest, SplitReport]:
    """Split the manifest in `manifest_dir` (respecting a given or saved split); write it back.

    A saved split with other fractions or seed is refused unless `force` recomputes it.
    """
    manifest = read_manifest(manifest_dir)
    manifest.require_usable(manifest_dir)
    saved = saved_split(manifest)
    if saved is not None and manifest.has_split and not force:
        if _disagreeing(saved, split, _SPLIT_KEYS):
            raise ImgclfError(
                f"{manifest_dir} is already split ({describe_split(saved)}); asked for "
                f"{describe_split(split.model_dump())}. Pass --force to replace the saved split "
                f"(runs trained on it keep theirs), or scan into another folder with -o"
            )
        return manifest, SplitReport(**manifest.report["split"])
    result, report = split_manifest(manifest, split.fractions(), split.seed, force=force)
    result.report = {**result.report, "split": report.to_dict()}
    write_manifest(result, manifest_dir)
    return result, report


def rescan(
    source: Path,
    out_dir: Path,
    cfg: ScanConfig,
    *,
    root: Path | None = None,
    labels: list[str] | None = None,
    progress: bool = True,
    named: bool = False,
) -> tuple[Manifest, list[str]]:
    """Scan `source` into `out_dir`, keeping what the manifest already there saved.

    The earlier scan's unchanged rows, its `--labels` order and its saved split carry over. A
    manifest of another source in `out_dir` is refused when the folder name was derived
    (`named=False`), replaced when the user named it. Returns the manifest and notes to show.
    """
    previous, notes = _previous(out_dir), []
    if previous is not None and not _same_source(previous, source, root):
        if not named:
            raise ImgclfError(_shared_folder_message(out_dir, previous, source, root))
        notes.append(f"replaced the manifest of {_describe_previous(previous)} in {out_dir}")
        previous = None  # nothing carries over from other data
    from_file = labels is None and previous is not None and previous.label_order == "file"
    if from_file:
        labels = list(previous.labels.names)
        notes.append(f"label order kept from the earlier `scan --labels` ({len(labels)} classes)")
    manifest = scan(source, cfg, root=root, labels=labels, previous=previous, progress=progress)
    manifest.origin = str(Path(source).resolve())
    if from_file and manifest.errors:
        manifest.errors.append(
            f"the label list is the order saved in {out_dir} by `imgclf scan --labels`; "
            "re-scan with --labels FILE to change it"
        )
    saved = saved_split(previous)
    if saved is not None and not any(e.split for e in manifest.ok_entries):
        manifest = _reapply(manifest, previous, saved, out_dir, notes)
    write_manifest(manifest, out_dir)
    atomic_write_json(out_dir / REPORT_JSON, manifest.report)
    return manifest, notes


def prepare(
    cfg: DataConfig, *, progress: bool = True, read_only: bool = False
) -> tuple[Manifest, Path]:
    """The manifest a run trains on: read it, or scan `data.root`; split it when it has none.

    `read_only`: only read what another process (rank 0 of a multi-process run) prepared.
    When a saved split is used, `cfg.split` is set to it, so the run's config.yaml says which.
    """
    if cfg.root is not None:  # re-scan: incremental, so cheap, and it catches changed files
        manifest_dir = cfg.manifest or default_manifest_dir(cfg.root)
        if not read_only:
            rescan(cfg.root, manifest_dir, cfg.scan, progress=progress, named=bool(cfg.manifest))
    elif cfg.manifest and (cfg.manifest / MANIFEST_JSON).is_file():
        manifest_dir = cfg.manifest
    else:
        raise ImgclfError("set data.root (a folder or CSV) or data.manifest (a scanned manifest)")
    manifest = read_manifest(manifest_dir)
    manifest.require_usable(manifest_dir)
    if cfg.split.resplit:
        if not read_only:
            manifest, _ = split_and_save(manifest_dir, cfg.split, force=True)
        return manifest, manifest_dir
    if (saved := saved_split(manifest)) is not None:
        _require_agreement(saved, cfg.split, manifest_dir)
        use = SplitConfig(**saved)
        if not manifest.has_split and not read_only:
            manifest, _ = split_and_save(manifest_dir, use, force=True)
        if use.model_dump() != cfg.split.model_dump():
            cfg.split = use
    elif not manifest.has_split:
        if read_only:
            raise ImgclfError(f"{manifest_dir} has no split yet (rank 0 should have written it)")
        manifest, _ = split_and_save(manifest_dir, cfg.split)
    return manifest, manifest_dir


def _require_agreement(saved: dict[str, Any], split: SplitConfig, manifest_dir: Path) -> None:
    """A config that sets split keys the saved split contradicts is an error naming both."""
    differ = _disagreeing(saved, split, split.model_fields_set)
    if not differ:
        return
    keys = " ".join(f"data.split.{k}" for k in differ)
    raise ImgclfError(
        f"{manifest_dir} holds a saved split ({describe_split(saved)}), but the config sets "
        f"{describe_split(split.model_dump())} (differs in {keys}); a saved split is never "
        f"replaced silently. To keep it, drop {keys} from the config (or set the saved "
        f"values); to replace it, add data.split.resplit=true or run `imgclf split "
        f"{manifest_dir} ... --force`; or give this split its own folder with data.manifest=PATH"
    )


def _reapply(
    manifest: Manifest, previous: Manifest, saved: dict[str, Any], out_dir: Path, notes: list
) -> Manifest:
    """The saved fractions and seed again on the re-scanned rows (the same rows: the same split)."""
    if not manifest.usable:  # keep the record, so the split returns once the data is fixed
        manifest.report = {**manifest.report, "split": previous.report["split"]}
        return manifest
    fractions = {s: saved[s] for s in SPLITS}
    splits, report = compute_splits(manifest.entries, fractions, saved["seed"])
    kept = f"split saved in {out_dir} kept ({describe_split(saved)})"
    report.notes.insert(0, kept)
    notes.append(kept)
    entries = [replace(e, split=s) for e, s in zip(manifest.entries, splits, strict=True)]
    per_class = report.per_class
    by_split = {
        s: {c: per_class.get(c, {}).get(s, 0) for c in manifest.labels.names} for s in SPLITS
    }
    summary = {s: counts for s, counts in by_split.items() if s in report.fractions}
    return replace(
        manifest,
        entries=entries,
        report={**manifest.report, "splits": summary, "split": report.to_dict()},
    )


def _previous(out_dir: Path) -> Manifest | None:
    if not (out_dir / MANIFEST_JSON).is_file():
        return None
    try:
        return read_manifest(out_dir)
    except (ImgclfError, KeyError, ValueError):
        return None  # an unreadable old manifest only costs a full re-scan


def _source_id(source: Path, root: Path | None) -> tuple[str, str, str]:
    """(kind, data root, origin) as `scan` would record them."""
    source = Path(source)
    if source.is_dir():
        return "folder", str(source.resolve()), str(source.resolve())
    return "csv", str((root or source.parent).resolve()), str(source.resolve())


def _same_source(previous: Manifest, source: Path, root: Path | None) -> bool:
    if not Path(source).exists():
        return True  # the scan says it does not exist
    kind, data_root, origin = _source_id(source, root)
    if previous.origin and previous.origin != origin:
        return False
    return previous.source == kind and str(previous.root) == data_root


def _describe_previous(m: Manifest) -> str:
    if m.source == "csv":
        return f"the CSV {m.origin or '(name not recorded)'} (root {m.root})"
    return f"the folder {m.origin or m.root}"


def _shared_folder_message(out_dir: Path, previous: Manifest, source: Path, root) -> str:
    kind, data_root, origin = _source_id(source, root)
    new = f"the CSV {origin} (root {data_root})" if kind == "csv" else f"the folder {origin}"
    other = out_dir.parent / f"{out_dir.name}-{kind}"
    return (
        f"{out_dir} already holds the manifest of {_describe_previous(previous)}; {new} would "
        f"overwrite it (both are named {out_dir.name!r}). Give it its own folder: "
        f"`imgclf scan {source} -o {other}`, or data.manifest={other} in a run config; "
        f"or delete {out_dir} to replace the old manifest (and its saved split)"
    )
