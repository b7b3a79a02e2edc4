"""Progress for the long steps that would otherwise be silent; a no-op when switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

Advance = Callable[..., None]


def _quiet(n: float = 1, description: str | None = None) -> None:
    return None


@contextlib.contextmanager
def progress_bar(
    description: str, total: float | None, show: bool, console: Any = None
) -> Iterator[Advance]:
    """Yield `advance(n=1, description=None)`: a transient rich bar on stderr when `show`.

    `total=None` shows a spinner-like bar without an end (steps of unknown count).
    """
    if not show:
        yield _quiet
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    columns += [MofNCompleteColumn()] if total is not None else []
    columns += [TimeElapsedColumn()]
    # stderr: stdout stays clean for what commands print (tables, paths, CSV).
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float = 1, description: str | None = None) -> None:
            extra = {"description": description} if description else {}
            bar.update(task, advance=n, **extra)

        yield advance
