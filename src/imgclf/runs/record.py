"""The run folder: the contract between training and everything after it.

runs/<run-id>/ config.yaml, environment.json, data.json, metrics.csv, summary.json,
model.safetensors + model.json, checkpoints/last.pt, plots/, predictions/ (the names live in
runs/layout.py, with the reader). Every file is written atomically; `model.json` +
`model.safetensors` rebuild the predictor with no config or data.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from imgclf.runs.layout import (
    CONFIG_YAML,
    LOCK,
    METRICS_CSV,
    MODEL_JSON,
    MODEL_WEIGHTS,
    SUBFOLDERS,
    read_json,
)

MODEL_FORMAT = 1
_PACKAGES = (
    "imgclf",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "numpy",
    "pillow",
    "safetensors",
)


def new_run_id(model_name: str, name: str | None = None) -> str:
    """Readable and unique: time + model (+ name) + a random suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{name}-{model_name}" if name else model_name)
    return f"{stamp}-{label[:48]}-{secrets.token_hex(3)}"


@dataclass
class RunDir:
    path: Path
    # False on every rank but 0 of a multi-process run: its writes are skipped, so one process
    # alone owns the folder whatever code path reaches a write.
    writer: bool = True

    @classmethod
    def create(cls, runs_dir: Path, run_id: str) -> RunDir:
        """Make the folder exclusively: two trainings can never share one
        (docs/RELIABILITY.md F8)."""
        path = Path(runs_dir) / run_id
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise ImgclfError(f"run folder {path} already exists; choose another name") from None
        for sub in SUBFOLDERS:
            (path / sub).mkdir()
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / CONFIG_YAML).is_file():
            raise ImgclfError(f"{path} is not a run folder (no {CONFIG_YAML})")
        return cls(path)

    @property
    def id(self) -> str:
        return self.path.name

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a process trains into this folder: a second `--resume` of the same run
        is refused instead of two writers interleaving checkpoints. The kernel drops the lock
        when its process dies, even by SIGKILL."""
        if not self.writer:
            yield
            return
        with open(self.path / LOCK, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                raise ImgclfError(
                    f"{self.path} is being trained by {owner}; wait for it to finish "
                    "(or stop it) before resuming"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> dict:
        return read_json(self.path / name)

    def write_config(self, yaml_text: str) -> None:
        if self.writer:
            atomic_write_text(self.path / CONFIG_YAML, yaml_text)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """The whole table each epoch: small, and never a half-appended line."""
        if not rows or not self.writer:
            return
        cols = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path / METRICS_CSV, buf.getvalue())

    def write_weights(self, state_dict: dict[str, torch.Tensor], name: str = MODEL_WEIGHTS) -> None:
        if not self.writer:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        atomic_write_bytes(self.path / name, save_safetensors(tensors))

    def write_model_json(self, spec: dict, preprocessing: dict, labels: list[str]) -> None:
        self.write_json(
            MODEL_JSON,
            {
                "format": MODEL_FORMAT,
                "spec": spec,
                "preprocessing": preprocessing,
                "labels": labels,
                "weights": MODEL_WEIGHTS,
            },
        )


def environment(seed: int, device: str) -> dict[str, Any]:
    """What is needed to explain a result later: versions, commit, device, seed, command."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "command": sys.argv,
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def config_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
