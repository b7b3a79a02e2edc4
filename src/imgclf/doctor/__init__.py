"""`imgclf doctor`: is this environment, and are these folders, fit to train and track runs?

Each check is a plain function returning `Finding`s: a status (ok | warn | problem), what was
found and what to do. Nothing here changes a file except `apply_fixes`, which deletes only the
paths of findings marked `removable`: imgclf's own stale temporary files and cache entries that
fail their digests — never user files, never run folders, never a temporary folder whose
`.owner` builder is alive on this host. torch is imported only by the checks that need it.

The checks live by concept: `environment` (versions, GPU, disk), `store` (the MLflow store) and
`files` (feature cache, image cache, example data, run files, stale temporary files); `findings`
holds `Finding` and `Places`.
"""

from __future__ import annotations

import shutil
import time

from imgclf.doctor.environment import check_disk, check_gpu, check_versions
from imgclf.doctor.files import (
    check_examples,
    check_feature_cache,
    check_image_cache,
    check_run_files,
    check_temp_files,
)
from imgclf.doctor.findings import Finding, Places, Status
from imgclf.doctor.store import check_mlflow_store

__all__ = [
    "Finding",
    "Places",
    "Status",
    "apply_fixes",
    "check_disk",
    "check_examples",
    "check_feature_cache",
    "check_gpu",
    "check_image_cache",
    "check_mlflow_store",
    "check_run_files",
    "check_temp_files",
    "check_versions",
    "problems",
    "run_checks",
]


def run_checks(
    places: Places, min_free_gb: float = 2.0, stale_minutes: float = 60.0
) -> list[Finding]:
    """Every check, in report order."""
    return [
        *check_versions(),
        *check_gpu(),
        *check_disk(places, min_free_gb),
        *check_mlflow_store(places.runs, places.uri),
        *check_feature_cache(places.cache / "features"),
        *check_image_cache(places.cache / "images"),
        *check_examples(places.cache / "examples"),
        *check_run_files(places.runs),
        *check_temp_files(places, stale_minutes, time.time()),
    ]


def problems(findings: list[Finding]) -> list[Finding]:
    """The problems --fix did not deal with: what makes the command exit 1."""
    return [f for f in findings if f.status == "problem" and not f.fixed]


def apply_fixes(findings: list[Finding]) -> list[str]:
    """Delete the paths of removable warnings and problems; one line per path."""
    lines = []
    for f in findings:
        if not f.removable or f.status == "ok" or f.fixed:
            continue
        f.fixed = True
        for p in f.paths:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
                lines.append(f"removed {p}")
            except OSError as e:
                f.fixed = False
                lines.append(f"could not remove {p}: {e.strerror}")
    return lines
