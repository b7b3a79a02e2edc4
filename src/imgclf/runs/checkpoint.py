"""Checkpoints of tensors and plain values only, loaded with `weights_only=True`.

`checkpoints/last.pt` holds the full training state (model, optimizer, schedule, position,
RNG states, history); weights for prediction live in safetensors. A checkpoint that is
truncated, corrupt, of another architecture, or a pickle that would run code is refused with
the file named, and nothing in it executes (docs/RELIABILITY.md F4).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from imgclf.errors import ImgclfError, torch_load_reason
from imgclf.files import atomic_write_bytes
from imgclf.runs.layout import CHECKPOINT

CHECKPOINT_FORMAT = 1


def save_checkpoint(run_path: Path, state: dict[str, Any]) -> Path:
    """Serialise in memory first, then one atomic write: a kill leaves the previous one intact."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    state["digest"] = digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(Path(run_path) / CHECKPOINT, buf.getvalue())


def digest(value: Any) -> str:
    """A checksum over every tensor's bytes and every plain value: torch's zip format has none,
    so flipped bytes inside tensor data would otherwise load silently."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            if k != "digest":
                h.update(f"K{k!r}".encode())
                _feed(h, value[k])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"V{value!r}".encode())


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"no checkpoint at {path}; the run stopped before its first save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Never torch's own advice (weights_only=False "will likely succeed"): this file may
        # come from anyone, and that advice would run its code.
        raise ImgclfError(
            f"{path} refused: it holds objects other than tensors and plain values "
            f"(not loaded, nothing executed): {torch_load_reason(e)}. Do not load it another "
            "way; resume from a checkpoint you made, or train again"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = f"{type(e).__name__}: {torch_load_reason(e)}"
        raise ImgclfError(f"{path} is truncated or corrupt ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ImgclfError(f"{path} is not an imgclf checkpoint (format {CHECKPOINT_FORMAT})")
    if state.get("digest") != digest(state):
        raise ImgclfError(f"{path} is corrupt: its checksum does not match its contents")
    return state


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of weights (never a pickle)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ImgclfError(f"weights file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ImgclfError(f"{path} is not a readable safetensors file: {e}") from None


def load_state_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path
) -> None:
    """Load every key with matching shapes, or name the differences."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}")
        raise ImgclfError(
            f"{source} does not fit this architecture ({'; '.join(parts)}); "
            "was it saved from a different model or class count?"
        )
    module.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generators as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(_to_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
