"""Packaged example configs (the demo's recipes); `config_path(name)` finds one."""

from pathlib import Path


def config_path(name: str) -> Path:
    return Path(__file__).parent / f"{name}.yaml"
