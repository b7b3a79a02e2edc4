"""docs/RELIABILITY.md F3 (disk full while saving) and F10 (a DataLoader worker dies mid-epoch).

The disk fills up on a real 4 MB tmpfs (when this machine lets the tests mount one) and through
a writer that fails every write with ENOSPC (always); either way the error names the file being
written, the previous checkpoint survives byte for byte, no partial file is left, and once space
is back `--resume` ends exactly where an undisturbed run ends.
"""

import errno
import json
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import imgclf.files
from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.files import is_temp_name
from imgclf.runs.checkpoint import load_checkpoint
from imgclf.workflows.training import train
from test_train import TINY, metrics_without_time, same_weights

import factory as fx

CKPT = Path("checkpoints") / "last.pt"


def quiet(*_):
    return None


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=15, size=(40, 40)
    )


def args_for(data, tmp_path, *extra):
    return [
        *TINY,
        "train.stages=[{epochs: 3, lr: 0.01}]",
        f"data.root={data}",
        f"data.manifest={tmp_path / 'manifest'}",
        *extra,
    ]


@contextmanager
def tmpfs(path: Path, size: str = "4m"):
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the ENOSPC writer covers F3")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def disk_fills_after_epoch_2(runs: Path, args, fill_disk, free_disk, ref: Path):
    """Train until epoch 2 ends, fill the disk before its checkpoint, then free it and resume."""
    saved = {}

    def on_epoch(row):
        if row["epoch"] == 2:
            run = next(runs.iterdir())
            saved["run"], saved["ckpt"] = run, (run / CKPT).read_bytes()
            fill_disk()

    cfg = load_config(None, [*args, f"runs_dir={runs}"])
    with pytest.raises(ImgclfError) as err:
        train(cfg, progress=False, log=quiet, on_epoch=on_epoch)
    run = saved["run"]
    assert f"no space left writing {run / CKPT}" in str(err.value)
    assert (run / CKPT).read_bytes() == saved["ckpt"], "the previous checkpoint changed"
    assert load_checkpoint(run / CKPT)["fit"]["global_epoch"] == 1
    assert not [p for p in run.rglob("*") if is_temp_name(p.name)], "a partial file was left"

    free_disk()
    train(None, resume=run, progress=False, log=quiet)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)


@pytest.fixture
def ref(data, tmp_path):
    cfg = load_config(None, [*args_for(data, tmp_path), f"runs_dir={tmp_path / 'ref'}"])
    return train(cfg, progress=False, log=quiet)


def test_disk_full_on_a_real_tmpfs(data, tmp_path, ref):
    with tmpfs(tmp_path / "small") as disk:
        filler = {}
        disk_fills_after_epoch_2(
            disk / "runs",
            args_for(data, tmp_path),
            lambda: filler.setdefault("f", fill(disk)),
            lambda: filler["f"].unlink(),
            ref,
        )


def test_disk_full_from_a_writer_that_gets_enospc(data, tmp_path, ref, monkeypatch):
    full = {"on": False}
    real_fdopen = os.fdopen

    class FullDisk:
        """What a file on a full disk does: every write fails with ENOSPC."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        return FullDisk(f) if full["on"] else f

    monkeypatch.setattr(imgclf.files.os, "fdopen", fdopen)
    disk_fills_after_epoch_2(
        tmp_path / "runs",
        args_for(data, tmp_path),
        lambda: full.update(on=True),
        lambda: full.update(on=False),
        ref,
    )


def test_a_dataloader_worker_killed_mid_epoch_is_named_and_the_run_resumes(
    data, tmp_path, monkeypatch
):
    from imgclf.data.loaders import ManifestDataset

    args = args_for(data, tmp_path, "train.workers=2")
    ref = train(load_config(None, [*args, f"runs_dir={tmp_path / 'ref'}"]), progress=False,
                log=quiet)  # fmt: skip
    armed, fired = tmp_path / "armed", tmp_path / "fired"
    real_getitem = ManifestDataset.__getitem__

    def getitem(self, item):
        # In a worker process of epoch 2: the kernel's OOM killer picks this worker.
        if torch.utils.data.get_worker_info() and armed.exists() and not fired.exists():
            fired.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_getitem(self, item)

    monkeypatch.setattr(ManifestDataset, "__getitem__", getitem)
    runs = tmp_path / "runs"
    cfg = load_config(None, [*args, f"runs_dir={runs}"])
    with pytest.raises(ImgclfError, match="data-loading worker process died") as err:
        train(cfg, progress=False, log=quiet, on_epoch=lambda row: armed.touch())
    assert "train.workers" in str(err.value) and "--resume" in str(err.value)
    assert fired.exists()
    run = next(runs.iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"

    train(None, resume=run, progress=False, log=quiet)
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)
