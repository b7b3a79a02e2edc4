"""The embedded example: scikit-learn's handwritten digits as a class-folder tree of PNGs.

1,797 real 8×8 scans in 10 classes, written once (upsampled to 32 px) into a cache folder.
The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
half-written example that later looks complete. The marker written last beside it records
every file's sha256 (`{"sha256": {"digit_0/0000.png": hex, …}}`) so `imgclf doctor` can verify it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.files import atomic_write_text

EXAMPLE_SIZE = 32


def cache_dir() -> Path:
    """$IMGCLF_CACHE, else ~/.cache/imgclf."""
    return Path(os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf")


def digits_folder(dest: Path | None = None, size: int = EXAMPLE_SIZE) -> Path:
    """Return the digits class-folder tree, writing it on first use."""
    dest = Path(dest) if dest else cache_dir() / "examples" / f"digits-{size}px"
    marker = dest.parent / f"{dest.name}.complete"  # outside the tree: the scan never sees it
    if marker.is_file() and dest.is_dir():
        return dest
    from sklearn.datasets import load_digits

    digits = load_digits()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    digests = {}
    try:
        for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
            folder = tmp / f"digit_{target}"
            folder.mkdir(exist_ok=True)
            # 0..16 ink levels → 0..255, white digit on black as scanned.
            img = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
            path = folder / f"{i:04d}.png"
            img.resize((size, size), Image.Resampling.BICUBIC).save(path)
            digests[f"{folder.name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        atomic_write_text(marker, json.dumps({"sha256": digests}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
