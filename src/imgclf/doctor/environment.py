"""The machine imgclf runs on: Python and package versions (a torchvision built for another torch
fails to load its compiled ops; drift from constraints.txt means a setup other than the pinned
one), the GPU training would use, and free disk where runs and the cache are written (a full
disk fails writes half-way through a run). torch is imported only by the GPU check."""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from imgclf.doctor.files import run_folders, subdirs, tree_size
from imgclf.doctor.findings import Finding, Places, human_size, name_list
from imgclf.runs.layout import RunFileError, RunFolder

PACKAGES = "torch torchvision timm lightning mlflow optuna onnxruntime safetensors numpy pillow"
# `make env` re-installs only when constraints.txt or pyproject.toml changed, so pip comes first.
ENV_FIX = "pip install -c constraints.txt -e '.[dev]' in the checkout (or make env)"


# versions -------------------------------------------------------------------------------------


def check_versions(
    installed: dict[str, str] | None = None, constraints: Path | None = None
) -> list[Finding]:
    """Python and key packages, the torch/torchvision pair, and drift from constraints.txt
    (the one beside a source checkout unless given)."""
    installed = _installed() if installed is None else installed
    constraints = constraints or _checkout_constraints()
    v = sys.version_info
    found = [f"python {v.major}.{v.minor}.{v.micro}"]
    found += [f"{p} {installed[p]}" for p in PACKAGES.split() if p in installed]
    missing = [p for p in PACKAGES.split() if p not in installed]
    if missing:
        detail = f"not installed: {', '.join(missing)}; {', '.join(found)}"
        out = [Finding("versions", "problem", detail, ENV_FIX)]
    else:
        out = [Finding("versions", "ok", ", ".join(found))]
    out += _torch_pair(installed.get("torch"), installed.get("torchvision"))
    if constraints is not None and constraints.is_file():
        out += _pin_drift(installed, constraints)
    return out


def _torch_pair(torch_v: str | None, vision_v: str | None) -> list[Finding]:
    t, v = _major_minor(torch_v), _major_minor(vision_v)
    if t is None or v is None or t[0] != 2:  # the rule below is torch 2.x's
        return []
    want = (0, t[1] + 15)  # torch 2.0 ↔ torchvision 0.15 … torch 2.14 ↔ torchvision 0.29
    if v == want:
        return [Finding("torch pair", "ok", f"torchvision {vision_v} belongs to torch {torch_v}")]
    detail = (
        f"torchvision {vision_v} does not belong to torch {torch_v} (torch 2.{t[1]} goes with "
        f"torchvision 0.{want[1]}): its compiled ops may fail to load"
    )
    return [Finding("torch pair", "problem", detail, f"install the matching pair: {ENV_FIX}")]


def _pin_drift(installed: dict[str, str], constraints: Path) -> list[Finding]:
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[_norm(m[1])] = m[2]
    # Pins of packages that are not installed are platform-specific (cuda-*, …): not drift.
    checked = [n for n in sorted(pins) if n in installed]
    drift = [
        f"{n} {installed[n]} (pinned {pins[n]})"
        for n in checked
        if not _same_version(installed[n], pins[n])
    ]
    if not drift:
        return [Finding("constraints", "ok", f"{len(checked)} packages as pinned in {constraints}")]
    detail = f"{len(drift)} packages differ from {constraints}: {name_list(drift, 6)}"
    fix = ENV_FIX.replace("the checkout", str(constraints.parent))
    return [Finding("constraints", "warn", detail, fix)]


def _installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            out.setdefault(_norm(name), dist.version)  # the first on sys.path is the one imported
    return out


def _checkout_constraints() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/imgclf/doctor/environment.py
    found = root / "constraints.txt"
    return found if found.is_file() and (root / "pyproject.toml").is_file() else None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _same_version(installed: str, pinned: str) -> bool:
    """`==2.14.1` accepts a local build such as 2.14.1+cpu, as pip does."""
    if "+" not in pinned:
        installed = installed.split("+")[0]
    try:
        from packaging.version import Version

        return Version(installed) == Version(pinned)
    except Exception:  # packaging missing, or a version it cannot parse
        return installed == pinned


def _major_minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m[1]), int(m[2])) if m else None


