"""rich progress bars with ETA for the long loops (written to stderr, quiet when not a terminal)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

CONSOLE = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, note="")``; shows done/total, elapsed time and ETA."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=CONSOLE, disable=not CONSOLE.is_terminal) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = "") -> None:
            bar.update(task, advance=n, note=note)

        yield advance


def log(message: str) -> None:
    """One status line on stderr (stdout stays clean for --json)."""
    CONSOLE.print(message, highlight=False, soft_wrap=True)
