"""Commands by area. Each module defines `register(app)` adding its commands to the typer app;
modules import only typer and rich at import time (heavy imports live inside the commands).
Helpers that several areas share live in `_common`; `AREAS` orders `imgclf --help`."""

from __future__ import annotations

import importlib

import typer

AREAS = (
    "fit",
    "data",
    "train",
    "models",
    "demo",
    "evaluate",
    "leaderboard",
    "predict",
    "serve",
    "sweep",
    "doctor",
    "bench",
)


def register_all(app: typer.Typer) -> None:
    for area in AREAS:
        importlib.import_module(f"imgclf.commands.{area}").register(app)