# GPU ------------------------------------------------------------------------------------------


def check_gpu() -> list[Finding]:
    """CUDA devices and bf16, Apple MPS, or what CPU only means; never a problem."""
    try:
        import torch
    except Exception as e:  # a missing torch is check_versions' problem
        return [Finding("gpu", "warn", f"torch does not import ({e}): no GPU check", ENV_FIX)]
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            names.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed (no bf16)"
        detail = f"{'; '.join(names)}; CUDA {torch.version.cuda}; precision=auto uses {precision}"
        return [Finding("gpu", "ok", detail)]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return [Finding("gpu", "ok", "Apple GPU (mps): train.accelerator=auto uses it")]
    use = "train.accelerator=auto (the default) uses a GPU once one is visible"
    if torch.version.cuda:
        detail = (
            f"no GPU visible although torch is built for CUDA {torch.version.cuda}: training "
            "runs on the CPU"
        )
        fix = f"for a GPU check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; {use}"
        return [Finding("gpu", "warn", detail, fix)]
    detail = "CPU only (this torch has no CUDA): training runs on the CPU"
    return [Finding("gpu", "ok", detail, f"for a GPU install a CUDA build of torch; {use}")]


# disk -----------------------------------------------------------------------------------------


def check_disk(places: Places, min_free_gb: float) -> list[Finding]:
    """Free space where the runs and the cache are written, one line per file system."""
    groups: dict[int, list[tuple[str, Path, Path]]] = {}
    for label, path in (("runs", places.runs), ("cache", places.cache)):
        base = _existing_parent(path)  # where it will be written when it does not exist yet
        groups.setdefault(base.stat().st_dev, []).append((label, path, base))
    out = []
    for dev, members in groups.items():
        usage = shutil.disk_usage(members[0][2])
        where = ", ".join(f"{label}: {path}" for label, path, _ in members)
        detail = f"{human_size(usage.free)} free of {human_size(usage.total)} ({where})"
        if usage.free >= min_free_gb * 1e9:
            out.append(Finding("disk", "ok", detail))
        else:
            detail += f": below --min-free-gb {min_free_gb:g}; writes fail once it is full"
            out.append(Finding("disk", "problem", detail, _deletable(places, dev)))
    return out


def _deletable(places: Places, dev: int) -> str:
    """What of imgclf's own could go on the file system `dev`, with sizes."""
    parts = []
    for folder, what in (
        (places.cache / "features", "feature caches in {} ({}; recomputed when needed)"),
        (
            places.cache / "images",
            "decoded image caches in {} ({}; decoded again when needed, and freed only once no "
            "running training uses them)",
        ),
    ):
        entries = sorted(_on_device(subdirs(folder), dev), key=lambda p: p.stat().st_mtime)
        if entries:
            total = human_size(sum(tree_size(p) for p in entries))
            oldest = ", ".join(f"{p.name} ({human_size(tree_size(p))})" for p in entries[:3])
            summary = what.format(folder, f"{len(entries)} entries, {total}")
            parts.append(f"{summary}, oldest first: {oldest}")
    examples = _on_device(subdirs(places.cache / "examples"), dev)
    if examples:
        total = human_size(sum(tree_size(p) for p in examples))
        parts.append(f"the example data in {places.cache / 'examples'} ({total}; rebuilt on use)")
    finished = [
        r / "checkpoints" / "last.pt"
        for r in run_folders(places.runs)
        if _status(r) == "completed" and (r / "checkpoints" / "last.pt").is_file()
    ]
    finished = _on_device(finished, dev)
    if finished:
        parts.append(
            f"checkpoints/last.pt of {len(finished)} completed runs in {places.runs} "
            f"({human_size(sum(p.stat().st_size for p in finished))}; only needed to resume — a "
            "run's best weights are its model.safetensors)"
        )
    if not parts:
        return "free space on this disk: nothing of imgclf's there is worth deleting"
    return "free space; of imgclf's own these can go: " + "; ".join(parts)


def _status(run: Path) -> str | None:
    try:
        return RunFolder(run).summary().get("status")
    except RunFileError:
        return None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _on_device(paths: list[Path], dev: int) -> list[Path]:
    return [p for p in paths if p.stat().st_dev == dev]
