"""What several command modules share: the consoles and the config-argument rule.

Imports only rich at import time (heavy imports live inside the commands)."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def split_config_arg(
    config: Path | None, overrides: list[str] | None
) -> tuple[Path | None, list[str]]:
    """`imgclf config show a.b=1` has no file: the first argument is then an override."""
    if config is not None and re.match(r"^[A-Za-z_][\w.]*=", str(config)) and not config.exists():
        return None, [str(config), *(overrides or [])]
    return config, list(overrides or [])
